"""Rebuild the results table from run folders: ``segrefine-report DIR [DIR ...]``.

Reads every ``results.json`` under the given folders (nothing else, no network), groups
runs by (data, backbone, head) and prints mean ± std over seeds. Runs that did not
complete are listed, never averaged.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segrefine.results import FILENAME

# (results.json metric key, column title, scale for display)
COLUMNS = (
    ("test/iou", "IoU %", 100.0),
    ("test/dice", "Dice %", 100.0),
    ("test/pixel_acc", "PA %", 100.0),
    ("test/boundary_f1", "BF1 %", 100.0),
    ("test/ms_per_image", "ms/img", 1.0),
)
GROUP_KEYS = ("data", "backbone", "head")


@dataclass
class Study:
    runs: list[dict[str, Any]] = field(default_factory=list)
    incomplete: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason)


def load_study(paths: list[str | Path]) -> Study:
    """Complete runs (with ``_path``) and incomplete run folders under ``paths``."""
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
                study.incomplete.append((str(job), f"no {FILENAME} (failed or still running)"))
    return study


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (data, backbone, head): ``{data, backbone, head, n, seeds, <metric>: (mean, std), params}``."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run.get(k) for k in GROUP_KEYS), []).append(run)
    rows = []
    for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        members = groups[key]
        row: dict[str, Any] = dict(zip(GROUP_KEYS, key))
        row["n"] = len(members)
        row["seeds"] = sorted(r.get("seed") for r in members)
        for metric, _, _ in COLUMNS:
            row[metric] = _mean_std([r["metrics"].get(metric) for r in members])
        row["params"] = members[0]["metrics"].get("params")
        rows.append(row)
    return rows


def _cell(mean_std: tuple[float, float], scale: float) -> str:
    mean, std = mean_std
    if math.isnan(mean):
        return "–"
    return f"{mean * scale:.2f} ± {std * scale:.2f}"


def to_markdown(rows: list[dict[str, Any]]) -> str:
    header = ["data", "backbone", "head", *[title for _, title, _ in COLUMNS], "params", "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row[k]) for k in GROUP_KEYS]
        cells += [_cell(row[metric], scale) for metric, _, scale in COLUMNS]
        params = row["params"]
        cells += [f"{params / 1e6:.2f}M" if params else "–", str(row["n"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segrefine-report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="run or sweep folders to read results.json from")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.dirs)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    if not study.runs:
        print(f"report: no complete runs under {', '.join(args.dirs)}", file=sys.stderr)
    else:
        print(to_markdown(summarise(study.runs)))
    if study.incomplete:
        print("\nIncomplete runs (not averaged):")
        for folder, reason in study.incomplete:
            print(f"- {folder}: {reason}")
    return 0 if study.runs else 1


if __name__ == "__main__":
    sys.exit(main())
