"""Running a plan: every job in order, in this process, skipping the finished ones, after the
pairing check; the study's time in ``<out>/study.json``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from segrefine.study.pairing import check_pairings
from segrefine.study.plan import KINDS, Job, Plan, compose_eval, compose_train, describe, runtime_overrides

# Run-level override keys that also reach the evaluations and the tuning.
EVAL_KEYS = {"trainer", "logger", "paths", "metrics", "save_predictions"}


def run_plan(plan: Plan, out: Path, *, tune_trials: int, eval_overrides: Iterable[str] = (),
             log: Callable[[str], None] = print) -> dict[str, float]:
    """Run every job in plan order, in this process; a job whose folder already holds a
    complete result is skipped (as segrefine-train does). Returns seconds per job kind."""
    from segrefine.evaluate import evaluate
    from segrefine.record import FILENAME
    from segrefine.record import read_document as read_results
    from segrefine.runs import run_recording_failure
    from segrefine.train import train
    from segrefine.tuning import TUNED_FILE, tune_densecrf

    out = Path(out)
    eval_overrides = list(eval_overrides)

    def tuned_file(job: Job) -> Path:
        return job.folder(out) / TUNED_FILE

    seconds = {kind: 0.0 for kind in KINDS}
    for i, job in enumerate(plan.jobs, 1):
        folder = job.folder(out)
        start = time.perf_counter()
        log(f"[study] {i}/{len(plan.jobs)} {job.kind} {job.name}" + (f" ({job.label})" if job.label else ""))
        if job.kind == "tune":
            if not tuned_file(job).is_file():
                source = plan.get("train", job.source).folder(out)
                summary = tune_densecrf(source, folder, trials=tune_trials, overrides=[*job.overrides, *eval_overrides])
                log(f"[study]   {summary['metric']} {summary['best_value']:.4f} tuned ({summary['outcome']} won), "
                    f"{summary['none_value']:.4f} without CRF")
        elif job.kind == "train":
            overrides = runtime_overrides(job, plan, out, tuned_file)
            cfg = compose_train([*overrides, f"paths.output_dir={folder}"])
            run_recording_failure(train, cfg)
        else:
            done = folder / FILENAME
            if not (done.is_file() and read_results(done).get("status") == "complete"):
                source = plan.get("train", job.source).folder(out)
                overrides = runtime_overrides(job, plan, out, tuned_file)
                cfg = compose_eval([f"ckpt_path={source}", *overrides, *eval_overrides, f"paths.output_dir={folder}"])
                run_recording_failure(evaluate, cfg, "eval")
        seconds[job.kind] += time.perf_counter() - start
    return seconds


def run_study(args, plan: Plan, out: Path, overrides: list[str], log: Callable[[str], None] = print) -> float:
    """Check the plan's pairings, run it, record the command (``args.command``, else this
    process's) in ``<out>/study.json``; returns the seconds it took (0 with ``--plan-only``)."""
    eval_overrides = [o for o in overrides if o.split("=", 1)[0].split(".")[0].lstrip("+~") in EVAL_KEYS]
    eval_overrides += args.eval_override
    print(describe(plan))
    from segrefine.tuning import example_tuned_file

    example = example_tuned_file(out / "plan")
    try:
        check_pairings(plan, out, tuned_file=lambda job: example)
    except ValueError as e:
        raise SystemExit(f"study plan refused, nothing was run: {e}") from None
    if args.plan_only:
        return 0.0
    from segrefine.console import quiet_console

    quiet_console(getattr(args, "verbose", False))
    start = time.perf_counter()
    seconds = run_plan(plan, out, tune_trials=args.tune_trials, eval_overrides=eval_overrides, log=log)
    total = time.perf_counter() - start
    command = getattr(args, "command", None) or " ".join(["python", *sys.argv])
    record_time(out / "study.json", command, total, seconds)
    print(f"study ran in {total / 60:.1f} min ({', '.join(f'{k} {v / 60:.1f}' for k, v in seconds.items())} min)")
    return total


def record_time(path: Path, command: str, seconds: float, by_kind: dict[str, float]) -> dict:
    """Add one run of a study to its ``study.json``: ``command`` stays the first run's, and
    ``seconds``/``by_kind`` are summed over all runs (listed under ``runs``). A rerun that finds
    every job done adds its few seconds instead of replacing the study's time with them."""
    from segrefine.atomic import atomic_write_text

    record = {"command": command, "seconds": 0.0, "by_kind": {}, "runs": []}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            record = {"command": old["command"], "seconds": float(old["seconds"]), "by_kind": dict(old["by_kind"]),
                      "runs": old.get("runs") or [{"command": old["command"], "seconds": float(old["seconds"])}]}
        except (ValueError, KeyError, TypeError) as e:
            print(f"{path}: unreadable ({e}); its earlier runs' time is lost, this run's is recorded")
    record["seconds"] += seconds
    for kind, value in by_kind.items():
        record["by_kind"][kind] = record["by_kind"].get(kind, 0.0) + value
    record["runs"].append({"command": command, "seconds": seconds})
    atomic_write_text(path, json.dumps(record, indent=2))
    return record
