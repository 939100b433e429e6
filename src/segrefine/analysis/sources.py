"""Where runs come from: result folders (``load_study``) and wandb projects (``load_wandb_study``),
each giving a ``Study``: complete test runs as ``RunRecord``s (``location``: the folder or wandb
run each was read from), and every run left out with its reason (incomplete, skipped, a metric
outside its range). The rest of the report reads records only; ``as_records`` turns the
results.json-like dicts a caller may hold into records at its entry points.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable


from segrefine.record.protocols import BASE_PROTOCOLS, VOLUME
from segrefine.record.run_record import FILENAME, RunRecord, migrate


@dataclass
class Study:
    runs: list[RunRecord] = field(default_factory=list)
    incomplete: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # complete, but not table material


# -- loading ---------------------------------------------------------------------------


# Metric values a results.json may hold: fractions in [0, 1], times, distances and counts >= 0.
# Keys are matched by their last path part (``test/unet_crfrnn/iu`` -> ``iu``), which may carry
# a suffix (``iou_image``, ``dice_<class>``); keys not listed are not checked.
FRACTION_METRICS = ("iou", "dice", "pixel_acc", "boundary_f1", "iu", "dsc", "pa", "nsd")
NON_NEGATIVE_METRICS = ("ms_per_image", "fit_seconds", "hd95", "params", "trainable", "steps")


def metric_range(key: str) -> tuple[float, float] | None:
    """The values ``key`` can take, or None when segrefine defines no range for it."""
    leaf = key.rsplit("/", 1)[-1]
    matches = lambda names: any(leaf == n or leaf.startswith(n + "_") for n in names)  # noqa: E731
    if leaf.endswith("_epoch"):  # an epoch count, e.g. val/iou_best_epoch, not the metric it names
        return (0.0, math.inf)
    if matches(FRACTION_METRICS):
        return (0.0, 1.0)
    if matches(NON_NEGATIVE_METRICS):
        return (0.0, math.inf)
    return None


def out_of_range(run: dict[str, Any]) -> list[str]:
    """``key=value`` for every metric (and per-image value) of a parsed results.json outside the
    range it can take."""
    found = []
    for key, value in run.get("metrics", {}).items():
        bounds = metric_range(key)
        if bounds and isinstance(value, (int, float)) and math.isfinite(value) and not bounds[0] <= value <= bounds[1]:
            found.append(f"{key}={value:g}")
    for row in [*(run.get("per_image") or ()), *(run.get("per_volume") or ())]:
        for key, value in row.items():
            bounds = None if key in ("id", "subject", "n_slices", "spacing", "infinite") else metric_range(key)
            if bounds and isinstance(value, (int, float)) and math.isfinite(value) and not bounds[0] <= value <= bounds[1]:
                found.append(f"{'per_image' if 'id' in row else 'per_volume'}[{row.get('id', row.get('subject'))}]"
                             f".{key}={value:g}")
    return found



def check_run(run: Any) -> str | None:
    """Why a parsed results.json cannot go into the table (None if it can). It reads the document
    as written, before it becomes a ``RunRecord``, whose defaults would fill in a missing
    ``status``."""
    if not isinstance(run, dict):
        return f"{FILENAME} holds a JSON {type(run).__name__}, not a run record"
    if run.get("status") == "interrupted":
        return f"interrupted by {run.get('signal') or 'a signal'}: not finished (its command resumes it)"
    if run.get("status") != "complete":
        return f"status {run.get('status')!r}"
    if not isinstance(run.get("config"), dict) or not run["config"]:
        return "no config recorded: its configuration cannot be told"
    if not isinstance(run.get("metrics"), dict):
        return "no metrics recorded"
    per_image = run.get("per_image", [])
    if not isinstance(per_image, list) or not all(isinstance(r, dict) and "id" in r for r in per_image):
        return "per_image is not a list of rows with ids"
    bad = out_of_range(run)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        return f"metrics outside the range they can take ({shown}): fractions lie in [0, 1], times and counts >= 0"
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


def as_record(run: RunRecord | dict[str, Any]) -> RunRecord:
    """``run`` as a ``RunRecord``: a record as it is; a results.json-like dict (any schema)
    typed, its ``_path`` (where the report used to keep a run's folder) as ``location``."""
    if isinstance(run, RunRecord):
        return run
    if not isinstance(run, dict):
        raise TypeError(f"a run is a RunRecord or a results.json dict, not a {type(run).__name__}")
    document = {k: v for k, v in run.items() if k != "_path"}
    return RunRecord.from_dict(migrate(document), location=run.get("_path"))


def as_records(runs: Iterable[RunRecord | dict[str, Any]]) -> list[RunRecord]:
    return [as_record(run) for run in runs]


def load_study(paths: Iterable[str | Path]) -> Study:
    """Complete test runs (``RunRecord``s, ``location`` = the run folder), other complete runs
    (skipped) and broken run folders."""
    study = Study()
    seen: set[Path] = set()  # run folders by resolved path: overlapping arguments list each run once
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"report: {root} does not exist")
        for result in sorted(root.rglob(FILENAME)):
            if result.parent.resolve() in seen:
                continue
            seen.add(result.parent.resolve())
            where = str(result.parent)
            try:
                document = json.loads(result.read_text())
                if isinstance(document, dict):
                    document = migrate(document)  # files of earlier schemas read as today's
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                study.incomplete.append((where, f"unreadable {FILENAME}: {e}"))
                continue
            except ValueError as e:  # a schema this version does not know
                study.incomplete.append((where, str(e)))
                continue
            reason = check_run(document)
            if reason:
                study.incomplete.append((where, reason))
                continue
            split = document.get("split", "test")
            if split != "test":
                study.skipped.append((where, f"split {split!r} (tuning evaluation), not a test result"))
                continue
            study.runs.append(RunRecord.from_dict(document, location=where))
        # A Hydra job folder without results.json: started but never finished.
        for hydra_dir in sorted(root.rglob(".hydra")):
            job = hydra_dir.parent
            if job.resolve() in seen:
                continue
            seen.add(job.resolve())
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
    """Runs of an online wandb project (``ENTITY/PROJECT``) as ``RunRecord``s (``location``:
    ``ENTITY/PROJECT/RUN_ID``; fields wandb does not hold, such as saved predictions, unset).

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
            study.runs.append(RunRecord.from_dict(migrate(record), location=name))
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


def study_protocol(runs: Iterable[RunRecord | dict[str, Any]], requested: str | None) -> str:
    """``requested``, or the protocol every run recorded (``metrics=...``); refuses a mix. When
    every run has per-volume rows, the protocol's ``/volume`` form: volume columns first."""
    runs = as_records(runs)
    volumetric = bool(runs) and all(run.per_volume for run in runs)
    if requested is not None:
        base = requested.removesuffix(VOLUME)
        if base not in BASE_PROTOCOLS:
            raise ValueError(f"--metrics {requested!r}: choose one of {', '.join(BASE_PROTOCOLS)}")
        return base + VOLUME if volumetric else base
    recorded = {run.metrics_protocol or "standard" for run in runs}
    if len(recorded) > 1:
        raise ValueError(
            f"the runs were made with different metric protocols ({', '.join(sorted(recorded))}); "
            f"choose the table's with --metrics {'|'.join(BASE_PROTOCOLS)}"
        )
    base = recorded.pop() if recorded else "standard"
    return base + VOLUME if volumetric else base


