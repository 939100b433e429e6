"""Train one backbone + head: ``python -m segrefine.train [overrides]`` or ``segrefine-train``.

``train(cfg)`` is a plain function (usable from tests and notebooks); ``main`` is the thin
Hydra wrapper. Writes ``<output_dir>/results.json`` last, atomically, only on success.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from segrefine.checkpoints import AtomicCheckpointIO, CheckpointError, load_checkpoint, load_weights, resolve_checkpoint_file
from segrefine.distributed import use_job_command_for_ddp
from segrefine.hardware import describe
from segrefine.metrics import PROTOCOLS
from segrefine.module import SegmentationModule
from segrefine.results import FILENAME as RESULTS_FILE
from segrefine.results import PREDICTIONS_FILE
from segrefine.results import read_results, write_results
from segrefine.runconfig import comparable_config, config_differences
from segrefine.tracking import RunInfo, close_wandb, finish_wandb, log_per_image_table
from segrefine.validation import check_config

log = logging.getLogger(__name__)

CONFIG_DIR = os.environ.get("SEGREFINE_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf"))


def folder_name(text: str, limit: int = 200) -> str:
    """A job's overrides as one safe folder name (``/`` and odd characters replaced), so the
    same sweep command always finds the same folders. Overlong names keep both ends and
    gain a hash in the middle."""
    name = re.sub(r"[^A-Za-z0-9=,._+-]", "_", text) or "default"
    if len(name) > limit:
        keep = (limit - 10) // 2
        name = f"{name[:keep]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}-{name[-keep:]}"
    return name


OmegaConf.register_new_resolver("folder_name", folder_name, replace=True)


def resolve_checkpoint(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """``null`` -> None; ``last`` -> this run dir's last.ckpt; a run dir -> its last.ckpt; a file -> itself."""
    if ckpt_path in (None, "", "none"):
        return None
    path = Path(output_dir) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        hint = " (ckpt_path=last looks in this run's output dir: rerun with hydra.run.dir=<old run dir>)" if ckpt_path == "last" else ""
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no checkpoint at {path}{hint}")
    return str(path)


def build_data(cfg: DictConfig) -> pl.LightningDataModule:
    """Instantiate the DataModule and load every split, so bad data fails before any output."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def check_metrics_config(cfg: DictConfig) -> None:
    """The metric settings live in the ``metrics`` group since protocols were added."""
    if "boundary_tolerance" in cfg:
        raise ValueError(
            "boundary_tolerance moved to metrics.boundary_tolerance (a fraction of the image diagonal, "
            "default 0.0075); for pixels use metrics.boundary_tolerance=2 metrics.boundary_tolerance_unit=pixels"
        )
    protocol = cfg.metrics.get("protocol")
    if protocol not in PROTOCOLS:
        raise ValueError(f"metrics.protocol={protocol!r} must be one of {tuple(PROTOCOLS)} (metrics=standard|unet_crfrnn)")


def build_module(cfg: DictConfig, datamodule) -> SegmentationModule:
    check_metrics_config(cfg)
    backbone = instantiate(cfg.backbone, in_channels=datamodule.in_channels, num_classes=datamodule.num_classes)
    # head.tuned records how a tuning protocol chose some values (segrefine.tuning): not an argument.
    head_cfg = OmegaConf.masked_copy(cfg.head, [key for key in cfg.head if key != "tuned"])
    head = instantiate(head_cfg, num_classes=datamodule.num_classes, backbone=backbone)
    return SegmentationModule(
        backbone=backbone,
        head=head,
        num_classes=datamodule.num_classes,
        class_names=datamodule.class_names,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        boundary_tolerance=cfg.metrics.boundary_tolerance,
        boundary_tolerance_unit=cfg.metrics.boundary_tolerance_unit,
        save_predictions=cfg.get("save_predictions") or 0,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def initialise_from(module, source: str, head_target: str) -> None:
    """Start from another run's weights (e.g. CRF-RNN from a trained head=none U-Net, as
    Zheng et al. did): the backbone always, the head too when it is the same kind."""
    path = resolve_checkpoint_file(source, key="init_from")
    checkpoint = load_checkpoint(path)
    same_head = checkpoint["hyper_parameters"]["config"]["head"]["_target_"] == head_target
    load_weights(module, checkpoint, path, with_head=same_head)
    log.info("initialised from %s (%s)", path, "backbone and head" if same_head else "backbone")


def run_info(cfg: DictConfig, job_type: str, resume: bool = False) -> RunInfo:
    return RunInfo(
        output_dir=cfg.paths.output_dir,
        experiment=cfg.name,
        job_type=job_type,
        run_name=f"{cfg.backbone.name}-{cfg.head.name}-s{cfg.seed}",
        tags=[cfg.data.name, cfg.backbone.name, cfg.head.name],
        config=OmegaConf.to_container(cfg, resolve=True),
        resume=resume,
    )


def build_logger(cfg: DictConfig, run: RunInfo):
    """The configured logger, or False for ``logger=none``."""
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return False
    # Built as a partial so Hydra does not try to instantiate the run's config inside RunInfo.
    return instantiate(cfg.logger, _partial_=True)(run=run)


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]


def run_record(cfg: DictConfig, job_type: str) -> dict[str, Any]:
    """The identifying fields of a results.json."""
    return {
        "job_type": job_type,
        "experiment": cfg.name,
        "data": cfg.data.name,
        "backbone": cfg.backbone.name,
        "head": cfg.head.name,
        "seed": cfg.seed,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def headline(metrics: dict[str, float], cfg: DictConfig, split: str = "test") -> float | None:
    """The number Hydra sweepers optimise: IoU under the chosen metric protocol."""
    key = f"{split}/unet_crfrnn/iu" if cfg.metrics.protocol == "unet_crfrnn" else f"{split}/iou"
    return metrics.get(key)


def evaluation_record(module: SegmentationModule, output_dir: Path, cfg: DictConfig) -> dict[str, Any]:
    """What results.json says about the test numbers besides the numbers: the metric
    definitions, the classes, and the saved predictions file for the report's figure."""
    record: dict[str, Any] = {
        "metrics_protocol": cfg.metrics.protocol,
        "metric_definitions": {
            **PROTOCOLS,
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
    tmp = output_dir / f".{PREDICTIONS_FILE}.tmp"
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def set_threads(num_threads: int | None) -> None:
    """Torch's CPU threads: ``num_threads``, or under Hydra's joblib launcher the CPUs shared
    among its parallel jobs (several jobs each using every core only slow each other)."""
    if num_threads is None and HydraConfig.initialized():
        launcher = HydraConfig.get().launcher
        if "Joblib" in str(launcher.get("_target_", "")):
            jobs = launcher.get("n_jobs", -1)
            cpus = os.cpu_count() or 1
            num_threads = max(1, cpus // (cpus if jobs in (None, -1) else max(1, int(jobs))))
    if num_threads:
        torch.set_num_threads(int(num_threads))


def finished_run(cfg: DictConfig, output_dir: Path) -> dict[str, Any] | None:
    """The complete results.json already in ``output_dir`` for this same config, if any.

    A complete run of a *different* config there is an error: reusing the folder would mix them.
    """
    path = output_dir / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        previous = read_results(path)
    except (OSError, ValueError):
        return None  # unreadable: the run is redone and the file replaced
    if previous.get("status") != "complete" or previous.get("job_type") != "train":
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


def check_resume(cfg: DictConfig, ckpt_path: str, automatic: bool) -> None:
    """Continue only a run of this same config (run-only keys and folder locations aside):
    resuming under another config would train on with the old one while results.json records
    the new one. A damaged checkpoint is named, with the way to start afresh."""
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


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, write results.json; returns the metrics dict.

    Re-running a finished job returns its results without training (``force=true`` redoes
    it); a job interrupted after a checkpoint continues from ``last.ckpt`` (``resume``).
    """
    if cfg.get("print_config"):
        print(OmegaConf.to_yaml(cfg, resolve=True))
    check_config(OmegaConf.to_container(cfg, resolve=True))
    output_dir = Path(cfg.paths.output_dir)
    explicit = cfg.get("force") or cfg.get("ckpt_path")  # the user asks for training here
    if not explicit and (previous := finished_run(cfg, output_dir)) is not None:
        log.info("%s already has complete results for this config: skipped (force=true to redo)", output_dir)
        return previous["metrics"]
    set_threads(cfg.get("num_threads"))
    pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"), output_dir)
    # force=true redoes a finished job from scratch; otherwise an interrupted one continues.
    automatic = ckpt_path is None and cfg.get("resume", True) and not cfg.get("force") and (output_dir / "checkpoints" / "last.ckpt").is_file()
    if automatic:
        ckpt_path = str(output_dir / "checkpoints" / "last.ckpt")
    if ckpt_path is not None:
        check_resume(cfg, ckpt_path, automatic)
        log.info("resuming the interrupted run from %s", ckpt_path)
    datamodule = build_data(cfg)
    module = build_module(cfg, datamodule)
    if cfg.get("init_from"):
        initialise_from(module, cfg.init_from, cfg.head._target_)

    stale = output_dir / "checkpoints"
    if ckpt_path is None and (stale / "last.ckpt").is_file():
        # Starting afresh (resume=false / force=true): Lightning would write last-v1.ckpt beside
        # the old last.ckpt, which a later resume would then pick up.
        log.warning("starting afresh: removing the earlier attempt's checkpoints in %s", stale)
        shutil.rmtree(stale)
    if HydraConfig.initialized():
        use_job_command_for_ddp()
    try:
        logger = build_logger(cfg, run_info(cfg, "train", resume=ckpt_path is not None))
        callbacks = build_callbacks(cfg)
        trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(output_dir),
                                          plugins=[AtomicCheckpointIO()])
        fit_start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        fit_seconds = time.perf_counter() - fit_start

        metrics: dict[str, float] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        checkpoint = None
        if cfg.get("test", True):
            checkpoint = _best_checkpoint(trainer)
            trainer.test(module, datamodule=datamodule, ckpt_path=checkpoint, verbose=False, weights_only=True)
            metrics.update(module.test_results)
            log_per_image_table(logger, module.test_rows)
        metrics["params"] = module.parameter_count()
        # Training cost of this invocation (validation included; a resumed run counts its own part).
        metrics["train/fit_seconds"] = fit_seconds
        metrics["train/steps"] = trainer.global_step
        if not trainer.is_global_zero:
            return metrics  # one results.json per job, written by rank 0
        wandb_info = close_wandb(logger)  # before results.json, which records whether its log is whole
        write_results(
            output_dir,
            {
                **run_record(cfg, "train"),
                "metrics": metrics,
                "per_image": module.test_rows,
                "checkpoint": os.path.relpath(checkpoint, output_dir) if checkpoint else None,
                **(evaluation_record(module, output_dir, cfg) if cfg.get("test", True) else {}),
                "wandb": wandb_info,
            },
        )
        log.info("results written to %s", output_dir / "results.json")
        return metrics
    finally:
        finish_wandb(sys.exc_info()[1])  # the exception in flight, if any: the wandb run is marked failed


def _best_checkpoint(trainer: pl.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    return callback.best_model_path or callback.last_model_path or None


def check_config_dir() -> None:
    if not Path(CONFIG_DIR, "train.yaml").is_file():
        raise SystemExit(
            f"segrefine: no config at {CONFIG_DIR}/train.yaml; install from a checkout (pip install -e .) "
            "or set SEGREFINE_CONFIG_DIR to the repository's conf/ folder"
        )


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
    """``error.txt``, atomically (temp + rename): whole or absent, never empty. When it cannot
    be written (e.g. the disk is full) the console says so, and the run's own error follows."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.error("could not record the failure in %s (%s); the run failed with: %s", path, e, text.split("\n", 1)[0])
        print(f"segrefine: could not write {path} ({e})", file=sys.stderr)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return headline(run_recording_failure(train, cfg), cfg)


def main() -> None:
    check_config_dir()
    _hydra_main()


if __name__ == "__main__":
    main()
