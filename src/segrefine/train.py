"""Train one backbone + head: ``python -m segrefine.train [overrides]`` or ``segrefine-train``.

``train(cfg)`` is a plain function (usable from tests and notebooks); ``main`` is the thin
Hydra wrapper. Writes ``<output_dir>/results.json`` last, atomically, only on success.
Builders live in ``segrefine.build``, the output-folder rules in ``segrefine.runs``; torch
and Lightning are imported only once a job really runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from segrefine.configs import CONFIG_DIR, check_config_dir
from segrefine.console import is_verbose, job_line, quiet_console
from segrefine.runs import (
    check_resume,
    evaluation_fields,
    finished_run,
    headline,
    headline_key,
    resume_checkpoint,
    run_record,
    run_cli_job,
    set_threads,
)
from segrefine.labels import check_label
from segrefine.validation import check_config

log = logging.getLogger(__name__)
# Whole-run values of results.json's metrics that also go to the wandb run's summary.
SUMMARY_KEYS = ("params", "params/trainable", "train/fit_seconds", "train/steps", "train/best_epoch",
                "val/iou_best", "val/iou_best_epoch")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, write results.json; returns the metrics dict. A finished
    job is skipped (``force=true`` redoes it); an interrupted one resumes from ``last.ckpt``."""
    check_train_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if (previous := previous_results(cfg, output_dir)) is not None:
        return previous["metrics"]

    import pytorch_lightning as pl
    from segrefine.build import (build_callbacks, build_data, build_loggers, build_module, build_trainer, check_trainable,
                                 initialise_from, run_info)
    from segrefine.callbacks import StopOnSignal
    from segrefine.distributed import use_job_command_under_hydra
    from segrefine.tracking import BestValue, finish_wandb

    check_trainable(cfg)
    set_threads(cfg.get("num_threads"))
    pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = checkpoint_to_resume(cfg, output_dir)
    datamodule = build_data(cfg)
    check_training_steps(cfg, datamodule)
    module = build_module(cfg, datamodule)
    if cfg.get("init_from"):
        initialise_from(module, cfg.init_from, cfg.head._target_)
    if ckpt_path is None:
        remove_stale_checkpoints(output_dir)
    use_job_command_under_hydra()
    try:
        run = run_info(cfg, "train", resume=ckpt_path is not None)
        logger = build_loggers(cfg, run)
        best = BestValue("val/iou", "max")  # the summary's best val/iou beside the last
        callbacks = [*build_callbacks(cfg, with_logger=bool(logger)), best, StopOnSignal(str(output_dir / "checkpoints" / "last.ckpt"))]
        trainer = build_trainer(cfg, logger, callbacks, output_dir, atomic_checkpoints=True)
        metrics, checkpoint = fit_and_test(cfg, trainer, module, datamodule, ckpt_path, best, logger)
        if trainer.is_global_zero:  # one results.json per job, written by rank 0
            write_train_results(cfg, output_dir, run, logger, module, metrics, checkpoint)
        return metrics
    finally:
        finish_wandb(sys.exc_info()[1])  # the exception in flight, if any: the wandb run is marked failed


def check_train_config(cfg: DictConfig) -> None:
    """Print the config if asked (``print_config``); refuse what can be refused before torch
    loads (the head's own refusal: ``build.check_trainable``)."""
    if cfg.get("print_config"):
        print(OmegaConf.to_yaml(cfg, resolve=True))
    check_config(OmegaConf.to_container(cfg, resolve=True))
    check_label(cfg.get("label"))


def previous_results(cfg: DictConfig, output_dir: Path) -> dict | None:
    """The results of this config already complete in ``output_dir`` (the job is skipped), or
    None; None too when the user asks for training here (``force`` or ``ckpt_path``)."""
    if cfg.get("force") or cfg.get("ckpt_path"):
        return None
    previous = finished_run(cfg, output_dir)
    if previous is not None:
        log.info("%s already has complete results for this config: skipped (force=true to redo)", output_dir)
    return previous


def checkpoint_to_resume(cfg: DictConfig, output_dir: Path) -> str | None:
    """The checkpoint to continue from (``ckpt_path``, or the interrupted run's ``last.ckpt``
    under ``resume``), checked against this config; None to start afresh."""
    ckpt_path, automatic = resume_checkpoint(cfg, output_dir)
    if ckpt_path is not None:
        check_resume(cfg, ckpt_path, automatic)
        log.info("resuming the interrupted run from %s", ckpt_path)
    return ckpt_path


def remove_stale_checkpoints(output_dir: Path) -> None:
    """Starting afresh (resume=false / force=true) over an earlier attempt: Lightning would
    write last-v1.ckpt beside the old last.ckpt, which a later resume would then pick up."""
    stale = output_dir / "checkpoints"
    if (stale / "last.ckpt").is_file():
        log.warning("starting afresh: removing the earlier attempt's checkpoints in %s", stale)
        shutil.rmtree(stale)


def fit_and_test(cfg: DictConfig, trainer, module, datamodule, ckpt_path: str | None, best, logger
                 ) -> tuple[dict[str, float], str | None]:
    """Fit, then test the best checkpoint (unless ``test=false``); the run's metrics (the last
    and best validation values, test metrics, parameter counts, training cost) and the tested
    checkpoint (None when not tested)."""
    from segrefine.data.common import evaluation_loader
    from segrefine.tracking import log_per_image_table

    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    fit_seconds = time.perf_counter() - fit_start

    metrics: dict[str, float] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    # Read before testing: trainer.test(ckpt_path=best) restores the callbacks' state of that epoch.
    metrics.update(best.values())
    checkpoint = None
    if cfg.get("test", True):
        checkpoint = _best_checkpoint(trainer)
        trainer.test(module, dataloaders=evaluation_loader(datamodule, "test"), ckpt_path=checkpoint,
                     verbose=False, weights_only=True)
        metrics.update(module.test_results)
        log_per_image_table(logger, module.test_rows)
        log_per_image_table(logger, module.volume_rows, key="test/per_volume")
    metrics.update(module.parameter_counts())
    # Training cost of this invocation (validation included; a resumed run counts its own part).
    metrics["train/fit_seconds"] = fit_seconds
    metrics["train/steps"] = trainer.global_step
    metrics["train/best_epoch"] = _best_epoch(trainer)
    return metrics, checkpoint


def write_train_results(cfg: DictConfig, output_dir: Path, run, logger, module, metrics: dict[str, float],
                        checkpoint: str | None) -> None:
    """The wandb summary, then results.json (last: its presence means the run is complete)."""
    from segrefine.tracking import close_wandb, log_summary

    # The same values as wandb summary columns (the runs table), under the same keys.
    # metrics_protocol: the report's default columns (the curated config drops metrics.protocol).
    # label: the row in words, for readers of the runs table (the run's name adds the seed).
    log_summary(logger, {**{k: metrics[k] for k in SUMMARY_KEYS}, "metrics_protocol": cfg.metrics.protocol,
                         "label": run.label})
    wandb_info = close_wandb(logger)  # before results.json, which records whether its log is whole
    run_record(
        cfg, "train",
        label=run.label,
        metrics=metrics,
        per_image=module.test_rows,
        checkpoint=os.path.relpath(checkpoint, output_dir) if checkpoint else None,
        **(evaluation_fields(module, output_dir, cfg) if cfg.get("test", True) else {}),
        wandb=wandb_info,
    ).write(output_dir)


def check_training_steps(cfg: DictConfig, datamodule) -> None:
    """Refuse a run that would train no step and still "complete" with its random weights: an
    empty train split, or ``trainer.limit_train_batches`` cutting it to no batch (Lightning
    takes ``int(batches * fraction)``). ``max_steps`` / ``max_epochs`` 0 are refused by
    ``check_config``."""
    from segrefine.validation import ConfigValueError

    batches = len(datamodule.train_dataloader())
    if batches == 0:
        raise ConfigValueError(f"data={cfg.data.get('name')}: the train split is empty: nothing would be trained. "
                               "Give the source training samples (see its split settings)")
    limit = cfg.trainer.get("limit_train_batches")
    if limit is None:
        return
    limited = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    if limited < 1:
        raise ConfigValueError(f"trainer.limit_train_batches={limit!r} of the {batches} training batches is "
                               f"{limited}: nothing would be trained. Raise it (e.g. trainer.limit_train_batches=1)")


def _best_epoch(trainer) -> int | None:
    """The epoch of the best checkpoint (by the checkpoint callback's monitor, ``val/iou``),
    as Lightning stored it in the file, so a resumed run reports it too; None without one."""
    callback = trainer.checkpoint_callback
    if callback is None or not callback.best_model_path:
        return None
    import torch

    return int(torch.load(callback.best_model_path, map_location="cpu", weights_only=True, mmap=True)["epoch"])


def _best_checkpoint(trainer) -> str | None:
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    return callback.best_model_path or callback.last_model_path or None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    quiet_console(is_verbose(cfg))
    metrics = run_cli_job(train, cfg, "train", "segrefine-train")
    print(job_line(cfg.paths.output_dir, metrics, headline_key(cfg)), flush=True)
    return headline(metrics, cfg)


def main() -> None:
    check_config_dir()
    _hydra_main()


if __name__ == "__main__":
    main()
