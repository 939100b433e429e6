"""The report's outputs from summarised rows: Markdown (compact and full), CSV, LaTeX, a pandas
DataFrame, with their escaping and footnotes; ``write_report`` writes them (and the figures)
into a folder all at once.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


from segrefine.analysis.rows import BASELINE_HEAD, Row, head_words, mean_spread, run_value
from segrefine.analysis.sources import Study, study_protocol
from segrefine.analysis.stats import ALPHA, CONDITIONAL, NO_TEST, reachability, summarise
from segrefine.record.protocols import COST, Column, PROTOCOLS, PROTOCOL_NOTES, VOLUME
from segrefine.record.run_record import RunRecord


def _stars(p: float | None) -> str:
    return "" if p is None else "**" if p < 0.01 else "*" if p < ALPHA else ""


def _metric_cell(row: Row, column: Column) -> str:
    mean, std, _ = mean_spread([run_value(r, column) for r in row.runs.values()])
    if math.isnan(mean):
        return "–"
    if std is None:  # one seed: no spread to show
        return f"{mean * column.scale:.2f}"
    return f"{mean * column.scale:.2f} ± {std * column.scale:.2f}"


def _delta_text(test: dict[str, Any], column: Column, seeds_in_row: int) -> str:
    """``+1.00 [-0.99, +2.99] p=0.25 (Holm 1) n=3``; † marks a test conditional on one model;
    a one-seed retrained pair has no test."""
    s = column.scale
    n = f"n={test['n']}" + (f" of {seeds_in_row}" if seeds_in_row > test["n"] else "")
    dropped = f", {test['dropped']} non-finite pairs left out" if test.get("dropped") else ""
    if test["level"] == NO_TEST:
        return f"{test['mean'] * s:+.2f} (1 seed: no test{dropped})"
    holm_p = test.get("p_holm")
    holm_text = f" (Holm {holm_p:.2g})" if holm_p is not None else ""
    return f"{_interval_text(test, column)} p={test['p']:.2g}{holm_text}{_stars(holm_p)} {n}{dropped}"


def _delta_cell(row: Row, column: Column) -> str:
    test = row.stats.get(column.key)
    if test is None:
        return "–"
    if row.same_as is not None:
        return f"= {test['same_as']} (same per-image values)"
    text = _delta_text(test, column, len(row.runs))
    plain = row.plain_stats.get(column.key)
    if plain is not None:
        text += f"; vs plain {row.plain.label} none: {_delta_text(plain, column, len(row.runs))}"
    return text


def header(protocol: str) -> list[str]:
    spec = PROTOCOLS[protocol]
    paired = [t for c in spec["paired"] for t in (c.title, f"Δ {c.title}")]
    return ["configuration", "head", "pairing", "seeds", *[c.title for c in spec["pooled"]], *paired, COST.title, "params"]


def head_cell(row: Row, rows: list[Row]) -> str:
    outcome = tuning_outcome(row, rows)
    return f"{row.head} ({outcome})" if outcome else row.head


def tuning_outcome(row: Row, rows: list[Row]) -> str:
    """For a tuned head: whether the tuning kept the untuned head's parameters, chose no CRF
    (zero kernel weights) or a new point, per seed where the seeds differ ('' otherwise)."""
    outcomes = {}
    for seed, run in row.runs.items():
        head = (run.config or {}).get("head") or {}
        tuned = head.get("tuned")
        if not isinstance(tuned, dict) or not tuned.get("keys"):
            return ""
        keys, by = list(tuned["keys"]), tuned.get("by")
        if not row.head.startswith(str(by)):  # e.g. CRF-RNN initialised from a tuned DenseCRF, then trained
            return ""
        untuned = next((r.runs.get(seed) for r in rows if r.head == by and r.baseline is row.baseline
                        and r is not row and seed in r.runs), None)
        values = [head.get(k) for k in keys]
        if all(head.get(k) == 0 for k in keys if k.endswith("_compat")) and any(k.endswith("_compat") for k in keys):
            outcomes[seed] = "no CRF won"
        elif untuned is not None and values == [(untuned.config.get("head") or {}).get(k) for k in keys]:
            outcomes[seed] = "tuning kept the defaults"
        else:
            outcomes[seed] = "tuning chose new parameters"
    if len(set(outcomes.values())) == 1:
        return next(iter(outcomes.values()))
    return "; ".join(f"seed {s}: {o}" for s, o in sorted(outcomes.items(), key=lambda x: str(x[0])))


def cells(row: Row, protocol: str, rows: list[Row] = ()) -> list[str]:
    spec = PROTOCOLS[protocol]
    params = next(iter(row.runs.values())).metrics.get("params")
    out = [row.label, head_cell(row, list(rows)), row.pairing or ("baseline" if row.head == BASELINE_HEAD else "–"),
           str(len(row.runs))]
    out += [_metric_cell(row, c) for c in spec["pooled"]]
    for c in spec["paired"]:
        out += [_metric_cell(row, c), _delta_cell(row, c)]
    out += [_metric_cell(row, COST), f"{params / 1e6:.2f}M" if params else "–"]
    return out


def footnotes(rows: list[Row], protocol: str) -> list[str]:
    lines = [
        PROTOCOL_NOTES[protocol],
        "Cells: mean ± sample std over seeds (the trained model is the unit of replication; one seed: the value). "
        "Δ: the row minus its `none` baseline (the `none` row whose config differs only in the head), per seed the "
        "mean per-image difference, then the mean over seeds; n = paired seeds (\"n=2 of 3\": the row's cells "
        "average 3 seeds, its Δ pairs 2).",
        "Inference follows the design. With n ≥ 2 seeds: a 95 % t-interval (n − 1 degrees of freedom) and an exact "
        "sign-flip p on the per-seed Δ (the smallest possible p with n seeds is 2/2^n). † = one seed, same weights: "
        "the interval and p are over that single model's test " + _image_unit(rows) + ", so they say whether this "
        "model's Δ is real, not whether retraining would reproduce it. \"1 seed: no test\" = one independently trained "
        "model per side: its Δ includes training variation that one model per side cannot measure, so it is "
        "shown without interval, p or star. Holm's correction runs within each family; * / ** = Holm-adjusted "
        "p < 0.05 / 0.01.",
        *reachability(rows),
        "Pairing: *same weights* = the baseline's own checkpoint evaluated under a post-hoc head; *retrained* = "
        "an independently trained model per seed, so the Δ includes training variation.",
    ]
    if any(r.same_as is not None for r in rows):
        lines.append("\"= <row>\": the same per-image values as that row against the same baseline (e.g. a tuning "
                     "that kept the defaults); tested once.")
    if any(r.plain_stats for r in rows):
        lines.append("\"vs plain\": a row whose baseline is a matched control (its backbone stopped at a coarser "
                     "output stride) is also compared with the plain backbone's `none`.")
    bf1 = boundary_tolerance_note(rows) if protocol.removesuffix(VOLUME) == "standard" else ""
    if bf1:
        lines.append(bf1)
    lines.append(timing_note(rows))
    return lines


def _image_unit(rows: list[Row]) -> str:
    units = {t.get("unit") for r in rows for t in r.stats.values() if t["level"] == CONDITIONAL}
    return "subjects (the images of one subject are not independent: each subject's summed Δ is one unit)" \
        if "subjects" in units else "images"


def _size_text(size: Any) -> str | None:
    if isinstance(size, int):
        return f"{size}×{size}"
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return f"{size[0]}×{size[1]}"
    return None


def boundary_tolerance_note(rows: list[Row]) -> str:
    """Boundary F1's matching distance in pixels at each image size of the table: the
    recorded one (``boundary_tolerance_px``), else computed from the config."""
    sizes: dict[str, float] = {}
    rules = set()
    for row in rows:
        for run in row.runs.values():
            metrics_cfg = run.config.get("metrics") or {}
            tolerance, unit = metrics_cfg.get("boundary_tolerance", 0.0075), metrics_cfg.get("boundary_tolerance_unit",
                                                                                             "diagonal")
            rules.add(f"{tolerance * 100:g} % of the image diagonal" if unit == "diagonal" else f"{tolerance:g} px")
            recorded = run.boundary_tolerance_px
            if isinstance(recorded, dict) and recorded:
                sizes.update({k: float(v) for k, v in recorded.items() if isinstance(v, (int, float))})
                continue
            data = run.config.get("data") or {}
            size = _size_text(data.get("pad_to")) or _size_text(data.get("image_size"))
            if size is None:
                sizes.setdefault("sizes not recorded", math.nan)
            elif unit == "diagonal":
                h, w = (int(v) for v in size.split("×"))
                sizes[size] = tolerance * math.hypot(h, w)
            else:
                sizes[size] = float(tolerance)
    if not sizes:
        return ""
    shown = ", ".join(k if math.isnan(v) else f"{v:.2f} px at {k}" + (" (under 1 px: exact matching)" if v < 1 else "")
                      for k, v in sorted(sizes.items()))
    return f"Boundary F1 tolerance: {' / '.join(sorted(rules))} = {shown}."


def timing_note(rows: list[Row]) -> str:
    """Where ms/img was measured; a table mixing machines or thread counts says so."""
    setups = {}
    for row in rows:
        for run in row.runs.values():
            timing = run.timing or {}
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
        if row.plain_stats:
            per_seed = "; ".join(
                f"Δ {c.title}: " + ", ".join(f"{v * c.scale:+.2f}" for v in row.plain_stats[c.key]["per_seed"])
                for c in PROTOCOLS[protocol]["paired"] if c.key in row.plain_stats
            )
            lines.append(f"- {row.label} {row.head} vs plain {row.plain.label} none (retrained): per seed {per_seed}")
        lines += [f"- {row.label} {row.head}: {note}" for note in row.notes]
    return lines


def _compact_columns(protocol: str) -> tuple[Column, list[Column]]:
    """The main table's headline column and its other Δ columns."""
    headline, *others = PROTOCOLS[protocol]["paired"]
    if protocol.endswith(VOLUME):  # volume metrics first; the slice-level ones are in table_full.md
        others = [c for c in others if c.per_volume]
    return headline, others


def compact_header(protocol: str) -> list[str]:
    """The main table: at most 10 columns (the full one is ``full_header``)."""
    headline, others = _compact_columns(protocol)

    def short(column: Column) -> str:
        return column.title.replace(" (img mean)", "").replace(" (vol mean)", "")

    return ["configuration", "head", "paired n", headline.title, f"Δ {short(headline)} [95 % CI]", "p (Holm)",
            *(f"Δ {short(c)}" for c in others), COST.title, "params"]


def _paired_n(row: Row) -> str:
    test = next(iter(row.stats.values()), None)
    if test is None:
        return "–"
    return f"{test['n']}" + (f" of {len(row.runs)}" if len(row.runs) > test["n"] else "")


def _interval_text(test: dict[str, Any], column: Column) -> str:
    s = column.scale
    if test["level"] == NO_TEST:
        return f"{test['mean'] * s:+.2f} (no test)"
    mark = "†" if test["level"] == CONDITIONAL else ""
    return f"{test['mean'] * s:+.2f} [{test['ci_low'] * s:+.2f}, {test['ci_high'] * s:+.2f}]{mark}"


def _compact_delta(row: Row, column: Column) -> str:
    test = row.stats.get(column.key)
    if test is None:
        return "–"
    if row.same_as is not None:
        return f"= {head_words(row.same_as.head) if row.same_as.label == row.label else row.same_as.label}"
    text = _interval_text(test, column)
    plain = row.plain_stats.get(column.key)
    if plain is not None:
        text += f"; vs plain {row.plain.label}: {plain['mean'] * column.scale:+.2f}"
    if test.get("dropped"):
        text += f" ({test['dropped']} non-finite left out)"
    return text


def _compact_p(row: Row, column: Column) -> str:
    test = row.stats.get(column.key)
    if test is None or row.same_as is not None or test["p"] is None:
        return "–"
    return f"{test['p']:.2g} ({test['p_holm']:.2g}){_stars(test['p_holm'])}"


def _delta_only(row: Row, column: Column) -> str:
    test = row.stats.get(column.key)
    if test is None:
        return "–"
    if row.same_as is not None:
        return "="
    mark = "†" if test["level"] == CONDITIONAL else ""
    return f"{test['mean'] * column.scale:+.2f}{mark}{_stars(test.get('p_holm'))}"


def compact_cells(row: Row, protocol: str, rows: list[Row]) -> list[str]:
    headline, others = _compact_columns(protocol)
    params = next(iter(row.runs.values())).metrics.get("params")
    outcome = tuning_outcome(row, rows)
    head = head_words(row.head) + (f" ({outcome})" if outcome else "")
    return [row.label, head, _paired_n(row), _metric_cell(row, headline), _compact_delta(row, headline),
            _compact_p(row, headline), *(_delta_only(row, c) for c in others), _cost_cell(row),
            f"{params / 1e6:.2f}M" if params else "–"]


def _cost_cell(row: Row) -> str:
    mean, std, _ = mean_spread([run_value(r, COST) for r in row.runs.values()])
    return "–" if math.isnan(mean) else f"{mean:.1f}"


def compact_footnotes(rows: list[Row], protocol: str) -> list[str]:
    headline = PROTOCOLS[protocol]["paired"][0]
    lines = [
        f"Δ = the row minus its `none` baseline (the same configuration but the head; seed with seed, image with "
        f"image), in points of {headline.title}; paired n = seeds in the Δ (\"2 of 3\": the cells average 3). "
        "Cells with several seeds: mean ± sample std over seeds.",
        "Inference by design: several seeds: 95 % t-interval and exact sign-flip p across seeds. † one seed, same "
        "weights: the interval and p are over that one model's test " + _image_unit(rows) + " (is this model's Δ "
        "real?), not a claim about retraining. (no test): one retrained model per side, whose Δ includes training "
        "variation one model cannot measure. p (Holm): raw p, Holm-adjusted within its family in brackets; "
        "* / ** = Holm-adjusted p < 0.05 / 0.01.",
        *reachability(rows),
    ]
    if any(r.same_as is not None for r in rows):
        lines.append("\"= <row>\": the same per-image values as that row against the same baseline; tested once.")
    if any(r.plain_stats for r in rows):
        lines.append("\"vs plain\": the Δ against the plain backbone's `none` (this row's baseline is a matched "
                     "control with a coarser output stride).")
    lines.append(PROTOCOL_NOTES[protocol])
    bf1 = boundary_tolerance_note(rows) if protocol.removesuffix(VOLUME) == "standard" else ""
    if bf1:
        lines.append(bf1)
    lines.append(timing_note(rows))
    lines.append("Every column, spread and per-seed value: table_full.md and table.csv.")
    return lines


def escape_markdown(text: Any) -> str:
    """A Markdown table cell that stays one cell: ``\\``, ``|`` and backticks escaped (a
    backtick could open a code span), line breaks as spaces."""
    return re.sub(r"([\\|`])", r"\\\1", " ".join(str(text).splitlines()))


def to_markdown(rows: list[Row], protocol: str = "standard") -> str:
    """The main table (at most 10 columns, grouped by backbone, each baseline first) and its notes."""
    head = compact_header(protocol)
    lines = ["| " + " | ".join(map(escape_markdown, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(escape_markdown, compact_cells(row, protocol, rows))) + " |" for row in rows]
    lines += ["", *compact_footnotes(rows, protocol)]
    return "\n".join(lines)


def to_markdown_full(rows: list[Row], protocol: str = "standard") -> str:
    """Every column: pooled and per-image metrics with their spread, each Δ with interval, p,
    Holm p and n, and the per-seed Δ of every pair."""
    head = header(protocol)
    lines = ["| " + " | ".join(map(escape_markdown, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(escape_markdown, cells(row, protocol, rows))) + " |" for row in rows]
    lines += ["", *footnotes(rows, protocol)]
    pairs = pair_lines(rows, protocol)
    if pairs:
        lines += ["", "Paired comparisons:", *pairs]
    return "\n".join(lines)


# LaTeX's ten special characters, then the table's own symbols, each in one pass (a
# replacement is never escaped again).
_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
          "±": r"$\pm$", "Δ": r"$\Delta$", "†": r"$^\dagger$", "–": "--", "\n": " ", "\r": " "}
_LATEX_PATTERN = re.compile("|".join(map(re.escape, _LATEX)))


def escape_latex(text: Any) -> str:
    """Text for a LaTeX table cell: every special character escaped, line breaks as spaces."""
    return _LATEX_PATTERN.sub(lambda m: _LATEX[m.group(0)], str(text))


def to_latex(rows: list[Row], protocol: str = "standard") -> str:
    """The main table (``to_markdown``'s columns) as a LaTeX tabular."""
    head = compact_header(protocol)
    lines = [r"\begin{tabular}{" + "l" * 3 + "r" * (len(head) - 3) + "}", r"\toprule"]
    lines.append(" & ".join(map(escape_latex, head)) + r" \\")
    lines.append(r"\midrule")
    lines += [" & ".join(map(escape_latex, compact_cells(row, protocol, rows))) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


DELTA_STATS = ("mean", "std", "ci_low", "ci_high", "p", "p_holm", "n", "level", "unit", "dropped", "same_as", "per_seed")


# Delta statistics that are words, not numbers (the test's level and unit, the row it equals).
TEXT_DELTA_SUFFIXES = ("_level", "_unit", "_same_as")


def _empty_row() -> Row:
    """A row of one run without numbers: its records name the columns of a table without rows."""
    return Row(config={}, runs={0: RunRecord(metrics={})})


def numeric_record(row: Row, protocol: str, rows: Iterable[Row] = ()) -> dict[str, Any]:
    """One row as plain numbers (unscaled; None where a value does not apply). ``rows`` (the
    whole table) lets a tuned head say what its tuning chose."""
    spec = PROTOCOLS[protocol]
    record: dict[str, Any] = {
        "configuration": row.label, "head": row.head, "pairing": row.pairing,
        "baseline": row.baseline.label if row.baseline else None,
        "plain_baseline": row.plain.label if row.plain_stats else None,
        "tuning": tuning_outcome(row, list(rows)) or None,
        "n": len(row.runs), "seeds": " ".join(map(str, row.seeds)),
        "params": next(iter(row.runs.values())).metrics.get("params"),
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
    for column in spec["paired"]:
        test = row.plain_stats.get(column.key, {})
        for stat in ("mean", "ci_low", "ci_high", "p", "p_holm", "n", "level"):
            record[f"delta_vs_plain_{column.per_image}_{stat}"] = test.get(stat)
    return record


def to_csv(rows: list[Row], protocol: str = "standard") -> str:
    """Unscaled numbers, one row per configuration; empty cells where a value does not apply."""
    records = [numeric_record(r, protocol, rows) for r in rows]
    out = io.StringIO()
    columns = list(numeric_record(_empty_row(), protocol))
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
        numbers = numeric_record(row, protocol, rows)
        record: dict[str, Any] = {
            "configuration": numbers.pop("configuration"),
            "backbone": str((row.config.get("backbone") or {}).get("name", "")),
            "head": numbers.pop("head"),
            "protocol": protocol,
            "pairing": numbers.pop("pairing") or ("baseline" if row.head == BASELINE_HEAD else ""),
            "baseline": numbers.pop("baseline") or "",
            "plain_baseline": numbers.pop("plain_baseline") or "",
            "tuning": numbers.pop("tuning") or "",
            "n_seeds": numbers.pop("n"),
        }
        del numbers["seeds"]
        for key, value in numbers.items():
            if key.endswith("_per_seed"):
                continue
            if key.endswith(TEXT_DELTA_SUFFIXES):
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
    columns = list(frame_records([_empty_row()], protocol)[0])  # also for no rows
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
    # Every output is made in a staging folder and moved into out_dir only once all are done,
    # so a failure or a kill never leaves new figures beside an old table (or half a file).
    stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=".report-"))
    try:
        paths, problems = _write_outputs(study, rows, duplicates, protocol, stage, figures)
        final = {name: out_dir / path.name for name, path in paths.items()}
        for stale in REPORT_OUTPUTS - {path.name for path in final.values()}:
            (out_dir / stale).unlink(missing_ok=True)  # e.g. an older qualitative.png this report does not draw
        for name, path in sorted(paths.items(), key=lambda item: item[0] == "markdown"):  # table.md last
            os.replace(path, final[name])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return Report(rows, protocol, final, problems)


# Every file write_report may leave in its folder.
REPORT_OUTPUTS = frozenset({"table.md", "table_full.md", "table.csv", "table.tex", "forest.png", "metrics.png",
                            "cost.png", "qualitative.png"})


def _write_outputs(study: Study, rows: list[Row], duplicates: list[tuple[str, str]], protocol: str, stage: Path,
                   figures: bool) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """The tables (and figures) of ``write_report``, written into ``stage``; their paths and
    the report's problems (every run folder left out, and why)."""
    paths = {"markdown": stage / "table.md", "full_markdown": stage / "table_full.md", "csv": stage / "table.csv",
             "latex": stage / "table.tex"}
    figure_notes: list[tuple[str, str]] = []
    if figures:
        from segrefine.analysis import figures as figs

        figure_notes = figs.draw_all(rows, PROTOCOLS[protocol]["paired"], COST, stage, paths)
    problems = ""
    if duplicates:
        problems += "\n\nDuplicate runs (not averaged):\n" + "\n".join(f"- {w}: {r}" for w, r in duplicates)
    if study.incomplete:
        problems += ("\n\nRuns left out (incomplete, unreadable or out of range; not averaged):\n"
                     + "\n".join(f"- {w}: {r}" for w, r in study.incomplete))
    if study.skipped:
        problems += "\n\nSkipped (not test results):\n" + "\n".join(f"- {w}: {r}" for w, r in study.skipped)
    if figure_notes:
        problems += "\n\nFigures:\n" + "\n".join(f"- {w}: {r}" for w, r in figure_notes)
    paths["markdown"].write_text(to_markdown(rows, protocol) + problems + "\n")
    paths["full_markdown"].write_text(to_markdown_full(rows, protocol) + problems + "\n")
    paths["csv"].write_text(to_csv(rows, protocol))
    paths["latex"].write_text(to_latex(rows, protocol) + "\n")
    return paths, [*duplicates, *study.incomplete, *figure_notes]


