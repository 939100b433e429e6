"""Builders: the DataModule, the model, the logger and the callbacks of a run, from its
Hydra config. ``train``, ``evaluate`` and ``tuning`` build through these and nothing else."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from segrefine.checkpoints import load_checkpoint, load_weights, resolve_checkpoint_file
from segrefine.metrics import PROTOCOLS
from segrefine.module import SegmentationModule
from segrefine.provenance import provenance
from segrefine.runconfig import curated_config
from segrefine.tracking import RunInfo

log = logging.getLogger(__name__)


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
    merge = cfg.metrics.get("merge_foreground", False)
    if not isinstance(merge, bool):
        raise ValueError(f"metrics.merge_foreground={merge!r} must be true or false")


# Keys of a backbone or head config that describe the component rather than configure it:
# ``name`` labels it (tables, wandb groups, job names); ``tuned`` records how a tuning
# protocol chose some of its values (segrefine.tuning).
DESCRIPTIVE_KEYS = ("name", "tuned")


def build_component(node: DictConfig, **kwargs: Any) -> Any:
    """A backbone or head from its config node (``cfg.backbone`` / ``cfg.head``), without the
    descriptive keys; ``kwargs`` are what the run supplies (channels, classes, the backbone)."""
    # Resolved in place first: a node's interpolations may point elsewhere in the run config
    # (conf/backbone/unet.yaml reads head.coarse_stride).
    config = OmegaConf.to_container(node, resolve=True)
    return instantiate({key: value for key, value in config.items() if key not in DESCRIPTIVE_KEYS}, **kwargs)


def build_module(cfg: DictConfig, datamodule) -> SegmentationModule:
    check_metrics_config(cfg)
    backbone = build_component(cfg.backbone, in_channels=datamodule.in_channels, num_classes=datamodule.num_classes)
    head = build_component(cfg.head, num_classes=datamodule.num_classes, backbone=backbone)
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
        merge_foreground=cfg.metrics.get("merge_foreground", False),
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


def run_info(cfg: DictConfig, job_type: str, resume: bool = False, extra_config: dict | None = None) -> RunInfo:
    """How the tracker files a run. Group ``backbone-head-data``, so wandb's grouped runs table
    has one row per compared model (seeds, experiments and job types inside it); the
    experiment is a tag ``experiment:<name>`` and the config key ``experiment``. Config: the
    curated run config (no run-only keys, no machine paths), the code's provenance and
    ``extra_config`` (an evaluation's split and source)."""
    return RunInfo(
        output_dir=cfg.paths.output_dir,
        experiment=cfg.name,
        job_type=job_type,
        run_name=f"{cfg.backbone.name}-{cfg.head.name}-s{cfg.seed}",
        group=f"{cfg.backbone.name}-{cfg.head.name}-{cfg.data.name}",
        tags=[cfg.data.name, cfg.backbone.name, cfg.head.name, f"experiment:{cfg.name}"],
        config={**curated_config(OmegaConf.to_container(cfg, resolve=True)), "experiment": cfg.name,
                "provenance": provenance(), **(extra_config or {})},
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
