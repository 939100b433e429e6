"""Evaluate a checkpoint, optionally under another head: ``segrefine-eval ckpt_path=RUN [head=densecrf]``.

The backbone is rebuilt from the config stored in the checkpoint and loaded with its
weights; the head is the checkpoint's own unless ``head=`` swaps in a post-hoc one, so
``none`` and ``densecrf`` are compared on the very same weights, image by image (the
per-image ids match the training run's). Writes its own results.json (job_type=eval).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from segrefine.checkpoints import CheckpointError, load_checkpoint, load_weights, resolve_checkpoint_file
from segrefine.distributed import use_job_command_for_ddp
from segrefine.results import FILENAME, write_results
from segrefine.tracking import finish_wandb, log_per_image_table, wandb_run_info
from segrefine.train import (
    CONFIG_DIR,
    build_data,
    build_logger,
    build_module,
    check_config_dir,
    evaluation_record,
    headline,
    run_info,
    run_record,
    run_recording_failure,
)

log = logging.getLogger(__name__)
SPLITS = ("test", "val")
__all__ = ["evaluate", "eval_config", "CheckpointError"]


def eval_config(cfg: DictConfig, train_cfg: DictConfig) -> DictConfig:
    """The training run's config with this evaluation's data/head/trainer/logger/paths on top."""
    run_cfg = train_cfg.copy()
    with open_dict(run_cfg):
        for key in ("data", "head"):
            if cfg.get(key):
                run_cfg[key] = cfg[key]
        run_cfg.pop("boundary_tolerance", None)  # checkpoints from before the metrics group
        for key in ("trainer", "logger", "paths", "metrics", "save_predictions"):
            run_cfg[key] = cfg.get(key)
        run_cfg.name = cfg.name or train_cfg.name
        run_cfg.callbacks = {}
    return run_cfg


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test (or validate) a checkpoint; write results.json; return the metrics."""
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r} must be one of {SPLITS}")
    ckpt_file = resolve_checkpoint_file(cfg.ckpt_path)
    checkpoint = load_checkpoint(ckpt_file)
    train_cfg = OmegaConf.create(checkpoint["hyper_parameters"]["config"])
    run_cfg = eval_config(cfg, train_cfg)
    if cfg.get("print_config"):
        print(OmegaConf.to_yaml(run_cfg, resolve=True))
    output_dir = Path(run_cfg.paths.output_dir)
    pl.seed_everything(train_cfg.seed, workers=True)
    datamodule = build_data(run_cfg)
    module = build_module(run_cfg, datamodule)
    load_weights(module, checkpoint, ckpt_file, with_head=run_cfg.head._target_ == train_cfg.head._target_)
    module.eval_prefix = cfg.split

    if HydraConfig.initialized():
        use_job_command_for_ddp()
    try:
        logger = build_logger(run_cfg, run_info(run_cfg, "eval"))
        trainer = hydra.utils.instantiate(run_cfg.trainer, logger=logger, callbacks=[], default_root_dir=str(output_dir))
        loader = datamodule.test_dataloader() if cfg.split == "test" else datamodule.val_dataloader()
        trainer.test(module, dataloaders=loader, verbose=False)
        metrics = {**module.test_results, "params": module.parameter_count()}
        if not trainer.is_global_zero:
            return metrics
        log_per_image_table(logger, module.test_rows, key=f"{cfg.split}/per_image")
        write_results(
            output_dir,
            {
                **run_record(run_cfg, "eval"),
                "split": cfg.split,
                "metrics": metrics,
                "per_image": module.test_rows,
                "checkpoint": os.path.relpath(ckpt_file, output_dir),
                "source": {"head": train_cfg.head.name, "experiment": train_cfg.name},
                **evaluation_record(module, output_dir, run_cfg),
                "wandb": wandb_run_info(logger),
            },
        )
        log.info("results written to %s", output_dir / FILENAME)
        return metrics
    finally:
        finish_wandb()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> float | None:
    # The value Hydra sweepers (e.g. Optuna) optimise.
    return headline(run_recording_failure(evaluate, cfg), cfg, cfg.split)


def main() -> None:
    check_config_dir()
    _hydra_main()


if __name__ == "__main__":
    main()
