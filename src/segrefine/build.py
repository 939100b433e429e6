"""Builders: the DataModule, the model, the loggers, the callbacks and the Trainer of a run,
from its Hydra config. ``train``, ``evaluate`` and ``tuning`` build through these and nothing
else."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from segrefine.checkpoints import AtomicCheckpointIO, load_checkpoint, load_weights, resolve_checkpoint_file
from segrefine.metrics import PROTOCOLS
from segrefine.module import SegmentationModule
from segrefine.provenance import provenance
from segrefine.labels import run_label
from segrefine.runconfig import RUN_ONLY_DECLARATION, config_group, curated_config
from segrefine.tracking import RunInfo
from segrefine.validation import ConfigValueError, class_count_problem, rule_problems

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
        raise ConfigValueError(
            "boundary_tolerance moved to metrics.boundary_tolerance (a fraction of the image diagonal, "
            "default 0.0075); for pixels use metrics.boundary_tolerance=2 metrics.boundary_tolerance_unit=pixels"
        )
    protocol = cfg.metrics.get("protocol")
    if protocol not in PROTOCOLS:
        raise ConfigValueError(f"metrics.protocol={protocol!r} must be one of {tuple(PROTOCOLS)} (metrics=standard|unet_crfrnn)")
    merge = cfg.metrics.get("merge_foreground", False)
    if not isinstance(merge, bool):
        raise ConfigValueError(f"metrics.merge_foreground={merge!r} must be true or false")


# Keys of a backbone or head config that describe the component rather than configure it:
# ``name`` labels it (tables, wandb groups, job names); ``tuned`` records how a tuning
# protocol chose some of its values (segrefine.tuning); ``run_only`` lists its keys that never
# change a result (segrefine.runconfig).
DESCRIPTIVE_KEYS = ("name", "tuned", RUN_ONLY_DECLARATION)


def build_component(node: DictConfig, **kwargs: Any) -> Any:
    """A backbone or head from its config node (``cfg.backbone`` / ``cfg.head``), without the
    descriptive keys; ``kwargs`` are what the run supplies (channels, classes, the backbone).
    The class's own ``CONFIG_RULES`` (types and ranges of its keys) are checked first, so a bad
    value is refused naming the key rather than failing inside the component."""
    # Resolved in place first: a node's interpolations may point elsewhere in the run config
    # (conf/backbone/unet.yaml reads head.coarse_stride).
    config = OmegaConf.to_container(node, resolve=True)
    rules = getattr(get_class(config["_target_"]), "CONFIG_RULES", None) if "_target_" in config else None
    if rules and (problems := rule_problems(config, rules, prefix=node._key() if isinstance(node, DictConfig) else None)):
        raise ConfigValueError("; ".join(problems))
    return instantiate({key: value for key, value in config.items() if key not in DESCRIPTIVE_KEYS}, **kwargs)


def check_trainable(cfg: DictConfig) -> None:
    """Refuse to train a head configured for post-hoc use only (its ``training_problem``)."""
    head = get_class(cfg.head._target_)
    if problem := head.training_problem(OmegaConf.to_container(cfg.head, resolve=True)):
        raise ConfigValueError(problem)


def build_module(cfg: DictConfig, datamodule) -> SegmentationModule:
    check_metrics_config(cfg)
    # Every source, also those that count their classes themselves (MSD's dataset.json).
    if problem := class_count_problem(datamodule.num_classes, f"data={cfg.data.get('name')}: num_classes"):
        raise ConfigValueError(problem)
    if cfg.head.get("volume") and not hasattr(datamodule, "volume_dataloader"):
        raise ConfigValueError(f"head.volume=true refines whole subject volumes, but data={cfg.data.get('name')} is not "
                               "a volumetric source (use data=msd, or head.volume=false for the 2-D CRF)")
    backbone = build_component(cfg.backbone, in_channels=datamodule.in_channels, num_classes=datamodule.num_classes)
    head = build_component(cfg.head, num_classes=datamodule.num_classes, backbone=backbone.spec())
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
        nsd_tolerance_mm=cfg.metrics.get("nsd_tolerance_mm", 1.0),
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


def run_info(cfg: DictConfig, job_type: str, resume: bool = False, extra_config: dict | None = None,
             label: str | None = None) -> RunInfo:
    """How trackers file a run. Name ``<label> s<seed>``; group: one per exact configuration
    (``runconfig.config_group``: a report row, its seeds and evaluations inside, never two
    configurations in one); the experiment a tag ``experiment:<name>`` and the config key
    ``experiment``. Config: the curated run config (no run-only keys, no machine paths), the
    code's provenance and ``extra_config`` (an evaluation's split and source). ``label``:
    the run's label if the caller composed it (evaluations), else ``labels.run_label``."""
    config = OmegaConf.to_container(cfg, resolve=True)
    label = label or run_label(config)
    return RunInfo(
        output_dir=cfg.paths.output_dir,
        experiment=cfg.name,
        job_type=job_type,
        label=label,
        run_name=f"{label} s{cfg.seed}",
        group=config_group(config),
        tags=[cfg.data.name, cfg.backbone.name, cfg.head.name, f"experiment:{cfg.name}"],
        config={**curated_config(config), "experiment": cfg.name, "provenance": provenance(), **(extra_config or {})},
        resume=resume,
    )


def logger_configs(node: Any) -> list[DictConfig]:
    """The Lightning logger configs of ``cfg.logger``: a mapping of named ones
    (``logger=[wandb,csv]``), or a single config with a ``_target_`` (configs of older runs)."""
    if not node:
        return []
    if "_target_" in node:
        return [node]
    return [c for c in node.values() if c is not None and "_target_" in c]


def build_loggers(cfg: DictConfig, run: RunInfo) -> list | bool:
    """The configured loggers (False for none), with ``run``'s name, group, job type, tags and
    resume flag in the ``run`` node their configs interpolate, and the curated run config as
    every logger's hyperparameters (Lightning's own call for that)."""
    filled = copy.deepcopy(cfg)
    with open_dict(filled):
        filled.run = run.interpolated()
    loggers = [instantiate(node, _convert_="all") for node in logger_configs(filled.get("logger"))]
    for logger in loggers:
        logger.log_hyperparams(run.config)
    return loggers or False


def build_callbacks(cfg: DictConfig, with_logger: bool = True) -> list[pl.Callback]:
    """The configured callbacks; without a logger, those that need one (LearningRateMonitor)
    are left out rather than failing the run."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]
    if not with_logger:
        callbacks = [c for c in callbacks if type(c).__name__ != "LearningRateMonitor"]
    return callbacks


def build_trainer(cfg: DictConfig, loggers: list | bool, callbacks: list[pl.Callback], output_dir: str | Path,
                  atomic_checkpoints: bool = False) -> pl.Trainer:
    """The configured Trainer (``cfg.trainer``) writing under ``output_dir``. With
    ``atomic_checkpoints`` (training) a checkpoint is written to a temporary file and renamed,
    so an interrupted save never leaves a truncated ``last.ckpt`` to resume from."""
    plugins = {"plugins": [AtomicCheckpointIO()]} if atomic_checkpoints else {}
    return instantiate(cfg.trainer, logger=loggers, callbacks=callbacks, default_root_dir=str(output_dir), **plugins)
