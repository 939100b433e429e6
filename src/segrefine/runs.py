"""Run bookkeeping shared by ``train`` and ``evaluate``: job folder names, the skip / resume
rules of a job's output folder, the identifying fields of results.json and the failure note.

Nothing here imports torch or Lightning at module level, so the command line can answer
``--help``, ``--cfg job`` and an all-finished rerun without loading them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shlex
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from segrefine.atomic import atomic_open, atomic_write_text, disk_full
from segrefine.jobs import (JobInterrupted, RunFolderError, foreign_folder_problem, interruption,
                            is_first_process, run_folder_lock, short_error, stop_on_signals)
from segrefine.record import FILENAME as RESULTS_FILE
from segrefine.record import PREDICTIONS_FILE, RunRecord
from segrefine.record import read_document as read_results
from segrefine.runconfig import RUN_ONLY_DECLARATION, comparable_config, config_differences, curated_config, is_run_only

log = logging.getLogger(__name__)


# -- job folder names --------------------------------------------------------------------
def _name_part(override: str, config: Any = None) -> str | None:
    """``key=value`` as ``key-value``; None for run-only keys (``config``'s components'
    declared ones too). A value holding a path (or any character a folder name or an unquoted
    Hydra value cannot hold) becomes a short hash."""
    key, _, value = override.partition("=")
    if is_run_only(key, config):
        return None
    key = key.lstrip("+~").replace("/", ".")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]*", value):
        value = hashlib.sha1(value.encode()).hexdigest()[:8]
    return f"{key}-{value}" if value else key


def job_folder(overrides: Any, limit: int = 200, _root_: Any = None) -> str:
    """A sweep job's folder name from its overrides: ``backbone-fcn+head-crfrnn+seed-1``.

    Run-only keys (``segrefine.runconfig.RUN_ONLY_KEYS``: paths, logger, resume, ...; and those
    the components of the job's config declare, ``head.run_only``) are left out, so the same
    computation always lands in the same folder; values holding paths or odd characters are
    hashed. The name holds no ``=``, ``,`` or ``/``, so it can be handed back as
    an unquoted override (``segrefine-eval ckpt_path=<sweep dir>/<name>``). Overlong names keep
    both ends and gain a hash in the middle."""
    # As a Hydra resolver OmegaConf hands over the whole config (``_root_``): the components'
    # declarations are read from the task's config beside ``hydra``.
    config = _task_config(_root_)
    parts = [part for o in sorted(str(o) for o in (overrides or [])) if (part := _name_part(o, config))]
    name = "+".join(parts) or "default"
    if len(name) > limit:
        keep = (limit - 10) // 2
        name = f"{name[:keep]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}-{name[-keep:]}"
    return name


def _task_config(root: Any) -> dict[str, Any] | None:
    """The components' ``run_only`` declarations of the root node a resolver receives (other
    values unresolved, so reading them cannot recurse into ``hydra``)."""
    if root is None:
        return None
    declarations = {}
    for name, node in root.items_ex(resolve=False):
        if name != "hydra" and OmegaConf.is_dict(node) and RUN_ONLY_DECLARATION in node:
            declarations[name] = {RUN_ONLY_DECLARATION: OmegaConf.to_container(node[RUN_ONLY_DECLARATION], resolve=True)}
    return declarations


OmegaConf.register_new_resolver("job_folder", job_folder, replace=True)

_RUN_STAMP: list[str] = []


def run_stamp() -> str:
    """A default run folder's name: the start time to the second and the process id
    (``2026-01-31_12-00-00_4242``), so jobs started in the same second never share a folder.
    One per process, however often the config is resolved."""
    if not _RUN_STAMP:
        _RUN_STAMP.append(f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}")
    return _RUN_STAMP[0]


OmegaConf.register_new_resolver("run_stamp", run_stamp, replace=True)


# -- the output folder: skip, resume, or start afresh ------------------------------------
def finished_run(cfg: DictConfig, output_dir: Path) -> dict[str, Any] | None:
    """The complete results.json already in ``output_dir`` for this same config, if any.

    A complete run of a *different* config there is an error: reusing the folder would mix them.
    """
    path = output_dir / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        previous = read_results(path)
    except (OSError, ValueError) as error:
        log.warning("%s is unreadable (%s): the job is redone and the file replaced", path, error)
        return None
    if previous.get("job_type") not in ("train", None):
        raise RunFolderError(f"{path} holds {_whose(previous)} results; training here would replace them. Choose "
                             "another output folder (hydra.run.dir / hydra.sweep.dir)")
    if previous.get("status") != "complete":
        log.info("%s holds no complete training results: the job is run", path)
        return None
    differences = config_differences(
        comparable_config(previous.get("config", {})), comparable_config(OmegaConf.to_container(cfg, resolve=True))
    )
    if differences:
        raise RunFolderError(
            f"{path} holds a finished run of a different config (differs in {', '.join(differences)}); "
            "choose another output folder (hydra.run.dir / hydra.sweep.dir) or pass force=true to overwrite it"
        )
    return previous


def _whose(record: dict[str, Any]) -> str:
    kind = record.get("job_type")
    return {"eval": "an evaluation's", "train": "a training run's"}.get(kind, f"a {kind!r} job's")


def check_eval_folder(output_dir: Path, run_cfg: DictConfig) -> None:
    """An evaluation writes only into a folder of its own: never over a training run's
    results or checkpoints, nor over a finished evaluation of another config (its own, or an
    interrupted one, is redone)."""
    way_out = "choose another output folder (hydra.run.dir=... / hydra.sweep.dir=...)"
    if problem := foreign_folder_problem(output_dir):
        raise RunFolderError(f"{problem}; {way_out}")
    path = output_dir / RESULTS_FILE
    if not path.is_file():
        return
    previous = read_results(path)
    if previous.get("status") == "complete":
        differences = config_differences(comparable_config(previous.get("config") or {}),
                                         comparable_config(OmegaConf.to_container(run_cfg, resolve=True)))
        if differences:
            raise RunFolderError(f"{path} holds a finished evaluation of another config (differs in "
                                 f"{', '.join(differences[:6])}); {way_out}")


class MissingCheckpointError(RunFolderError, FileNotFoundError):
    """``ckpt_path=last`` in a folder without one: the user names another folder."""


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> tuple[str | None, bool]:
    """The checkpoint training continues from, and whether it was found automatically.

    ``ckpt_path``: null = none (but an interrupted attempt's ``last.ckpt`` in this output folder
    is continued unless ``resume=false`` or ``force=true``); ``last`` = this folder's last.ckpt;
    a file or run folder = ``segrefine.checkpoints.resolve_checkpoint_file``'s rule."""
    from segrefine.checkpoints import resolve_checkpoint_file

    requested = cfg.get("ckpt_path")
    last = output_dir / "checkpoints" / "last.ckpt"
    if requested in (None, "", "none"):
        automatic = cfg.get("resume", True) and not cfg.get("force") and last.is_file()
        return (str(last), True) if automatic else (None, False)
    if requested == "last":
        if not last.is_file():
            raise MissingCheckpointError(f"ckpt_path='last': no checkpoint at {last} (ckpt_path=last looks in this "
                                         "run's output dir: rerun with hydra.run.dir=<old run dir>)")
        return str(last), False
    return str(resolve_checkpoint_file(requested)), False


def check_resume(cfg: DictConfig, ckpt_path: str, automatic: bool) -> None:
    """Continue only a run of this same config (run-only keys and folder locations aside):
    resuming under another config would train on with the old one while results.json records
    the new one. A damaged checkpoint is named, with the way to start afresh."""
    from segrefine.checkpoints import CheckpointError, load_checkpoint

    way_out = ("rerun with resume=false (or delete it) to start afresh" if automatic
               else "pass another ckpt_path, or none to train from scratch")
    checkpoint = load_checkpoint(Path(ckpt_path), hint=f"; {way_out}")
    differences = config_differences(
        comparable_config(checkpoint["hyper_parameters"]["config"]),
        comparable_config(OmegaConf.to_container(cfg, resolve=True)),
    )
    if differences:
        raise CheckpointError(
            f"{ckpt_path} was trained with a different config (differs in {', '.join(differences)}); "
            f"resuming would continue the old run under the new settings. Use the old settings, {way_out}, "
            "or choose another output folder (hydra.run.dir / hydra.sweep.dir)"
        )


# -- what results.json says besides the metrics ------------------------------------------
def run_record(cfg: DictConfig, job_type: str, **fields: Any) -> RunRecord:
    """The ``RunRecord`` of this run: its identity (``config``, the resolved config as run;
    ``run_config``, the curated one the wandb run shows; ``provenance``, the code) and
    ``fields`` (metrics, per-image rows, checkpoint, ...; ``evaluation_fields``)."""
    from segrefine.provenance import provenance

    config = OmegaConf.to_container(cfg, resolve=True)
    return RunRecord.new(
        job_type=job_type,
        experiment=cfg.name,
        data=cfg.data.name,
        backbone=cfg.backbone.name,
        head=cfg.head.name,
        seed=cfg.seed,
        config=config,
        run_config=curated_config(config),
        provenance=provenance(),
        **fields,
    )


def headline_key(cfg: DictConfig, split: str = "test") -> str:
    """The metric Hydra sweepers optimise: IoU under the chosen metric protocol."""
    return f"{split}/unet_crfrnn/iu" if cfg.metrics.protocol == "unet_crfrnn" else f"{split}/iou"


def headline(metrics: dict[str, float], cfg: DictConfig, split: str = "test") -> float | None:
    return metrics.get(headline_key(cfg, split))


def objective_key(protocol: str, split: str = "val", volumetric: bool = False) -> str:
    """What a tuning of post-hoc parameters maximises (``segrefine.tuning``, and the value
    ``segrefine-eval`` hands a Hydra sweeper): the quantity the report's Δ is on. Volumetric
    sources: the mean over subjects of the volume Dice (``volume/dice``, the report's first
    column for them: the subject is the unit); else the protocol's per-image mean of its
    headline metric (``iou_image``; ``unet_crfrnn/iu``): the protocol's first paired column in
    ``segrefine.record.protocols``, on ``split``."""
    from segrefine.record.protocols import PROTOCOLS as COLUMNS, VOLUME  # not metrics.PROTOCOLS, the definitions

    first_paired = COLUMNS[protocol + (VOLUME if volumetric else "")]["paired"][0].key
    return f"{split}/" + first_paired.removeprefix("test/")


def evaluation_fields(module, output_dir: Path, cfg: DictConfig) -> dict[str, Any]:
    """The ``RunRecord`` fields that say what the test numbers are, besides the numbers: the
    metric definitions, the classes, and the saved predictions file for the report's figure."""
    from segrefine.hardware import describe
    from segrefine.metrics import MERGED_FOREGROUND, PROTOCOLS, VOLUME_DEFINITIONS

    merged = bool(cfg.metrics.get("merge_foreground", False))
    record: dict[str, Any] = {
        "metrics_protocol": cfg.metrics.protocol,
        "metric_definitions": {
            **PROTOCOLS,
            **({"unet_crfrnn": f"{PROTOCOLS['unet_crfrnn']} {MERGED_FOREGROUND}"} if merged else {}),
            "boundary_tolerance": f"{cfg.metrics.boundary_tolerance} ({cfg.metrics.boundary_tolerance_unit})",
        },
        "boundary_tolerance_px": module.boundary_tolerance_px(),
        "num_classes": module.num_classes,
        "class_names": module.class_names,
        "predictions": None,
        # What test/ms_per_image was measured on: the same rule for every head (backbone + head
        # forward per test image, after one warm-up batch, synchronised on CUDA).
        "timing": {**describe(module.device), "head_workers": cfg.head.get("num_workers")},
    }
    if module.volume_rows:  # a volumetric source: scored per subject volume too
        record["metric_definitions"]["volume"] = VOLUME_DEFINITIONS
        record["metric_definitions"]["nsd_tolerance_mm"] = module.nsd_tolerance_mm
        record["per_volume"] = module.volume_rows
    arrays = module.prediction_arrays()
    if arrays:
        record["predictions"] = write_predictions(output_dir, arrays).name
    return record


def write_predictions(output_dir: Path, arrays: dict[str, Any]) -> Path:
    """``predictions.npz`` (ids, uint8 images, masks, predictions), written atomically."""
    import numpy as np

    path = output_dir / PREDICTIONS_FILE
    with atomic_open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path


# -- threads -----------------------------------------------------------------------------
def set_threads(num_threads: int | None) -> None:
    """Torch's CPU threads: ``num_threads``, or under Hydra's joblib launcher the CPUs shared
    among its parallel jobs (several jobs each using every core only slow each other)."""
    import torch
    from hydra.core.hydra_config import HydraConfig

    from segrefine.hardware import available_cpus

    if num_threads is None and HydraConfig.initialized():
        launcher = HydraConfig.get().launcher
        if "Joblib" in str(launcher.get("_target_", "")):
            jobs = launcher.get("n_jobs", -1)
            cpus = available_cpus()
            num_threads = max(1, cpus // (cpus if jobs in (None, -1) else max(1, int(jobs))))
    if num_threads:
        torch.set_num_threads(int(num_threads))


# -- failures and interruptions -----------------------------------------------------------
def run_recording_failure(job: Callable[[DictConfig], dict[str, float]], cfg: DictConfig,
                          job_type: str = "train") -> dict[str, float]:
    """Run ``job(cfg)`` holding the output folder's lock (``segrefine.jobs.run_folder_lock``)
    and stopping on SIGTERM / SIGINT at a safe point (``segrefine.jobs.stop_on_signals``).

    On an exception leave its message and traceback as ``error.txt`` in the job's folder, so a
    failed job of a sweep is visible (the report lists it) without stopping the others; a
    rerun that succeeds removes the stale file. A refusal of the folder itself (another job's,
    ``RunFolderError``) writes nothing there. An interruption is recorded as a results.json
    with ``status: "interrupted"`` and the signal (the report lists it as not complete) and
    raised as ``JobInterrupted``."""
    output_dir = Path(cfg.paths.output_dir)
    error_file = output_dir / "error.txt"
    first = is_first_process()  # the other ranks of a DDP job share rank 0's folder and lock
    with run_folder_lock(output_dir, job_type) if first else nullcontext():
        try:
            with stop_on_signals():
                metrics = job(cfg)
        except BaseException as error:
            stop = interruption(error)
            if stop is not None:
                if first:
                    record_interruption(cfg, job_type, stop)
                    error_file.unlink(missing_ok=True)
                if stop is error:
                    raise
                raise stop from error
            if isinstance(error, Exception) and not isinstance(error, RunFolderError):
                summary = " ".join(f"{type(error).__name__}: {error}".split())  # first line: the message, on one line
                # on a full disk error.txt cannot be written either: the console's one line says it all
                write_error_file(error_file, f"{summary}\n\n{traceback.format_exc()}", console=not disk_full(error))
            raise
    error_file.unlink(missing_ok=True)
    return metrics


def record_interruption(cfg: DictConfig, job_type: str, stop: JobInterrupted) -> None:
    """results.json with ``status: "interrupted"``, the signal and the checkpoint a rerun
    continues from; never over complete results (this job's, written before the signal, or an
    earlier run's that a skip or a ``force=true`` redo was stopped in: they stand)."""
    output_dir = Path(cfg.paths.output_dir)
    path = output_dir / RESULTS_FILE
    try:
        if read_results(path).get("status") == "complete":
            return
    except (OSError, ValueError):
        pass
    last = output_dir / "checkpoints" / "last.ckpt"
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an unresolvable key must not hide the interruption
        config = OmegaConf.to_container(cfg, resolve=False)
    try:
        RunRecord.new(
            status="interrupted", signal=stop.signal_name, job_type=job_type, experiment=cfg.get("name"),
            seed=cfg.get("seed"), config=config,
            checkpoint=os.path.relpath(last, output_dir) if job_type == "train" and last.is_file() else None,
        ).write(path)
    except OSError as e:
        log.error("could not record the interruption in %s (%s)", path, e)


def resume_command(program: str, output_dir: str | Path) -> str:
    """The command that continues an interrupted job: a sweep reruns as it was (its folders
    have no timestamps); a single run names its folder, continues from its last.ckpt rather
    than the checkpoint it started from, and does not start afresh."""
    args = list(sys.argv[1:])
    if _multirun():
        return shlex.join([program, *args])
    if program == "segrefine-eval":  # an evaluation is simply redone
        kept = [a for a in args if not a.startswith("hydra.run.dir=")]
    else:
        resumable = (Path(output_dir) / "checkpoints" / "last.ckpt").is_file()
        drop = ("hydra.run.dir=", "force=", "resume=", *(("ckpt_path=",) if resumable else ()))
        kept = [a for a in args if not a.lstrip("+~").startswith(drop)]
        if resumable and any(a.lstrip("+").startswith("ckpt_path=") for a in args):
            kept.append("ckpt_path=last")
    return shlex.join([program, *kept, f"hydra.run.dir={output_dir}"])


class UserError(CompactHydraException):
    """An error the user can fix: Hydra prints its message alone, without a traceback."""


def run_cli_job(job: Callable[[DictConfig], dict[str, float]], cfg: DictConfig, job_type: str,
                program: str) -> dict[str, float]:
    """``run_recording_failure`` for the command line: an interruption prints the resume
    command and exits 128 + the signal (143 for SIGTERM, 130 for SIGINT; a sweep stops there);
    an error the user can fix prints one or two lines (``segrefine.jobs.short_error``) instead
    of a traceback, unless ``verbose=true`` or ``HYDRA_FULL_ERROR=1``."""
    from segrefine.console import is_verbose

    output_dir = Path(cfg.paths.output_dir)
    try:
        return run_recording_failure(job, cfg, job_type)
    except JobInterrupted as stop:
        last = output_dir / "checkpoints" / "last.ckpt"
        kept = " (last.ckpt kept)" if job_type == "train" and last.is_file() else ""
        print(f"segrefine: {output_dir} interrupted by {stop.signal_name}{kept}; resume with: "
              f"{resume_command(program, output_dir)}", file=sys.stderr, flush=True)
        raise SystemExit(stop.exit_code) from None
    except Exception as error:
        if is_verbose(cfg) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = short_error(error, output_dir)
        if message is None:
            raise
        details = output_dir / "error.txt"
        message = f"segrefine: {message}" + (f"\n(traceback in {details})" if details.is_file() else "")
        if _multirun():  # the sweep goes on with its other jobs; Hydra reports this one at the end, compactly
            raise UserError(message) from error
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def write_error_file(path: Path, text: str, console: bool = True) -> None:
    """``error.txt``, atomically: whole or absent, never empty. When it cannot be written
    (e.g. the disk is full) the console says so (unless ``console`` is false), and the run's
    own error follows."""
    try:
        atomic_write_text(path, text)
    except OSError as e:
        log.error("could not record the failure in %s (%s); the run failed with: %s", path, e, text.split("\n", 1)[0])
        if console:
            print(f"segrefine: could not write {path} ({e})", file=sys.stderr)
