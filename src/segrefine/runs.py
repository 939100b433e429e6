"""Run bookkeeping shared by ``train`` and ``evaluate``: job folder names, the skip / resume
rules of a job's output folder, the identifying fields of results.json and the failure note.

Nothing here imports torch or Lightning at module level, so the command line can answer
``--help``, ``--cfg job`` and an all-finished rerun without loading them.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from segrefine.atomic import atomic_open, atomic_write_text
from segrefine.results import FILENAME as RESULTS_FILE
from segrefine.results import PREDICTIONS_FILE, read_results
from segrefine.runconfig import comparable_config, config_differences, curated_config, is_run_only

log = logging.getLogger(__name__)


# -- job folder names --------------------------------------------------------------------
def _name_part(override: str) -> str | None:
    """``key=value`` as ``key-value``; None for run-only keys. A value holding a path (or any
    character a folder name or an unquoted Hydra value cannot hold) becomes a short hash."""
    key, _, value = override.partition("=")
    if is_run_only(key):
        return None
    key = key.lstrip("+~").replace("/", ".")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]*", value):
        value = hashlib.sha1(value.encode()).hexdigest()[:8]
    return f"{key}-{value}" if value else key


def job_folder(overrides: Any, limit: int = 200) -> str:
    """A sweep job's folder name from its overrides: ``backbone-fcn+head-crfrnn+seed-1``.

    Run-only keys (``segrefine.runconfig.RUN_ONLY_KEYS``: paths, logger, resume, ...) are left
    out, so the same computation always lands in the same folder; values holding paths or odd
    characters are hashed. The name holds no ``=``, ``,`` or ``/``, so it can be handed back as
    an unquoted override (``segrefine-eval ckpt_path=<sweep dir>/<name>``). Overlong names keep
    both ends and gain a hash in the middle."""
    parts = [part for o in sorted(str(o) for o in (overrides or [])) if (part := _name_part(o))]
    name = "+".join(parts) or "default"
    if len(name) > limit:
        keep = (limit - 10) // 2
        name = f"{name[:keep]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}-{name[-keep:]}"
    return name


OmegaConf.register_new_resolver("job_folder", job_folder, replace=True)


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
    if previous.get("status") != "complete" or previous.get("job_type") != "train":
        log.info("%s holds no complete training results: the job is run", path)
        return None
    differences = config_differences(
        comparable_config(previous.get("config", {})), comparable_config(OmegaConf.to_container(cfg, resolve=True))
    )
    if differences:
        raise FileExistsError(
            f"{path} holds a finished run of a different config (differs in {', '.join(differences)}); "
            "choose another output folder (hydra.run.dir / hydra.sweep.dir) or pass force=true to overwrite it"
        )
    return previous


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
            raise FileNotFoundError(f"ckpt_path='last': no checkpoint at {last} (ckpt_path=last looks in this run's "
                                    "output dir: rerun with hydra.run.dir=<old run dir>)")
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
def run_record(cfg: DictConfig, job_type: str) -> dict[str, Any]:
    """The identifying fields of a results.json: ``config`` (the resolved config, as run),
    ``run_config`` (the curated one the wandb run shows) and ``provenance`` (the code)."""
    from segrefine.provenance import provenance

    config = OmegaConf.to_container(cfg, resolve=True)
    return {
        "job_type": job_type,
        "experiment": cfg.name,
        "data": cfg.data.name,
        "backbone": cfg.backbone.name,
        "head": cfg.head.name,
        "seed": cfg.seed,
        "config": config,
        "run_config": curated_config(config),
        "provenance": provenance(),
    }


def headline_key(cfg: DictConfig, split: str = "test") -> str:
    """The metric Hydra sweepers optimise: IoU under the chosen metric protocol."""
    return f"{split}/unet_crfrnn/iu" if cfg.metrics.protocol == "unet_crfrnn" else f"{split}/iou"


def headline(metrics: dict[str, float], cfg: DictConfig, split: str = "test") -> float | None:
    return metrics.get(headline_key(cfg, split))


def evaluation_record(module, output_dir: Path, cfg: DictConfig) -> dict[str, Any]:
    """What results.json says about the test numbers besides the numbers: the metric
    definitions, the classes, and the saved predictions file for the report's figure."""
    from segrefine.hardware import describe
    from segrefine.metrics import MERGED_FOREGROUND, PROTOCOLS

    merged = bool(cfg.metrics.get("merge_foreground", False))
    record: dict[str, Any] = {
        "metrics_protocol": cfg.metrics.protocol,
        "metric_definitions": {
            **PROTOCOLS,
            **({"unet_crfrnn": f"{PROTOCOLS['unet_crfrnn']} {MERGED_FOREGROUND}"} if merged else {}),
            "boundary_tolerance": f"{cfg.metrics.boundary_tolerance} ({cfg.metrics.boundary_tolerance_unit})",
        },
        "num_classes": module.num_classes,
        "class_names": module.class_names,
        "predictions": None,
        # What test/ms_per_image was measured on: the same rule for every head (backbone + head
        # forward per test image, after one warm-up batch, synchronised on CUDA).
        "timing": {**describe(module.device), "head_workers": cfg.head.get("num_workers")},
    }
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


# -- failures ----------------------------------------------------------------------------
def run_recording_failure(job: Callable[[DictConfig], dict[str, float]], cfg: DictConfig) -> dict[str, float]:
    """Run ``job(cfg)``; on an exception leave its message and traceback as ``error.txt`` in
    the job's folder, so a failed job of a sweep is visible (the report lists it) without
    stopping the others. A rerun that succeeds removes the stale file."""
    error_file = Path(cfg.paths.output_dir) / "error.txt"
    try:
        metrics = job(cfg)
    except Exception as error:
        summary = " ".join(f"{type(error).__name__}: {error}".split())  # first line: the message, on one line
        write_error_file(error_file, f"{summary}\n\n{traceback.format_exc()}")
        raise
    error_file.unlink(missing_ok=True)
    return metrics


def write_error_file(path: Path, text: str) -> None:
    """``error.txt``, atomically: whole or absent, never empty. When it cannot be written
    (e.g. the disk is full) the console says so, and the run's own error follows."""
    try:
        atomic_write_text(path, text)
    except OSError as e:
        log.error("could not record the failure in %s (%s); the run failed with: %s", path, e, text.split("\n", 1)[0])
        print(f"segrefine: could not write {path} ({e})", file=sys.stderr)
