"""Evaluate a checkpoint, optionally under another head: ``segrefine-eval ckpt_path=RUN [head=densecrf]``.

The backbone is rebuilt from the config stored in the checkpoint and loaded with its
weights; the head is the checkpoint's own unless ``head=`` swaps in a post-hoc one, so
``none`` and ``densecrf`` are compared on the very same weights, image by image (the
per-image ids match the training run's). Writes its own results.json (job_type=eval).
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from segrefine.results import FILENAME, read_results, write_results
from segrefine.tracking import finish_wandb, log_per_image_table, wandb_run_info
from segrefine.train import CONFIG_DIR, build_data, build_logger, build_module, check_config_dir, run_info, run_record

log = logging.getLogger(__name__)
SPLITS = ("test", "val")


class CheckpointError(ValueError):
    pass


def resolve_eval_checkpoint(ckpt_path: str | Path) -> Path:
    """A .ckpt file, or a run folder -> the checkpoint its results.json names (else last.ckpt)."""
    path = Path(ckpt_path)
    if path.is_dir():
        if (path / FILENAME).is_file() and read_results(path).get("checkpoint"):
            path = path / read_results(path)["checkpoint"]
        else:
            path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={str(ckpt_path)!r}: no checkpoint at {path}")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    config = checkpoint.get("hyper_parameters", {}).get("config") if isinstance(checkpoint, dict) else None
    if not config or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a segrefine checkpoint (it holds no segrefine run config)")
    return checkpoint


def eval_config(cfg: DictConfig, train_cfg: DictConfig) -> DictConfig:
    """The training run's config with this evaluation's data/head/trainer/logger/paths on top."""
    run_cfg = train_cfg.copy()
    with open_dict(run_cfg):
        for key in ("data", "head"):
            if cfg.get(key):
                run_cfg[key] = cfg[key]
        for key in ("trainer", "logger", "paths", "boundary_tolerance"):
            run_cfg[key] = cfg.get(key)
        run_cfg.name = cfg.name or train_cfg.name
        run_cfg.callbacks = {}
    return run_cfg


def _load_weights(module, checkpoint: dict, same_head: bool, path: Path) -> None:
    state = checkpoint["state_dict"]
    part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    try:
        module.backbone.load_state_dict(part("backbone."))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: backbone weights do not fit the stored backbone config ({e})") from e
    if same_head:
        module.head.load_state_dict(part("head."))


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test (or validate) a checkpoint; write results.json; return the metrics."""
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r} must be one of {SPLITS}")
    ckpt_file = resolve_eval_checkpoint(cfg.ckpt_path)
    checkpoint = load_checkpoint(ckpt_file)
    train_cfg = OmegaConf.create(checkpoint["hyper_parameters"]["config"])
    run_cfg = eval_config(cfg, train_cfg)
    if cfg.get("print_config"):
        print(OmegaConf.to_yaml(run_cfg, resolve=True))
    output_dir = Path(run_cfg.paths.output_dir)
    pl.seed_everything(train_cfg.seed, workers=True)
    datamodule = build_data(run_cfg)
    module = build_module(run_cfg, datamodule)
    _load_weights(module, checkpoint, run_cfg.head._target_ == train_cfg.head._target_, ckpt_file)
    module.eval_prefix = cfg.split

    try:
        logger = build_logger(run_cfg, run_info(run_cfg, "eval"))
        trainer = hydra.utils.instantiate(run_cfg.trainer, logger=logger, callbacks=[], default_root_dir=str(output_dir))
        loader = datamodule.test_dataloader() if cfg.split == "test" else datamodule.val_dataloader()
        trainer.test(module, dataloaders=loader, verbose=False)
        metrics = {**module.test_results, "params": module.parameter_count()}
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
                "wandb": wandb_run_info(logger),
            },
        )
        log.info("results written to %s", output_dir / FILENAME)
        return metrics
    finally:
        finish_wandb()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> float | None:
    metrics = evaluate(cfg)
    # The value Hydra sweepers (e.g. Optuna) optimise.
    return metrics.get(f"{cfg.split}/iou")


def main() -> None:
    check_config_dir()
    _hydra_main()


if __name__ == "__main__":
    main()
