"""Rebuild the results table from runs: ``segrefine-report DIR [DIR ...] [--out DIR]``.

Reads every ``results.json`` under the given folders (or, with ``--wandb ENTITY/PROJECT``,
the runs of an online wandb project), groups runs by (data, backbone, head) and reports
mean ± std over seeds of IoU, Dice, pixel accuracy, boundary F1, ms/image and parameter
count. For every head other than ``none`` it pairs each test image with the ``none`` run
of the same data, backbone and seed and reports the mean per-image difference with a
bootstrap 95 % CI and a Wilcoxon signed-rank p-value. Runs that did not complete are
listed, never averaged. Writes Markdown, CSV, LaTeX and figures; prints the Markdown.
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

GROUP_KEYS = ("data", "backbone", "head")
BASELINE_HEAD = "none"
# (results.json metric key, column title, display scale)
METRICS = (
    ("test/iou", "IoU %", 100.0),
    ("test/dice", "Dice %", 100.0),
    ("test/pixel_acc", "PA %", 100.0),
    ("test/boundary_f1", "BF1 %", 100.0),
    ("test/ms_per_image", "ms/img", 1.0),
)
# Per-image metrics tested against the none head: (per_image key, column title).
PAIRED = (("iou", "ΔIoU %"), ("boundary_f1", "ΔBF1 %"))
BOOTSTRAP_SAMPLES = 10_000


@dataclass
class Study:
    runs: list[dict[str, Any]] = field(default_factory=list)
    incomplete: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)


# -- loading ---------------------------------------------------------------------------


def load_study(paths: Iterable[str | Path]) -> Study:
    """Complete runs (each with ``_path``) and incomplete run folders under ``paths``."""
    study = Study()
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"report: {root} does not exist")
        for result in sorted(root.rglob(FILENAME)):
            try:
                run = json.loads(result.read_text())
            except (OSError, json.JSONDecodeError) as e:
                study.incomplete.append((str(result.parent), f"unreadable {FILENAME}: {e}"))
                continue
            if run.get("status") != "complete":
                study.incomplete.append((str(result.parent), f"status {run.get('status')!r}"))
                continue
            run["_path"] = str(result.parent)
            study.runs.append(run)
        # A Hydra job folder without results.json: started but never finished.
        for hydra_dir in sorted(root.rglob(".hydra")):
            job = hydra_dir.parent
            if not (job / FILENAME).exists() and (hydra_dir / "config.yaml").exists():
                error = job / "error.txt"
                reason = f"failed: {error.read_text().splitlines()[0]}" if error.exists() else None
                study.incomplete.append((str(job), reason or f"no {FILENAME} (failed or still running)"))
    return study


def load_wandb_study(project: str, api: Any = None) -> Study:
    """Runs of an online wandb project (``ENTITY/PROJECT``) as results.json-like dicts.

    Per-image rows come from each run's ``test/per_image`` table when it was logged.
    """
    if api is None:
        import wandb

        api = wandb.Api()
    study = Study()
    for run in api.runs(project):
        config = dict(run.config)
        name = f"{project}/{run.id}"
        if run.state != "finished" or "test/iou" not in run.summary:
            study.incomplete.append((name, f"wandb state {run.state!r}"))
            continue
        metrics = {k: v for k, v in dict(run.summary).items() if isinstance(v, (int, float))}
        study.runs.append(
            {
                "status": "complete",
                "job_type": run.job_type,
                "experiment": run.group,
                "data": config.get("data", {}).get("name"),
                "backbone": config.get("backbone", {}).get("name"),
                "head": config.get("head", {}).get("name"),
                "seed": config.get("seed"),
                "config": config,
                "metrics": metrics,
                "per_image": _wandb_per_image(run),
                "_path": name,
            }
        )
    return study


def _wandb_per_image(run: Any) -> list[dict[str, Any]]:
    entry = run.summary.get("test/per_image")
    if not entry or "path" not in entry:
        return []
    with run.file(entry["path"]).download(replace=True, root=str(Path.home() / ".cache" / "segrefine")) as f:
        table = json.load(f)
    return [dict(zip(table["columns"], row)) for row in table["data"]]


# -- statistics --------------------------------------------------------------------------


def _mean_std(values: list[Any]) -> tuple[float, float]:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def paired_differences(runs: list[dict[str, Any]], key: str) -> dict[tuple, np.ndarray]:
    """Per (data, backbone, head != none): head minus none per test image, over all seeds.

    A run pairs with the none run of the same data, backbone and seed; images pair by id.
    """
    baseline = {(r["data"], r["backbone"], r["seed"]): r for r in runs if r["head"] == BASELINE_HEAD}
    diffs: dict[tuple, list[float]] = {}
    for run in runs:
        base = baseline.get((run["data"], run["backbone"], run["seed"]))
        if run["head"] == BASELINE_HEAD or base is None:
            continue
        base_rows = {row["id"]: row[key] for row in base.get("per_image", [])}
        for row in run.get("per_image", []):
            if row["id"] in base_rows and row[key] is not None and base_rows[row["id"]] is not None:
                diffs.setdefault(tuple(run[k] for k in GROUP_KEYS), []).append(row[key] - base_rows[row["id"]])
    return {group: np.asarray(values, dtype=np.float64) for group, values in diffs.items()}


def paired_test(diffs: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, float]:
    """Mean difference, its bootstrap 95 % CI (percentile) and the Wilcoxon signed-rank p-value."""
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), (samples, len(diffs)))].mean(1)
    if np.all(diffs == 0):
        p_value = 1.0  # identical predictions: no evidence of a difference
    else:
        p_value = float(wilcoxon(diffs).pvalue)
    return {
        "mean": float(diffs.mean()),
        "ci_low": float(np.percentile(means, 2.5)),
        "ci_high": float(np.percentile(means, 97.5)),
        "p": p_value,
        "n": int(len(diffs)),
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (data, backbone, head), ``none`` first within a backbone.

    Row keys: the group keys, ``n``, ``seeds``, ``params``, each metric key -> (mean, std),
    and ``paired/<key>`` -> paired_test(...) for heads other than none.
    """
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run.get(k) for k in GROUP_KEYS), []).append(run)
    paired = {key: paired_differences(runs, key) for key, _ in PAIRED}
    order = lambda g: (str(g[0]), str(g[1]), g[2] != BASELINE_HEAD, str(g[2]))  # noqa: E731
    rows = []
    for group in sorted(groups, key=order):
        members = groups[group]
        row: dict[str, Any] = dict(zip(GROUP_KEYS, group))
        row["n"] = len(members)
        row["seeds"] = sorted(r.get("seed") for r in members)
        row["params"] = members[0]["metrics"].get("params")
        for metric, _, _ in METRICS:
            row[metric] = _mean_std([r["metrics"].get(metric) for r in members])
        for key, _ in PAIRED:
            if group in paired[key] and len(paired[key][group]):
                row[f"paired/{key}"] = paired_test(paired[key][group])
        rows.append(row)
    return rows


# -- tables ------------------------------------------------------------------------------


def _stars(p: float) -> str:
    return "**" if p < 0.01 else "*" if p < 0.05 else ""


def _cells(row: dict[str, Any]) -> list[str]:
    cells = [str(row[k]) for k in GROUP_KEYS]
    for metric, _, scale in METRICS:
        mean, std = row[metric]
        cells.append("–" if math.isnan(mean) else f"{mean * scale:.2f} ± {std * scale:.2f}")
    for key, _ in PAIRED:
        test = row.get(f"paired/{key}")
        cells.append(
            "–" if test is None
            else f"{test['mean'] * 100:+.2f} [{test['ci_low'] * 100:+.2f}, {test['ci_high'] * 100:+.2f}] "
                 f"p={test['p']:.2g}{_stars(test['p'])}"
        )
    params = row["params"]
    cells += [f"{params / 1e6:.2f}M" if params else "–", str(row["n"])]
    return cells


def _header() -> list[str]:
    return [*GROUP_KEYS, *[t for _, t, _ in METRICS], *[t for _, t in PAIRED], "params", "n"]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    header = _header()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    if any(f"paired/{k}" in r for r in rows for k, _ in PAIRED):
        lines.append("")
        lines.append(
            "Δ: mean per-image difference to `none` (same data, backbone, seed) with bootstrap 95 % CI; "
            "p: Wilcoxon signed-rank; * p < 0.05, ** p < 0.01."
        )
    return "\n".join(lines)


def to_latex(rows: list[dict[str, Any]]) -> str:
    header = _header()
    escape = lambda s: s.replace("%", r"\%").replace("_", r"\_").replace("±", r"$\pm$").replace("Δ", r"$\Delta$")  # noqa: E731
    lines = [r"\begin{tabular}{" + "l" * 3 + "r" * (len(header) - 3) + "}", r"\toprule"]
    lines.append(" & ".join(escape(h) for h in header) + r" \\")
    lines.append(r"\midrule")
    lines += [" & ".join(escape(c) for c in _cells(row)) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def csv_columns() -> list[str]:
    columns = [*GROUP_KEYS, "n", "seeds", "params"]
    for metric, _, _ in METRICS:
        columns += [f"{metric}_mean", f"{metric}_std"]
    for key, _ in PAIRED:
        columns += [f"delta_{key}_{s}" for s in ("mean", "ci_low", "ci_high", "p", "n")]
    return columns


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Unscaled numbers, one row per group; empty cells where a value does not apply."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=csv_columns(), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        record: dict[str, Any] = {k: row[k] for k in GROUP_KEYS}
        record.update(n=row["n"], seeds=" ".join(map(str, row["seeds"])), params=row["params"])
        for metric, _, _ in METRICS:
            record[f"{metric}_mean"], record[f"{metric}_std"] = (repr(v) for v in row[metric])
        for key, _ in PAIRED:
            test = row.get(f"paired/{key}") or {}
            for stat in ("mean", "ci_low", "ci_high", "p", "n"):
                record[f"delta_{key}_{stat}"] = repr(test[stat]) if stat in test else ""
        writer.writerow(record)
    return out.getvalue()


# -- writing -----------------------------------------------------------------------------


def write_report(study: Study, out_dir: str | Path, figures: bool = True) -> dict[str, Path]:
    """Write table.md, table.csv, table.tex (and figures) into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarise(study.runs)
    paths = {"markdown": out_dir / "table.md", "csv": out_dir / "table.csv", "latex": out_dir / "table.tex"}
    markdown = to_markdown(rows)
    if study.incomplete:
        markdown += "\n\nIncomplete runs (not averaged):\n" + "\n".join(f"- {w}: {r}" for w, r in study.incomplete)
    paths["markdown"].write_text(markdown + "\n")
    paths["csv"].write_text(to_csv(rows))
    paths["latex"].write_text(to_latex(rows) + "\n")
    if figures:
        from segrefine import figures as figs

        paths["metrics_figure"] = figs.plot_metrics(rows, out_dir / "metrics.png")
        paths["cost_figure"] = figs.plot_cost(rows, out_dir / "cost.png")
        grid = figs.plot_qualitative(study.runs, out_dir / "qualitative.png")
        if grid is not None:
            paths["qualitative_figure"] = grid
    return paths


def log_to_wandb(rows: list[dict[str, Any]], paths: dict[str, Path], project: str = "segrefine", mode: str = "offline",
                 save_dir: str | Path = ".") -> str:
    """The table (and figures) as a wandb run of job_type=report; returns the run id."""
    import wandb

    run = wandb.init(project=project, job_type="report", mode=mode, dir=str(save_dir))
    try:
        table = wandb.Table(columns=_header(), data=[_cells(r) for r in rows])
        payload: dict[str, Any] = {"report/table": table}
        for name, path in paths.items():
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
    parser.add_argument("--out", help="folder for table.md/.csv/.tex and figures (default: the first folder's report/)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--log-wandb", action="store_true", help="also log the table and figures as a wandb run")
    args = parser.parse_args(argv)
    if not args.dirs and not args.wandb:
        parser.error("give run folders or --wandb ENTITY/PROJECT")
    try:
        study = load_wandb_study(args.wandb) if args.wandb else load_study(args.dirs)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    if not study.runs:
        print(f"report: no complete runs under {', '.join(args.dirs or [args.wandb])}", file=sys.stderr)
        for where, reason in study.incomplete:
            print(f"- {where}: {reason}", file=sys.stderr)
        return 1
    out_dir = Path(args.out) if args.out else Path(args.dirs[0] if args.dirs else ".") / "report"
    paths = write_report(study, out_dir, figures=not args.no_figures)
    print(paths["markdown"].read_text(), end="")
    print(f"\n(written to {out_dir}: {', '.join(p.name for p in paths.values())})")
    if args.log_wandb:
        print(f"wandb run: {log_to_wandb(summarise(study.runs), paths, save_dir=out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
