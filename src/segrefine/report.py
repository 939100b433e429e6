"""Rebuild the results table from runs: ``segrefine-report DIR [DIR ...] [--metrics P] [--out DIR]``.

Reads every ``results.json`` under the given folders (or, with ``--wandb ENTITY/PROJECT``,
the runs of one experiment of an online wandb project: ``--experiment``, ``--group``,
``--job-type``, ``--tag`` select them). One row per exact configuration: the resolved config
without the seed and run-only keys (``segrefine.runconfig.comparable_config``), labelled by
what differs between rows; the seeds of a row are its replicates. Each head is paired with
the ``none`` row whose config differs only in the head, seed with seed and image with
image: per seed the mean per-image difference (the aggregation of the column beside it),
across seeds its mean with a hierarchical bootstrap CI (seeds, then images within seeds) and
a sign-flip permutation p-value on the per-seed means, Holm-corrected across the table.
Runs that did not complete, duplicates and non-test evaluations are listed, never averaged.
Writes Markdown, CSV, LaTeX and figures (from saved predictions; nothing is re-run) and
prints the Markdown.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from segrefine.results import FILENAME
from segrefine.runconfig import comparable_config, config_differences

BASELINE_HEAD = "none"
HEAD_ORDER = ("none", "densecrf", "crfrnn", "pointrend")
BOOTSTRAP_SAMPLES = 10_000
EXACT_PERMUTATION_MAX = 16  # exact sign-flip enumeration up to 2**16 patterns
ALPHA = 0.05


@dataclass(frozen=True)
class Column:
    """A table column: results.json metric key, title, per-image row key (paired columns)."""

    key: str
    title: str
    per_image: str | None = None
    scale: float = 100.0


# Pooled columns are shown as they are; paired columns are image means, each with a Δ beside it.
PROTOCOLS = {
    "standard": {
        "pooled": (
            Column("test/iou", "IoU % (pooled)"),
            Column("test/dice", "Dice % (pooled)"),
            Column("test/pixel_acc", "PA % (pooled)"),
            Column("test/boundary_f1", "BF1 % (pooled)"),
        ),
        "paired": (
            Column("test/iou_image", "IoU % (img mean)", "iou"),
            Column("test/boundary_f1_image", "BF1 % (img mean)", "boundary_f1"),
        ),
    },
    "unet_crfrnn": {
        "pooled": (),
        "paired": (
            Column("test/unet_crfrnn/iu", "IU %", "unet_crfrnn/iu"),
            Column("test/unet_crfrnn/dsc", "DSC %", "unet_crfrnn/dsc"),
            Column("test/unet_crfrnn/pa", "PA (fg recall) %", "unet_crfrnn/pa"),
        ),
    },
}
COST = Column("test/ms_per_image", "ms/img", scale=1.0)
PROTOCOL_NOTES = {
    "standard": "standard protocol: IoU/Dice over foreground classes; *pooled* = over the split's confusion "
                "matrix; *img mean* = per-image values averaged over images (the aggregation the Δ uses).",
    "unet_crfrnn": "unet_crfrnn protocol (the origin study's evaluation, C classes): per image IU and DSC over all "
                   "classes including background, or over background and one merged foreground in runs with "
                   "metrics.merge_foreground=true (0 for a class empty in prediction or truth; DSC +1 smoothed), "
                   "PA = foreground recall (not pixel accuracy), each averaged over images.",
}


@dataclass
class Study:
    runs: list[dict[str, Any]] = field(default_factory=list)
    incomplete: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # complete, but not table material


# -- loading ---------------------------------------------------------------------------


def check_run(run: Any) -> str | None:
    """Why a parsed results.json cannot go into the table (None if it can)."""
    if not isinstance(run, dict):
        return f"{FILENAME} holds a JSON {type(run).__name__}, not a run record"
    if run.get("status") != "complete":
        return f"status {run.get('status')!r}"
    if not isinstance(run.get("config"), dict) or not run["config"]:
        return "no config recorded: its configuration cannot be told"
    if not isinstance(run.get("metrics"), dict):
        return "no metrics recorded"
    per_image = run.get("per_image", [])
    if not isinstance(per_image, list) or not all(isinstance(r, dict) and "id" in r for r in per_image):
        return "per_image is not a list of rows with ids"
    return None


def _error_reason(job: Path) -> str:
    error = job / "error.txt"
    if not error.exists():
        return f"no {FILENAME} (failed or still running)"
    try:
        lines = error.read_text(errors="replace").strip().splitlines()
    except OSError as e:
        return f"failed (error.txt unreadable: {e})"
    return f"failed: {lines[0]}" if lines else "failed (error.txt is empty)"


def load_study(paths: Iterable[str | Path]) -> Study:
    """Complete test runs (each with ``_path``), other complete runs (skipped) and broken run folders."""
    study = Study()
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"report: {root} does not exist")
        for result in sorted(root.rglob(FILENAME)):
            where = str(result.parent)
            try:
                run = json.loads(result.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                study.incomplete.append((where, f"unreadable {FILENAME}: {e}"))
                continue
            reason = check_run(run)
            if reason:
                study.incomplete.append((where, reason))
                continue
            split = run.get("split", "test")
            if split != "test":
                study.skipped.append((where, f"split {split!r} (tuning evaluation), not a test result"))
                continue
            run["_path"] = where
            study.runs.append(run)
        # A Hydra job folder without results.json: started but never finished.
        for hydra_dir in sorted(root.rglob(".hydra")):
            job = hydra_dir.parent
            if not (job / FILENAME).exists() and (hydra_dir / "config.yaml").exists():
                study.incomplete.append((str(job), _error_reason(job)))
    return study


WANDB_EXTRA_KEYS = ("experiment", "provenance", "split", "source")  # beside the curated config in a wandb run's config
_NON_FINITE = {"nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}


def wandb_filters(group: str | None = None, job_type: str | None = None, experiment: str | None = None,
                  tags: Iterable[str] = ()) -> dict[str, Any] | None:
    """The server-side query (MongoDB-style, as ``wandb.Api().runs(filters=...)`` takes it);
    None when nothing is asked. Runs from before the ``experiment`` config key name their
    experiment by their group, so ``experiment`` matches either."""
    conditions: list[dict[str, Any]] = []
    if group is not None:
        conditions.append({"group": group})
    if job_type is not None:
        conditions.append({"jobType": job_type})
    if experiment is not None:
        conditions.append({"$or": [{"config.experiment": experiment},
                                   {"$and": [{"config.experiment": {"$exists": False}}, {"group": experiment}]}]})
    conditions += [{"tags": {"$in": [tag]}} for tag in tags]  # one condition per tag: all must be present
    if not conditions:
        return None
    return conditions[0] if len(conditions) == 1 else {"$and": conditions}


def _undefined_as_none(value: Any) -> Any:
    """What results.json stores for a number that is not one (NaN, ±inf): null. wandb keeps
    them as floats or as the strings ``NaN``/``Infinity``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str) and value.strip().lower() in _NON_FINITE:
        return None
    return value


def _summary_number(value: Any) -> tuple[bool, Any]:
    """(is a metric, its value): numbers, and NaN/inf however wandb wrote them, as None."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number or (isinstance(value, str) and _undefined_as_none(value) is None):
        return True, _undefined_as_none(value)
    return False, None


def load_wandb_study(project: str, api: Any = None, *, group: str | None = None, job_type: str | None = None,
                     experiment: str | None = None, tags: Iterable[str] = ()) -> Study:
    """Runs of an online wandb project (``ENTITY/PROJECT``) as results.json-like dicts.

    Filters (``group``, ``job_type``, ``experiment`` = the config's ``experiment``, or the
    group of runs from before that key; ``tags``: all must be present) are sent to the server
    and checked again here. Runs of more than one experiment are refused unless
    ``experiment`` chooses one: different studies must not average together, nor pair a
    head with another study's baseline. The config is the run's curated config without the
    keys logged beside it (``WANDB_EXTRA_KEYS``); per-image rows come from each run's
    ``test/per_image`` table, NaN as null (as in results.json). Tuning evaluations
    (``split`` val) are listed as skipped.
    """
    tags = tuple(tags)
    if api is None:
        import wandb

        api = wandb.Api()
    filters = wandb_filters(group, job_type, experiment, tags)
    study = Study()
    experiments: dict[str, int] = {}
    for run in api.runs(project, filters=filters):
        config = dict(run.config)
        extras = {key: config.pop(key) for key in WANDB_EXTRA_KEYS if key in config}
        run_experiment = extras.get("experiment") if "experiment" in extras else run.group
        if not _wandb_run_matches(run, run_experiment, group, job_type, experiment, tags):
            continue  # the server's filter let it through; the selection is what was asked for
        experiments[str(run_experiment)] = experiments.get(str(run_experiment), 0) + 1
        name = f"{project}/{run.id}"
        split = extras.get("split") or "test"
        if run.state != "finished":
            study.incomplete.append((name, f"wandb state {run.state!r}"))
            continue
        if split != "test":
            study.skipped.append((name, f"split {split!r} (tuning evaluation), not a test result"))
            continue
        if "test/iou" not in run.summary:
            study.incomplete.append((name, "finished without test metrics (no test/iou in its summary)"))
            continue
        metrics = {}
        for key, value in dict(run.summary).items():
            is_metric, number = _summary_number(value)
            if is_metric:
                metrics[key] = number
        record = {
            "status": "complete",
            "job_type": run.job_type,
            "experiment": run_experiment,
            "seed": config.get("seed"),
            "split": split,
            "config": config,  # the curated config (older runs: the resolved one); rows compare it as for folders
            "metrics": metrics,
            "per_image": _wandb_per_image(run),
            "wandb": {"id": run.id},
            "_path": name,
        }
        # Curated configs drop metrics.protocol (a run-only key): read it where a run recorded it.
        metrics_cfg = run.config.get("metrics")
        protocol = run.summary.get("metrics_protocol") or (metrics_cfg.get("protocol") if isinstance(metrics_cfg, dict)
                                                            else None)
        if isinstance(protocol, str):
            record["metrics_protocol"] = protocol
        if isinstance(extras.get("source"), dict):
            record["source"] = extras["source"]
        reason = check_run(record)
        if reason:
            study.incomplete.append((name, reason))
        else:
            study.runs.append(record)
    if experiment is None and len(experiments) > 1:
        listed = ", ".join(f"{e} ({n} run{'s' if n != 1 else ''})" for e, n in sorted(experiments.items()))
        raise ValueError(
            f"{project} holds runs of {len(experiments)} experiments: {listed}. Different studies must not "
            "average together nor share baselines; choose one with --experiment NAME (experiment= in Python)"
        )
    return study


def _wandb_run_matches(run: Any, run_experiment: Any, group: str | None, job_type: str | None,
                       experiment: str | None, tags: tuple[str, ...]) -> bool:
    return ((group is None or run.group == group)
            and (job_type is None or run.job_type == job_type)
            and (experiment is None or run_experiment == experiment)
            and set(tags) <= set(run.tags or ()))


def _wandb_per_image(run: Any) -> list[dict[str, Any]]:
    entry = run.summary.get("test/per_image")
    if not entry or "path" not in entry:
        return []
    root = Path.home() / ".cache" / "segrefine" / "wandb" / str(run.id)
    with run.file(entry["path"]).download(replace=True, root=str(root)) as f:
        table = json.load(f)  # Python's json reads a bare NaN as float nan
    return [{c: (v if c == "id" else _undefined_as_none(v)) for c, v in zip(table["columns"], row)}
            for row in table["data"]]


def study_protocol(runs: list[dict[str, Any]], requested: str | None) -> str:
    """``requested``, or the protocol every run recorded (``metrics=...``); refuses a mix."""
    if requested is not None:
        if requested not in PROTOCOLS:
            raise ValueError(f"--metrics {requested!r}: choose one of {', '.join(PROTOCOLS)}")
        return requested
    recorded = {run.get("metrics_protocol") or "standard" for run in runs}
    if len(recorded) > 1:
        raise ValueError(
            f"the runs were made with different metric protocols ({', '.join(sorted(recorded))}); "
            f"choose the table's with --metrics {'|'.join(PROTOCOLS)}"
        )
    return recorded.pop() if recorded else "standard"


# -- rows: one per exact configuration --------------------------------------------------------


def head_name(run: dict[str, Any]) -> str:
    return str((run["config"].get("head") or {}).get("name", run.get("head")))


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(key: str, value: Any) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "name":
        return str(value)
    if leaf == "image_size":
        return f"{value}px"
    if leaf == "encoder_name" and isinstance(value, str) and value.startswith("resnet"):
        return "r" + value[len("resnet"):]
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"{leaf}={value}"


def config_labels(configs: list[dict[str, Any]]) -> list[str]:
    """A short label per config naming what differs between them (the head aside).

    A differing subtree with a ``name`` (backbone, optim, ...) is named by it, with its
    variant (``fcn-8s``); its other keys appear only where they do not follow from the name.
    The data name appears only when it differs itself (e.g. ``fcn-8s r18 64px``).
    """
    flat = [_flatten(c) for c in configs]
    differing = sorted({k for f in flat[1:] for k in config_differences(flat[0], f)}) if len(flat) > 1 else []
    subtrees: dict[str, list[str]] = {}
    for key in differing:
        prefix = key.rsplit(".", 1)[0] if "." in key else ""
        if prefix.split(".")[0] != "head" and not key.endswith("._target_"):
            subtrees.setdefault(prefix, []).append(key)
    order = sorted(subtrees, key=lambda p: (p == "data", p != "backbone", p))
    labels = []
    for f in flat:
        parts: list[str] = []
        for prefix in order:
            keys = subtrees[prefix]
            name_key = f"{prefix}.name" if prefix else "name"
            shown = [k for k in keys if k != name_key]
            if name_key in keys:  # keys that follow from the name (e.g. a backbone's defaults) are not news
                same_name = [g for g in flat if g.get(name_key) == f.get(name_key)]
                shown = [k for k in shown
                         if len({json.dumps(g.get(k), sort_keys=True, default=str) for g in same_name}) > 1]
            if name_key in f and (name_key in keys or (prefix != "data" and shown)):
                part = str(f[name_key])
                variant = f"{prefix}.variant"
                if variant in f:  # fcn-8s: the variant is part of the model's name
                    part, shown = f"{part}-{f.get(variant)}", [k for k in shown if k != variant]
                parts.append(part)
            parts += [_short(k, f.get(k, "–")) for k in shown]
        labels.append(" ".join(parts) or "all runs")
    return labels


@dataclass
class Row:
    config: dict[str, Any]  # comparable config without the seed
    runs: dict[Any, dict[str, Any]]  # seed -> run
    label: str = ""
    head: str = ""
    baseline: "Row | None" = None
    pairing: str = ""  # same weights | retrained | mixed
    notes: list[str] = field(default_factory=list)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # per paired column key

    @staticmethod
    def value(run: dict[str, Any], column: Column) -> float | None:
        return run_value(run, column)

    @property
    def seeds(self) -> list[Any]:
        return sorted(self.runs, key=str)


def group_rows(runs: list[dict[str, Any]]) -> tuple[list[Row], list[tuple[str, str]]]:
    """Rows of exact configurations, and duplicates (same config and seed: listed, not used)."""
    groups: dict[str, tuple[dict, dict[Any, list[dict]]]] = {}
    for run in runs:
        config = comparable_config(run["config"], drop=("seed",))
        key = json.dumps(config, sort_keys=True, default=str)
        groups.setdefault(key, (config, {}))[1].setdefault(run["config"].get("seed", run.get("seed")), []).append(run)
    rows, duplicates = [], []
    for config, by_seed in groups.values():
        kept = {}
        for seed, members in by_seed.items():
            if len(members) == 1:
                kept[seed] = members[0]
                continue
            where = ", ".join(m["_path"] for m in members)
            for m in members:
                duplicates.append((m["_path"], f"duplicate: same config and seed {seed} as {where}; not averaged, "
                                               "remove all but one"))
        if kept:
            rows.append(Row(config=config, runs=kept, head=head_name(next(iter(kept.values())))))
    for row, label in zip(rows, config_labels([r.config for r in rows])):
        row.label = label
    _label_head_variants(rows)
    order = {h: i for i, h in enumerate(HEAD_ORDER)}
    rows.sort(key=lambda r: (r.label, order.get(r.head, len(order)), r.head, json.dumps(r.config, sort_keys=True, default=str)))
    _find_baselines(rows)
    return rows, duplicates


def _find_baselines(rows: list[Row]) -> None:
    """Each head's baseline: the ``none`` row whose config differs only in ``head``."""
    bases = [r for r in rows if r.head == BASELINE_HEAD]
    for row in rows:
        if row.head == BASELINE_HEAD:
            continue
        matches = [b for b in bases if all(k.startswith("head.") for k in config_differences(row.config, b.config))]
        if len(matches) == 1:
            row.baseline = matches[0]
        elif not matches:
            row.notes.append("unpaired: no `none` row whose config differs only in the head")
        else:
            row.notes.append(f"unpaired: {len(matches)} `none` rows differ only in the head")


def _label_head_variants(rows: list[Row]) -> None:
    """Rows that share label and head name differ in head settings: name those in the label."""
    clashes: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        clashes.setdefault((row.label, row.head), []).append(row)
    for same in clashes.values():
        if len(same) < 2:
            continue
        flat = [_flatten(r.config.get("head") or {}, "head.") for r in same]
        keys = sorted({k for f in flat[1:] for k in config_differences(flat[0], f)})
        for row, f in zip(same, flat):
            row.label = " ".join([row.label, *(_short(k, f.get(k, "–")) for k in keys)])


def _pairing_kind(run: dict[str, Any], base: dict[str, Any]) -> str:
    """*same weights* when ``run`` evaluated the baseline's own checkpoint under another head."""
    source = run.get("source") if run.get("job_type") == "eval" else None
    if not isinstance(source, dict):
        return "retrained"
    if isinstance(source.get("run_config"), dict):
        # Compared without the seed on both sides, the seed separately, so either form of the record works.
        same = (comparable_config(source["run_config"], drop=("seed",)) == comparable_config(base["config"], drop=("seed",))
                and source.get("seed", source["run_config"].get("seed")) == base["config"].get("seed"))
    elif source.get("run_id") and (base.get("wandb") or {}).get("id"):  # read from wandb: the training run's id
        same = source["run_id"] == base["wandb"]["id"]
    else:  # evaluations recorded before the source's config was stored
        same = source.get("head") == head_name(base) and base.get("job_type", "train") == "train"
    return "same weights" if same else "retrained"


# -- statistics --------------------------------------------------------------------------


def run_value(run: dict[str, Any], column: Column) -> float | None:
    """A run's number for a column: its metric, else (paired columns) the mean of its per-image rows."""
    value = run["metrics"].get(column.key)
    if value is None and column.per_image and run.get("per_image"):
        values = [r.get(column.per_image) for r in run["per_image"]]
        if all(isinstance(v, (int, float)) for v in values):
            value = float(np.mean(values))
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def mean_spread(values: list[float | None]) -> tuple[float, float | None, int]:
    """(mean, sample std or None when n = 1, n); NaN mean when any value is missing."""
    if not values or any(v is None for v in values):
        return math.nan, None, len(values)
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None), len(values)


def image_differences(run: dict[str, Any], base: dict[str, Any], key: str) -> tuple[np.ndarray | None, str]:
    """Per-image ``run - base`` on ``key``, images matched by id; (None, why) if they do not pair."""
    ours = {r["id"]: r.get(key) for r in run.get("per_image", [])}
    theirs = {r["id"]: r.get(key) for r in base.get("per_image", [])}
    if not ours or not theirs:
        return None, "no per-image rows"
    if set(ours) != set(theirs):
        return None, f"test images differ ({len(set(ours) ^ set(theirs))} ids in one run only)"
    ids = sorted(ours)
    if any(not isinstance(ours[i], (int, float)) or not isinstance(theirs[i], (int, float)) for i in ids):
        return None, f"per-image {key} missing"
    return np.array([ours[i] - theirs[i] for i in ids], dtype=np.float64), ""


def hierarchical_bootstrap(per_seed: list[np.ndarray], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> np.ndarray:
    """Bootstrap means of the mean Δ: resample seeds, then images within each drawn seed."""
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


def sign_flip_p(values: np.ndarray, seed: int = 0, resamples: int = 9_999) -> float:
    """Two-sided paired sign-flip permutation p-value of the mean: the share of sign patterns
    whose |mean| reaches the observed one. Exact (every pattern) up to 2**16 patterns, else
    Monte Carlo with the observed pattern counted, ``(hits + 1) / (resamples + 1)``.

    Written with numpy rather than ``scipy.stats.permutation_test`` (the tests check it
    against that and against enumeration): importing scipy.stats alone costs about 1.5 s,
    a third of the report's time budget.
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
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


def paired_stats(per_seed: list[np.ndarray]) -> dict[str, Any]:
    """Mean Δ over seeds, its spread, CI and p. With one seed, CI and p are over that
    model's test images (``level = "images"``): no inference across seeds is possible."""
    deltas = np.array([d.mean() for d in per_seed])
    out: dict[str, Any] = {"mean": float(deltas.mean()), "per_seed": deltas.tolist(), "n": len(deltas)}
    boot = hierarchical_bootstrap(per_seed)  # one seed: a plain bootstrap over its images
    if len(deltas) > 1:
        out.update(std=float(deltas.std(ddof=1)), p=sign_flip_p(deltas), level="seeds")
    else:
        out.update(std=None, p=sign_flip_p(per_seed[0]), level="images")
    out["ci_low"], out["ci_high"] = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
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


def summarise(runs: list[dict[str, Any]], protocol: str = "standard") -> tuple[list[Row], list[tuple[str, str]]]:
    """Rows with their metric summaries and paired tests (Holm across the whole table)."""
    rows, duplicates = group_rows(runs)
    columns = PROTOCOLS[protocol]["paired"]
    for row in rows:
        if row.baseline is None:
            continue
        seeds = [s for s in row.seeds if s in row.baseline.runs]
        missing = [s for s in row.seeds if s not in row.baseline.runs]
        if missing:
            row.notes.append(f"seeds {', '.join(map(str, missing))} have no `none` run: not in the Δ")
        kinds = {_pairing_kind(row.runs[s], row.baseline.runs[s]) for s in seeds}
        row.pairing = kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "")
        for column in columns:
            diffs, reasons = [], []
            for s in seeds:
                d, why = image_differences(row.runs[s], row.baseline.runs[s], column.per_image)
                (diffs.append(d) if d is not None else reasons.append(f"seed {s}: {why}"))
            if reasons:
                row.notes.append(f"Δ {column.title} not computed: {'; '.join(reasons)}")
            elif diffs:
                row.stats[column.key] = paired_stats(diffs)
    tests = [row.stats[c.key] for row in rows for c in columns if c.key in row.stats]
    for test, adjusted in zip(tests, holm([t["p"] for t in tests])):
        test["p_holm"] = adjusted
    return rows, duplicates


# -- tables ------------------------------------------------------------------------------


def _stars(p: float) -> str:
    return "**" if p < 0.01 else "*" if p < ALPHA else ""


def _metric_cell(row: Row, column: Column) -> str:
    mean, std, _ = mean_spread([run_value(r, column) for r in row.runs.values()])
    if math.isnan(mean):
        return "–"
    spread = "–" if std is None else f"{std * column.scale:.2f}"
    return f"{mean * column.scale:.2f} ± {spread}"


def _delta_cell(test: dict[str, Any] | None, column: Column) -> str:
    if test is None:
        return "–"
    s = column.scale
    mark = "" if test["level"] == "seeds" else "†"
    return (f"{test['mean'] * s:+.2f} [{test['ci_low'] * s:+.2f}, {test['ci_high'] * s:+.2f}]{mark} "
            f"p={test['p']:.2g} (Holm {test['p_holm']:.2g}){_stars(test['p_holm'])}")


def header(protocol: str) -> list[str]:
    spec = PROTOCOLS[protocol]
    paired = [t for c in spec["paired"] for t in (c.title, f"Δ {c.title}")]
    return ["configuration", "head", "pairing", "seeds", *[c.title for c in spec["pooled"]], *paired, COST.title, "params"]


def cells(row: Row, protocol: str) -> list[str]:
    spec = PROTOCOLS[protocol]
    params = next(iter(row.runs.values()))["metrics"].get("params")
    out = [row.label, row.head, row.pairing or ("baseline" if row.head == BASELINE_HEAD else "–"), str(len(row.runs))]
    out += [_metric_cell(row, c) for c in spec["pooled"]]
    for c in spec["paired"]:
        out += [_metric_cell(row, c), _delta_cell(row.stats.get(c.key), c)]
    out += [_metric_cell(row, COST), f"{params / 1e6:.2f}M" if params else "–"]
    return out


def footnotes(rows: list[Row], protocol: str) -> list[str]:
    tests = sum(len(r.stats) for r in rows)
    lines = [
        PROTOCOL_NOTES[protocol],
        "Cells: mean ± sample std over seeds (the trained model is the unit of replication; – = one seed). "
        "Δ: the row minus its `none` baseline (the `none` row whose config differs only in the head), "
        "per seed the mean per-image difference, then the mean over seeds; 95 % CI from a hierarchical "
        "bootstrap (seeds, then images within seeds); p from an exact paired sign-flip permutation test on the "
        "per-seed Δ (with n seeds the smallest possible p is 2/2^n: 0.25 for 3, 0.0625 for 5). "
        f"Holm correction across the {tests} tests of this table; * / ** = Holm-adjusted p < 0.05 / 0.01.",
        "Pairing: *same weights* = the baseline's own checkpoint evaluated under a post-hoc head; *retrained* = "
        "an independently trained model per seed, so the Δ includes training variation.",
    ]
    lines.append(timing_note(rows))
    if any(t["level"] == "images" for r in rows for t in r.stats.values()):
        lines.append("† one seed: no inference across seeds is possible; this CI and p are over the test images of "
                     "that single model (image-level test, labelled as such).")
    return lines


def timing_note(rows: list[Row]) -> str:
    """Where ms/img was measured; a table mixing machines or thread counts says so."""
    setups = {}
    for row in rows:
        for run in row.runs.values():
            timing = run.get("timing") or {}
            if not timing:
                setups.setdefault("not recorded (runs from before timing records)", []).append(row.label)
                continue
            where = f"GPU {timing['gpu']}" if timing.get("gpu") else f"CPU {timing.get('cpu')}"
            setups.setdefault(f"{where}, {timing.get('usable_cpus')} usable CPUs, {timing.get('torch_threads')} "
                              f"torch threads, torch {timing.get('torch')}", []).append(row.label)
    if len(setups) <= 1:
        return f"ms/img: backbone + head forward per test image, warm, on {next(iter(setups), 'no runs')}."
    return ("ms/img was measured on different setups, so it is not comparable across them: "
            + "; ".join(f"{setup} ({len(labels)} runs)" for setup, labels in setups.items()) + ".")


def pair_lines(rows: list[Row], protocol: str) -> list[str]:
    """Per pair: baseline, pairing, seeds and the per-seed Δ of each paired column; row notes."""
    lines = []
    for row in rows:
        if row.stats:
            per_seed = "; ".join(
                f"Δ {c.title}: " + ", ".join(f"{v * c.scale:+.2f}" for v in row.stats[c.key]["per_seed"])
                for c in PROTOCOLS[protocol]["paired"] if c.key in row.stats
            )
            seeds = [s for s in row.seeds if row.baseline and s in row.baseline.runs]
            lines.append(f"- {row.label} {row.head} vs {row.baseline.label} none ({row.pairing}; seeds "
                         f"{', '.join(map(str, seeds))}): per seed {per_seed}")
        lines += [f"- {row.label} {row.head}: {note}" for note in row.notes]
    return lines


def to_markdown(rows: list[Row], protocol: str = "standard") -> str:
    head = header(protocol)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells(row, protocol)) + " |" for row in rows]
    lines += ["", *footnotes(rows, protocol)]
    pairs = pair_lines(rows, protocol)
    if pairs:
        lines += ["", "Paired comparisons:", *pairs]
    return "\n".join(lines)


def to_latex(rows: list[Row], protocol: str = "standard") -> str:
    head = header(protocol)
    escape = lambda s: (s.replace("%", r"\%").replace("_", r"\_").replace("±", r"$\pm$")  # noqa: E731
                        .replace("Δ", r"$\Delta$").replace("†", r"$^\dagger$").replace("–", "--"))
    lines = [r"\begin{tabular}{" + "l" * 3 + "r" * (len(head) - 3) + "}", r"\toprule"]
    lines.append(" & ".join(escape(h) for h in head) + r" \\")
    lines.append(r"\midrule")
    lines += [" & ".join(escape(c) for c in cells(row, protocol)) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


DELTA_STATS = ("mean", "std", "ci_low", "ci_high", "p", "p_holm", "n", "level", "per_seed")


def numeric_record(row: Row, protocol: str) -> dict[str, Any]:
    """One row as plain numbers (unscaled; None where a value does not apply)."""
    spec = PROTOCOLS[protocol]
    record: dict[str, Any] = {
        "configuration": row.label, "head": row.head, "pairing": row.pairing,
        "baseline": row.baseline.label if row.baseline else None,
        "n": len(row.runs), "seeds": " ".join(map(str, row.seeds)),
        "params": next(iter(row.runs.values()))["metrics"].get("params"),
    }
    for column in (*spec["pooled"], *spec["paired"], COST):
        mean, std, _ = mean_spread([run_value(r, column) for r in row.runs.values()])
        record[f"{column.key}_mean"] = None if math.isnan(mean) else mean
        record[f"{column.key}_std"] = std
    for column in spec["paired"]:
        test = row.stats.get(column.key, {})
        for stat in DELTA_STATS:
            value = test.get(stat)
            record[f"delta_{column.per_image}_{stat}"] = " ".join(map(repr, value)) if stat == "per_seed" and value else value
    return record


def to_csv(rows: list[Row], protocol: str = "standard") -> str:
    """Unscaled numbers, one row per configuration; empty cells where a value does not apply."""
    records = [numeric_record(r, protocol) for r in rows]
    out = io.StringIO()
    columns = list(numeric_record(Row(config={}, runs={0: {"metrics": {}}}), protocol))
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in record.items()})
    return out.getvalue()


def frame_records(rows: list[Row], protocol: str = "standard") -> list[dict[str, Any]]:
    """One dict per row for a data frame: label, backbone, head, protocol, pairing and
    baseline as text, ``n_seeds`` as an int, every other value a float (unscaled; NaN where
    it does not apply). The same numbers as the CSV, without the per-seed lists."""
    records = []
    for row in rows:
        numbers = numeric_record(row, protocol)
        record: dict[str, Any] = {
            "configuration": numbers.pop("configuration"),
            "backbone": str((row.config.get("backbone") or {}).get("name", "")),
            "head": numbers.pop("head"),
            "protocol": protocol,
            "pairing": numbers.pop("pairing") or ("baseline" if row.head == BASELINE_HEAD else ""),
            "baseline": numbers.pop("baseline") or "",
            "n_seeds": numbers.pop("n"),
        }
        del numbers["seeds"]
        for key, value in numbers.items():
            if key.endswith("_per_seed"):
                continue
            if key.endswith("_level"):  # "seeds" | "images": what the CI and p are over
                record[key] = value or ""
            else:
                record[key] = math.nan if value is None else float(value)
        records.append(record)
    return records


def to_dataframe(source: "Study | Report | list[Row]", protocol: str | None = None):
    """The table as a ``pandas.DataFrame``, one row per exact configuration (see ``frame_records``).

    ``source``: a ``Study`` (summarised here, under ``protocol`` or the one its runs were
    made with), a ``Report`` (its rows and protocol) or rows from ``summarise``.
    """
    try:
        import pandas as pd  # only notebooks need it: the report itself does not
    except ImportError as e:
        raise ImportError("segrefine.report.to_dataframe needs pandas: pip install pandas") from e
    if isinstance(source, Report):
        if protocol not in (None, source.protocol):
            raise ValueError(f"protocol={protocol!r}, but the report was made with {source.protocol!r}: "
                             "write the report again with that protocol")
        rows, protocol = source.rows, source.protocol
    elif isinstance(source, Study):
        protocol = study_protocol(source.runs, protocol)
        rows, _ = summarise(source.runs, protocol)
    else:
        rows, protocol = list(source), protocol or "standard"
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol={protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    columns = list(frame_records([Row(config={}, runs={0: {"metrics": {}}})], protocol)[0])  # also for no rows
    return pd.DataFrame.from_records(frame_records(rows, protocol), columns=columns)


# -- writing -----------------------------------------------------------------------------


@dataclass
class Report:
    rows: list[Row]
    protocol: str
    paths: dict[str, Path]
    problems: list[tuple[str, str]]  # (where, reason): every run folder left out, and why


def write_report(study: Study, out_dir: str | Path, figures: bool = True, protocol: str | None = None) -> Report:
    """Write table.md, table.csv, table.tex (and figures) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    protocol = study_protocol(study.runs, protocol)
    rows, duplicates = summarise(study.runs, protocol)
    paths = {"markdown": out_dir / "table.md", "csv": out_dir / "table.csv", "latex": out_dir / "table.tex"}
    figure_notes: list[tuple[str, str]] = []
    if figures:
        from segrefine import figures as figs

        figure_notes = figs.draw_all(rows, PROTOCOLS[protocol]["paired"], COST, out_dir, paths)
    markdown = to_markdown(rows, protocol)
    if duplicates:
        markdown += "\n\nDuplicate runs (not averaged):\n" + "\n".join(f"- {w}: {r}" for w, r in duplicates)
    if study.incomplete:
        markdown += "\n\nIncomplete or unreadable runs (not averaged):\n" + "\n".join(f"- {w}: {r}" for w, r in study.incomplete)
    if study.skipped:
        markdown += "\n\nSkipped (not test results):\n" + "\n".join(f"- {w}: {r}" for w, r in study.skipped)
    if figure_notes:
        markdown += "\n\nFigures:\n" + "\n".join(f"- {w}: {r}" for w, r in figure_notes)
    paths["markdown"].write_text(markdown + "\n")
    paths["csv"].write_text(to_csv(rows, protocol))
    paths["latex"].write_text(to_latex(rows, protocol) + "\n")
    return Report(rows, protocol, paths, [*duplicates, *study.incomplete, *figure_notes])


def log_to_wandb(report: Report, project: str = "segrefine", mode: str = "offline", entity: str | None = None,
                 save_dir: str | Path = ".", group: str | None = None, sources: Iterable[str] = ()) -> str:
    """The table (numbers as numbers, unscaled) and figures as a wandb run of job_type=report
    in ``group`` (e.g. the experiment's); returns the run id."""
    import wandb

    run = wandb.init(project=project, entity=entity, group=group, job_type="report", mode=mode, dir=str(save_dir),
                     config={"metrics_protocol": report.protocol, "sources": list(sources)})
    try:
        records = [numeric_record(r, report.protocol) for r in report.rows]
        columns = list(records[0]) if records else []
        table = wandb.Table(columns=columns, data=[[rec[c] for c in columns] for rec in records])
        payload: dict[str, Any] = {"report/table": table}
        for name, path in report.paths.items():
            if path.suffix == ".png":
                payload[f"report/{name}"] = wandb.Image(str(path))
        run.log(payload)
        return run.id
    finally:
        wandb.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segrefine-report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="*", help="run or sweep folders to read results.json from")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from an online wandb project instead")
    parser.add_argument("--metrics", choices=list(PROTOCOLS), default=None,
                        help="metric protocol of the columns (default: the one the runs were made with)")
    parser.add_argument("--out", help="folder for table.md/.csv/.tex and figures (default: the first folder's report/)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--log-wandb", action="store_true", help="also log the table and figures as a wandb run")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"])
    parser.add_argument("--wandb-project", default="segrefine")
    parser.add_argument("--wandb-entity", default=None)
    parser.add_argument("--wandb-group", default=None, help="wandb group of the --log-wandb run (default: none)")
    selection = parser.add_argument_group("selecting runs of --wandb ENTITY/PROJECT (server-side, checked again here)")
    selection.add_argument("--group", help="only runs of this wandb group (backbone-head-data)")
    selection.add_argument("--job-type", choices=["train", "eval"], help="only training or only evaluation runs")
    selection.add_argument("--experiment", help="only runs of this experiment (config `experiment`; older runs: "
                                                "their group); needed when the project holds several")
    selection.add_argument("--tag", action="append", default=[],
                           help="only runs with this tag (repeatable: all must match)")
    args = parser.parse_args(argv)
    if not args.dirs and not args.wandb:
        parser.error("give run folders or --wandb ENTITY/PROJECT")
    filters = {"group": args.group, "job_type": args.job_type, "experiment": args.experiment, "tags": args.tag}
    if not args.wandb and any(filters.values()):
        given = [option for option, key in (("--group", "group"), ("--job-type", "job_type"),
                                            ("--experiment", "experiment"), ("--tag", "tags")) if filters[key]]
        parser.error(f"{', '.join(given)} select runs of a wandb project: add --wandb ENTITY/PROJECT "
                     "(run folders are selected by naming them)")
    try:
        study = load_wandb_study(args.wandb, **filters) if args.wandb else load_study(args.dirs)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    except ValueError as e:  # runs of several experiments
        print(f"report: {e}", file=sys.stderr)
        return 2
    if not study.runs:
        print(f"report: no complete test runs under {', '.join(args.dirs or [args.wandb])}", file=sys.stderr)
        for where, reason in [*study.incomplete, *study.skipped]:
            print(f"- {where}: {reason}", file=sys.stderr)
        return 1
    out_dir = Path(args.out) if args.out else Path(args.dirs[0] if args.dirs else ".") / "report"
    try:
        report = write_report(study, out_dir, figures=not args.no_figures, protocol=args.metrics)
    except ValueError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    print(report.paths["markdown"].read_text(), end="")
    print(f"\n(written to {out_dir}: {', '.join(p.name for p in report.paths.values())})")
    if args.log_wandb:
        run_id = log_to_wandb(report, project=args.wandb_project, mode=args.wandb_mode, entity=args.wandb_entity,
                              group=args.wandb_group, save_dir=out_dir,
                              sources=[args.wandb] if args.wandb else args.dirs)
        print(f"wandb run: {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
