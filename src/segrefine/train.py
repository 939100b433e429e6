"""Train one backbone + head: ``python -m segrefine.train [overrides]`` or ``segrefine-train``.

``train(cfg)`` is a plain function (usable from tests and notebooks); ``main`` is the thin
Hydra wrapper. Writes ``<output_dir>/results.json`` last, atomically, only on success.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from segrefine.checkpoints import load_checkpoint, load_weights, resolve_checkpoint_file
from segrefine.results import write_results
from segrefine.tracking import RunInfo, finish_wandb, log_per_image_table, wandb_run_info

log = logging.getLogger(__name__)

CONFIG_DIR = os.environ.get("SEGREFINE_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf"))


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


def build_module(cfg: DictConfig, datamodule) -> "SegmentationModule":
    from segrefine.module import SegmentationModule

    backbone = instantiate(cfg.backbone, in_channels=datamodule.in_channels, num_classes=datamodule.num_classes)
    head = instantiate(cfg.head, num_classes=datamodule.num_classes, backbone=backbone)
    return SegmentationModule(
        backbone=backbone,
        head=head,
        num_classes=datamodule.num_classes,
        class_names=datamodule.class_names,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        boundary_tolerance=cfg.boundary_tolerance,
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


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, write results.json; returns the metrics dict."""
    if cfg.get("print_config"):
        print(OmegaConf.to_yaml(cfg, resolve=True))
    output_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"), output_dir)
    datamodule = build_data(cfg)
    module = build_module(cfg, datamodule)
    if cfg.get("init_from"):
        initialise_from(module, cfg.init_from, cfg.head._target_)

    try:
        logger = build_logger(cfg, run_info(cfg, "train", resume=ckpt_path is not None))
        callbacks = build_callbacks(cfg)
        trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(output_dir))
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

        metrics: dict[str, float] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        checkpoint = None
        if cfg.get("test", True):
            checkpoint = _best_checkpoint(trainer)
            trainer.test(module, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)
            metrics.update(module.test_results)
            log_per_image_table(logger, module.test_rows)
        metrics["params"] = module.parameter_count()
        write_results(
            output_dir,
            {
                **run_record(cfg, "train"),
                "metrics": metrics,
                "per_image": module.test_rows,
                "checkpoint": os.path.relpath(checkpoint, output_dir) if checkpoint else None,
                "wandb": wandb_run_info(logger),
            },
        )
        log.info("results written to %s", output_dir / "results.json")
        return metrics
    finally:
        finish_wandb()


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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get("test/iou")


def main() -> None:
    check_config_dir()
    _hydra_main()


if __name__ == "__main__":
    main()
