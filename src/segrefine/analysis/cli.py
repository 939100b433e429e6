"""Rebuild the results table from runs: ``segrefine-report DIR [DIR ...] [--metrics P] [--out DIR]``.

Reads every ``results.json`` under the given folders (or, with ``--wandb ENTITY/PROJECT``,
the runs of one experiment of an online wandb project: ``--experiment``, ``--group``,
``--job-type``, ``--tag`` select them). One row per exact configuration: the resolved config
without the seed and run-only keys (``segrefine.runconfig.comparable_config``), labelled by
what differs between rows; the seeds of a row are its replicates. Each head is paired with
the ``none`` row whose config differs only in the head, seed with seed and image with
image: per seed the mean per-image difference (the aggregation of the column beside it),
across seeds its mean. The inference follows the design (``paired_stats``): with two or more
seeds a t-interval and an exact sign-flip p on the per-seed Δ; with one seed on the same
weights a test conditional on that model over its images (or subjects, when rows name them),
marked †; with one retrained model per side no test. Holm's correction runs within the
across-seed and the conditional family separately. ``benchmarks/calibration.py`` shows by
simulation that the stars and intervals hold their nominal rates.
Runs that did not complete, duplicates and non-test evaluations are listed, never averaged.
Writes Markdown, CSV, LaTeX and figures (from saved predictions; nothing is re-run) and
prints the Markdown.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Iterable


from segrefine.analysis.render import Report, numeric_record, tuning_outcome, write_report
from segrefine.analysis.rows import Row, mean_spread, run_value
from segrefine.analysis.sources import load_study, load_wandb_study
from segrefine.record.protocols import BASE_PROTOCOLS, COST, PROTOCOLS


def main_records(rows: list[Row], protocol: str) -> list[dict[str, Any]]:
    """The main table's rows as numbers (unscaled; None where a value does not apply): what
    ``--log-wandb`` logs as its table."""
    headline, *others = PROTOCOLS[protocol]["paired"]
    records = []
    for row in rows:
        test = row.stats.get(headline.key) or {}
        mean, std, _ = mean_spread([run_value(r, headline) for r in row.runs.values()])
        cost, _, _ = mean_spread([run_value(r, COST) for r in row.runs.values()])
        record = {"configuration": row.label, "head": row.head, "tuning": tuning_outcome(row, rows) or None,
                  "seeds": len(row.runs), "paired_n": test.get("n"), f"{headline.per_image}_mean": _number(mean),
                  f"{headline.per_image}_std": std, "delta": test.get("mean"), "ci_low": test.get("ci_low"),
                  "ci_high": test.get("ci_high"), "p": test.get("p"), "p_holm": test.get("p_holm"),
                  "test": test.get("level"), "same_as": test.get("same_as")}
        for column in others:
            record[f"delta_{column.per_image}"] = (row.stats.get(column.key) or {}).get("mean")
        record["ms_per_image"] = _number(cost)
        record["params"] = next(iter(row.runs.values())).metrics.get("params")
        records.append(record)
    return records


def _number(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def report_experiment(report: Report) -> str:
    """The experiment the report's runs belong to (the most common ``experiment``)."""
    names = [str(run.experiment or "") for row in report.rows for run in row.runs.values()]
    names = [n for n in names if n] or ["runs"]
    return max(dict.fromkeys(names), key=names.count)


def _source_name(source: str) -> str:
    """A source as the wandb run shows it: a project as given, a folder by its name only (no machine path)."""
    path = Path(source)
    return source if not path.exists() else (path.resolve().name or str(source))


def log_to_wandb(report: Report, project: str = "segrefine", mode: str = "offline", entity: str | None = None,
                 save_dir: str | Path = ".", group: str | None = None, sources: Iterable[str] = ()) -> str:
    """The report as a wandb run named ``report-<experiment>`` (job_type ``report``, its own
    group unless ``group`` is given, tags report / experiment / protocol): the main table and the
    full one as ``wandb.Table``s (numbers unscaled), the figures as ``wandb.Image``s and each
    row's headline Δ in the summary. Sources are named without machine paths. Returns the run id."""
    import wandb

    experiment = report_experiment(report)
    name = f"report-{experiment}"
    run = wandb.init(project=project, entity=entity, name=name, group=group or name, job_type="report",
                     tags=["report", experiment, report.protocol], mode=mode, dir=str(save_dir),
                     config={"metrics_protocol": report.protocol, "experiment": experiment, "rows": len(report.rows),
                             "sources": [_source_name(s) for s in sources]})
    try:
        def table(records: list[dict[str, Any]]) -> Any:
            columns = list(records[0]) if records else []
            return wandb.Table(columns=columns, data=[[rec[c] for c in columns] for rec in records])

        payload: dict[str, Any] = {
            "report/table": table(main_records(report.rows, report.protocol)),
            "report/table_full": table([numeric_record(r, report.protocol, report.rows) for r in report.rows]),
        }
        for key, path in report.paths.items():
            if path.suffix == ".png":
                payload[f"report/{key.removesuffix('_figure')}"] = wandb.Image(str(path))
        run.log(payload)
        headline = PROTOCOLS[report.protocol]["paired"][0]
        run.summary.update({f"delta {headline.per_image}/{row.label} · {row.head}": row.stats[headline.key]["mean"]
                            for row in report.rows if headline.key in row.stats})
        return run.id
    finally:
        wandb.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segrefine-report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="*", help="run or sweep folders to read results.json from")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from an online wandb project instead")
    parser.add_argument("--metrics", choices=list(BASE_PROTOCOLS), default=None,
                        help="metric protocol of the columns (default: the one the runs were made with)")
    parser.add_argument("--out", help="folder for table.md/.csv/.tex and figures (default: the first folder's report/)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--log-wandb", action="store_true", help="also log the table and figures as a wandb run")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"])
    parser.add_argument("--wandb-project", default="segrefine")
    parser.add_argument("--wandb-entity", default=None)
    parser.add_argument("--wandb-group", default=None,
                        help="wandb group of the --log-wandb run (default: its own, report-<experiment>)")
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
    if args.wandb:  # one line naming `wandb login` / WANDB_API_KEY, not wandb's traceback
        from segrefine.tracking import require_wandb_credentials

        require_wandb_credentials()
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
