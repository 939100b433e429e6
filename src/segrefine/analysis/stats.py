"""All inference of the report: per-image (or per-subject) paired differences, t-intervals,
sign-flip p-values, hierarchical bootstrap, Holm's correction within each family and the
reachability of the smallest p (``summarise`` runs them over the rows).

With two or more seeds a t-interval and an exact sign-flip p on the per-seed Δ; with one seed on
the same weights a test conditional on that model over its images (or subjects), marked †; with
one retrained model per side no test. ``benchmarks/calibration.py`` shows by simulation that the
stars and intervals hold their nominal rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from segrefine.analysis.rows import Row, group_rows, pairing_kind
from segrefine.record.protocols import Column, PROTOCOLS
from segrefine.record.run_record import RunRecord


BOOTSTRAP_SAMPLES = 10_000
EXACT_PERMUTATION_MAX = 16  # exact sign-flip enumeration up to 2**16 patterns
MONTE_CARLO_RESAMPLES = 9_999  # beyond: Monte Carlo sign flips, p >= 1 / 10 000
ALPHA = 0.05
@dataclass
class ImageDifferences:
    """Per-image ``run - base`` of one seed: ``values`` over the finite pairs, sorted by id;
    ``subjects`` (the cluster of each value) when every image row names its subject."""

    values: np.ndarray
    subjects: np.ndarray | None = None
    dropped: int = 0  # pairs with a non-finite (or null) value on either side
    unit: str = "images"  # what one value is: an image, or (per-volume metrics) a subject


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def image_differences(run: RunRecord, base: RunRecord, key: str) -> tuple[ImageDifferences | None, str]:
    """Per-image ``run - base`` on ``key``, images matched by id; (None, why) if they do not pair.

    A null/NaN/inf value is missing data: its pair is dropped and counted (never a number in
    the Δ); when no pair is left the Δ is not computed."""
    ours = {r["id"]: r for r in run.per_image or ()}
    theirs = {r["id"]: r for r in base.per_image or ()}
    if not ours or not theirs:
        return None, "no per-image rows"
    if set(ours) != set(theirs):
        return None, f"test images differ ({len(set(ours) ^ set(theirs))} ids in one run only)"
    ids = sorted(ours)
    if any(key not in ours[i] or key not in theirs[i] for i in ids):
        return None, f"per-image {key} not recorded"
    kept = [i for i in ids if _finite(ours[i][key]) and _finite(theirs[i][key])]
    if not kept:
        return None, f"every per-image {key} pair has a non-finite value"
    values = np.array([ours[i][key] - theirs[i][key] for i in kept], dtype=np.float64)
    subjects = None
    named = [ours[i].get("subject", theirs[i].get("subject")) for i in kept]  # older runs may not record it
    if all(name is not None for name in named):
        if any(None not in (ours[i].get("subject"), theirs[i].get("subject"))
               and ours[i]["subject"] != theirs[i]["subject"] for i in kept):
            return None, "the runs assign the same image ids to different subjects"
        subjects = np.array([str(name) for name in named])
    return ImageDifferences(values, subjects, len(ids) - len(kept)), ""


def volume_differences(run: RunRecord, base: RunRecord, key: str) -> tuple[ImageDifferences | None, str]:
    """Per-subject ``run - base`` of a per-volume metric, subjects matched by name; (None, why)
    when they do not pair or a value is infinite (a missed class: no finite Δ exists)."""
    ours = {str(r.get("subject")): r for r in run.per_volume or ()}
    theirs = {str(r.get("subject")): r for r in base.per_volume or ()}
    if not ours or not theirs:
        return None, "no per-volume rows"
    if set(ours) != set(theirs):
        return None, f"test subjects differ ({len(set(ours) ^ set(theirs))} in one run only)"
    subjects = sorted(ours)
    infinite = [s for s in subjects if key in (ours[s].get("infinite") or ()) or key in (theirs[s].get("infinite") or ())]
    if infinite:
        return None, (f"per-volume {key} is infinite for {len(infinite)} subject(s) (a class missed or hallucinated): "
                      "no finite Δ")
    kept = [s for s in subjects if _finite(ours[s].get(key)) and _finite(theirs[s].get(key))]
    if not kept:
        return None, f"every per-volume {key} pair has a missing value"
    values = np.array([ours[s][key] - theirs[s][key] for s in kept], dtype=np.float64)
    return ImageDifferences(values, None, len(subjects) - len(kept), unit="subjects"), ""


def cluster_totals(values: np.ndarray, clusters: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(sum of the values, number of values) per cluster; each value its own cluster when None."""
    if clusters is None:
        return values.astype(np.float64), np.ones(len(values))
    names, index = np.unique(clusters, return_inverse=True)
    return np.bincount(index, weights=values, minlength=len(names)), np.bincount(index, minlength=len(names)).astype(float)


def t_quantile(df: float, confidence: float = 0.95) -> float:
    from scipy.special import stdtrit  # scipy.special loads in ~0.1 s; scipy.stats takes 1.5 s

    return float(stdtrit(df, 0.5 + confidence / 2))


def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of independent values (n - 1 degrees of freedom)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    half = t_quantile(n - 1, confidence) * values.std(ddof=1) / math.sqrt(n)
    return float(values.mean() - half), float(values.mean() + half)


def clustered_t_interval(values: np.ndarray, clusters: np.ndarray | None, confidence: float = 0.95) -> tuple[float, float]:
    """Interval of the mean of ``values`` whose clusters (subjects) are the independent units:
    the cluster-robust standard error (CR1) with k - 1 degrees of freedom for k clusters. With
    one value per cluster, or clusters of equal size, it is the t-interval of the cluster means."""
    totals, sizes = cluster_totals(values, clusters)
    k, mean = len(totals), float(values.mean())
    variance = k / (k - 1) * float(np.sum((totals - sizes * mean) ** 2)) / float(sizes.sum()) ** 2
    half = t_quantile(k - 1, confidence) * math.sqrt(variance)
    return mean - half, mean + half


def hierarchical_bootstrap(per_seed: list[np.ndarray], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> np.ndarray:
    """Bootstrap means of the mean Δ: resample seeds, then images within each drawn seed.

    Not what the table's intervals use: with few seeds its percentile interval is far too
    narrow (benchmarks/calibration.py measures its coverage beside the t-interval's)."""
    rng = np.random.default_rng(seed)
    n = len(per_seed)
    pick = rng.integers(0, n, (samples, n))
    values = np.empty((samples, n))
    for s, diffs in enumerate(per_seed):
        where = np.nonzero(pick == s)
        count, m = len(where[0]), len(diffs)
        means = np.empty(count)
        chunk = max(1, 2_000_000 // max(m, 1))  # bounded memory for large test sets
        for start in range(0, count, chunk):
            stop = min(count, start + chunk)
            means[start:stop] = diffs[rng.integers(0, m, (stop - start, m))].mean(1)
        values[where] = means
    return values.mean(1)


def sign_flip_p(values: np.ndarray, seed: int = 0, resamples: int = MONTE_CARLO_RESAMPLES) -> float:
    """Two-sided paired sign-flip permutation p-value of the mean: the share of sign patterns
    whose |mean| reaches the observed one. Exact (every pattern) up to 2**16 patterns, else
    Monte Carlo with the observed pattern counted, ``(hits + 1) / (resamples + 1)``; never 0.

    Written with numpy rather than ``scipy.stats.permutation_test`` (the tests check it
    against that and against enumeration): importing scipy.stats alone costs about 1.5 s,
    a third of the report's time budget.
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if not np.all(np.isfinite(values)):
        raise ValueError("sign_flip_p: non-finite values (drop them first: they are missing data)")
    if n == 0 or np.all(values == 0):
        return 1.0
    observed = abs(values.mean())
    tolerance = 1e-12 * max(1.0, observed)  # patterns equal to the observed up to rounding count as extreme
    if n <= EXACT_PERMUTATION_MAX:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(signs @ values) / n >= observed - tolerance))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, 1000):
        signs = rng.choice((-1.0, 1.0), size=(min(1000, resamples - start), n))
        hits += int(np.sum(np.abs(signs @ values) / n >= observed - tolerance))
    return (hits + 1) / (resamples + 1)


def smallest_sign_flip_p(n: int) -> float:
    """The smallest p ``sign_flip_p`` can return for n values: every sign the same."""
    return 2.0 / 2**n if n <= EXACT_PERMUTATION_MAX else 1.0 / (MONTE_CARLO_RESAMPLES + 1)


# Which test a Δ gets, by design (``paired_stats``): across seeds, conditional on one model, or none.
ACROSS_SEEDS, CONDITIONAL, NO_TEST = "seeds", "images", "none"


def paired_stats(per_seed: list[ImageDifferences], pairing: str) -> dict[str, Any]:
    """The Δ of one column: its mean over seeds (each seed's mean per-image difference) and
    the inference its design allows (``level``):

    - two or more seeds (``seeds``): on the per-seed Δ, the trained model being the unit; a
      t-interval with n - 1 degrees of freedom and the exact sign-flip p;
    - one seed, same weights (``images``): conditional on that one trained model, over its test
      images, or over subjects when the rows name them (``unit``): the cluster-robust
      t-interval and a sign-flip p on the subjects' summed differences;
    - one seed, retrained (``none``): no test. The difference of two independently trained
      models includes their training variation, which one model per side cannot measure.
    """
    deltas = np.array([d.values.mean() for d in per_seed])
    n = len(deltas)
    out: dict[str, Any] = {"mean": float(deltas.mean()), "per_seed": deltas.tolist(), "n": n,
                           "std": float(deltas.std(ddof=1)) if n > 1 else None,
                           "dropped": int(sum(d.dropped for d in per_seed)),
                           "ci_low": None, "ci_high": None, "p": None, "unit": None}
    if n > 1:
        out.update(level=ACROSS_SEEDS, unit="seeds", p=sign_flip_p(deltas))
        out["ci_low"], out["ci_high"] = t_interval(deltas)
        return out
    diffs = per_seed[0]
    totals, _ = cluster_totals(diffs.values, diffs.subjects)
    if pairing != "same weights" or len(totals) < 2:
        out.update(level=NO_TEST)
        return out
    out.update(level=CONDITIONAL, unit="subjects" if diffs.subjects is not None else diffs.unit, p=sign_flip_p(totals),
               units=len(totals))
    out["ci_low"], out["ci_high"] = clustered_t_interval(diffs.values, diffs.subjects)
    return out


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given)."""
    order = np.argsort(p_values, kind="stable")
    m = len(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()


def _pairs(row: Row, base: Row) -> tuple[list[Any], list[Any]]:
    """(seeds the row shares with ``base``, seeds only the row has)."""
    return [s for s in row.seeds if s in base.runs], [s for s in row.seeds if s not in base.runs]


def _column_stats(row: Row, base: Row, seeds: list[Any], column: Column, pairing: str) -> tuple[dict | None, str]:
    diffs, reasons = [], []
    for s in seeds:
        d, why = (volume_differences(row.runs[s], base.runs[s], column.per_volume) if column.per_volume else
                  image_differences(row.runs[s], base.runs[s], column.per_image))
        (diffs.append(d) if d is not None else reasons.append(f"seed {s}: {why}"))
    if reasons or not diffs:
        return None, "; ".join(reasons)
    return paired_stats(diffs, pairing), ""


def _same_values(a: Row, b: Row, columns: tuple[Column, ...]) -> bool:
    """Whether two rows hold the same per-image values of every paired column, seed for seed."""
    columns = tuple(c for c in columns if c.per_image)  # equal images mean equal volumes
    if a.seeds != b.seeds:
        return False
    for s in a.seeds:
        ours = {r["id"]: [r.get(c.per_image) for c in columns] for r in a.runs[s].per_image or ()}
        theirs = {r["id"]: [r.get(c.per_image) for c in columns] for r in b.runs[s].per_image or ()}
        if not ours or ours != theirs:
            return False
    return True


def summarise(runs: Iterable[RunRecord | dict[str, Any]],
              protocol: str = "standard") -> tuple[list[Row], list[tuple[str, str]]]:
    """Rows with their metric summaries and paired tests (``runs``: records, or results.json
    dicts, read as records by ``group_rows``).

    Holm's correction runs within two families: the across-seed tests and the conditional (†)
    ones, never mixed. A row whose per-image values equal an earlier row's against the same
    baseline (a tuning that kept the defaults) is not tested again: ``same_as`` names that row."""
    rows, duplicates = group_rows(runs)
    columns = PROTOCOLS[protocol]["paired"]
    for row in rows:
        if row.baseline is None:
            continue
        seeds, missing = _pairs(row, row.baseline)
        if missing:
            row.notes.append(f"seeds {', '.join(map(str, missing))} have no `none` run: not in the Δ")
        kinds = {pairing_kind(row.runs[s], row.baseline.runs[s]) for s in seeds}
        row.pairing = kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "")
        row.same_as = next((r for r in rows if r is not row and r.baseline is row.baseline and r.stats
                            and r.same_as is None and _same_values(row, r, columns)), None)
        for column in columns:
            test, why = _column_stats(row, row.baseline, seeds, column, row.pairing)
            if test is None:
                row.notes.append(f"Δ {column.title} not computed: {why}")
                continue
            row.stats[column.key] = test
            if test["dropped"]:
                row.notes.append(f"Δ {column.title}: {test['dropped']} image pairs with a non-finite value left out")
        if row.plain is not None:
            plain_seeds, _ = _pairs(row, row.plain)
            for column in columns:
                test, _ = _column_stats(row, row.plain, plain_seeds, column, "retrained")
                if test is not None:
                    row.plain_stats[column.key] = test
    for tests in holm_families(rows).values():
        for test, adjusted in zip(tests, holm([t["p"] for t in tests])):
            test["p_holm"] = adjusted
    for row in rows:
        if row.same_as is not None:
            for key, test in row.stats.items():
                test.update(same_as=f"{row.same_as.label} {row.same_as.head}", p_holm=row.same_as.stats.get(key, {}).get("p_holm"))
    return rows, duplicates


def holm_families(rows: list[Row], levels: tuple[str, ...] = (ACROSS_SEEDS, CONDITIONAL)) -> dict[str, list[dict[str, Any]]]:
    """The tests of each Holm family (rows marked ``same_as`` are not tested again); with
    ``levels=(NO_TEST,)`` the Δs left untested."""
    return {level: [t for r in rows if r.same_as is None for t in (*r.stats.values(), *r.plain_stats.values())
                    if t["level"] == level] for level in levels}


def _seeds_for_a_star(tests: int) -> int | None:
    """The fewest seeds (all agreeing in sign) whose sign-flip p survives Holm over ``tests``."""
    return next((k for k in range(2, 64) if tests * smallest_sign_flip_p(k) < ALPHA), None)


def reachability(rows: list[Row]) -> list[str]:
    """Per Holm family: the smallest Holm-adjusted p it can reach, and (across seeds) how many
    seeds a star would need with this many tests."""
    lines = []
    families = holm_families(rows)
    for level, tests in families.items():
        if not tests:
            continue
        m = len(tests)
        sizes = [t["n"] if level == ACROSS_SEEDS else t.get("units", 0) for t in tests]
        best = min(1.0, m * min(smallest_sign_flip_p(k) for k in sizes))
        needed = _seeds_for_a_star(m)
        if level == ACROSS_SEEDS:
            star = "a star is reachable" if best < ALPHA else "no star is reachable"
            need = (f"with {m} tests a star needs at least {needed} seeds (every seed agreeing in sign)" if needed
                    else f"with {m} tests no seed count makes a star reachable")
            lines.append(f"Across-seed family: {m} tests with {_span(sizes)} paired seeds; the smallest Holm-adjusted p "
                         f"this table can reach is {best:.2g} ({star}); {need}.")
        else:
            lines.append(f"Conditional (†) family: {m} tests over {_span(sizes)} {tests[0]['unit']}; "
                         f"the smallest Holm-adjusted p this table can reach is {best:.2g}.")
    untested = holm_families(rows, (NO_TEST,))[NO_TEST]
    if untested:
        m = len(untested) + len(families[ACROSS_SEEDS])
        if needed := _seeds_for_a_star(m):
            lines.append(f"No test: {len(untested)} Δs of one retrained model per side. Tested across seeds, with "
                         f"{m} tests in that family a star would need at least {needed} seeds per configuration.")
    return lines


def _span(values: list[int]) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


