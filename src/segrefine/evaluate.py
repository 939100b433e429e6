"""Evaluate a checkpoint, optionally under another head: ``segrefine-eval ckpt_path=RUN [head=densecrf]``.

The backbone is rebuilt from the config stored in the checkpoint and loaded with its
weights; the head is the checkpoint's own unless ``head=`` swaps in a post-hoc one, so
``none`` and ``densecrf`` are compared on the very same weights, image by image (the
per-image ids match the training run's). Writes its own results.json (job_type=eval).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from segrefine.configs import CONFIG_DIR, check_config_dir
from segrefine.console import is_verbose, job_line, quiet_console
from segrefine.labels import evaluation_label
from segrefine.record import read_document as read_results
from segrefine.runconfig import comparable_config, config_differences
from segrefine.runs import check_eval_folder, evaluation_fields, headline_key, objective_key, run_cli_job, run_record
from segrefine.validation import ConfigValueError, check_config

log = logging.getLogger(__name__)
SPLITS = ("test", "val")
# Where and how the evaluation runs, taken from the eval config; the rest of the trainer
# config (the training schedule) stays the training run's, so the recorded config says how
# the evaluated model was trained.
RUNTIME_TRAINER_KEYS = ("accelerator", "devices", "precision", "strategy", "num_nodes", "sync_batchnorm",
                        "enable_progress_bar", "enable_model_summary")
__all__ = ["evaluate", "eval_config", "force_data_keys"]


def force_data_keys(overrides: list[str]) -> list[str]:
    """``data.KEY=V`` as ``++data.KEY=V``: the eval config has no data node of its own (the
    checkpoint's is used), so a single key is added here and merged onto the checkpoint's."""
    return [f"++{o}" if re.match(r"^data\.[\w.]+=", o) else o for o in overrides]


def eval_data(requested: Any, train_cfg: DictConfig) -> Any:
    """The data config to evaluate on, refusing what is ambiguous.

    No ``data`` given: the checkpoint's. Single keys (``data.root=...``): the checkpoint's with
    just those keys changed. A whole group (``data=msd``) of another source: that group, as
    given. The group of the checkpoint's own source would silently reset every data key the
    training run set (its name, split seed, ...): refused unless it changes nothing.
    """
    if not requested:
        return train_cfg.data
    data = OmegaConf.to_container(requested, resolve=True)
    trained = OmegaConf.to_container(train_cfg.data, resolve=True)
    if "_target_" not in data:
        unknown = sorted(set(data) - set(trained))
        if unknown:
            raise ConfigValueError(f"data.{unknown[0]} is not a key of the checkpoint's data config "
                             f"(its keys: {', '.join(sorted(trained))})")
        return OmegaConf.merge(train_cfg.data, data)
    if data["_target_"] != trained["_target_"]:
        log.info("evaluating on another data source: %s (trained on %s)", data.get("name"), trained.get("name"))
        return requested
    paths = OmegaConf.to_container(train_cfg.paths, resolve=True)
    differences = config_differences(comparable_config({"paths": paths, "data": trained}),
                                     comparable_config({"paths": paths, "data": data}))
    if differences:
        changes = ", ".join(f"{k} {_value(trained, k)!r} -> {_value(data, k)!r}" for k in differences[:4])
        raise ConfigValueError(
            f"data={data.get('name')} would replace the checkpoint's whole data config by that group's values "
            f"({changes}{', ...' if len(differences) > 4 else ''}). To change single keys of the checkpoint's "
            f"data config pass them alone, without data={data.get('name')} (e.g. data.root=...)"
        )
    return train_cfg.data


def _value(config: dict, dotted: str) -> Any:
    for key in dotted.split(".")[1:]:
        config = config.get(key) if isinstance(config, dict) else None
    return config


def eval_config(cfg: DictConfig, train_cfg: DictConfig) -> DictConfig:
    """The training run's config with this evaluation's head, data keys, runtime trainer keys,
    logger and output folder on top (the training schedule and paths stay the training run's)."""
    run_cfg = train_cfg.copy()
    with open_dict(run_cfg):
        if cfg.get("head"):
            run_cfg.head = cfg.head
        run_cfg.data = eval_data(cfg.get("data"), train_cfg)
        for key in RUNTIME_TRAINER_KEYS:
            if key in cfg.trainer:
                run_cfg.trainer[key] = cfg.trainer[key]
            else:
                run_cfg.trainer.pop(key, None)
        run_cfg.logger = cfg.get("logger")
        run_cfg.paths.output_dir = cfg.paths.output_dir
        run_cfg.pop("boundary_tolerance", None)  # checkpoints from before the metrics group
        run_cfg.metrics = cfg.metrics
        run_cfg.save_predictions = cfg.get("save_predictions")
        run_cfg.name = cfg.name or train_cfg.name
        run_cfg.label = cfg.get("label")  # the evaluation's own (the training run's is the source's)
        run_cfg.run = cfg.get("run")
    return run_cfg


def head_weights(run_cfg: DictConfig, train_cfg: DictConfig, ckpt_file: Path) -> str:
    """Where the evaluated head's parameters come from; refuses a head whose parameters need
    training on a checkpoint trained with another head (they would be random)."""
    from hydra.utils import get_object

    from segrefine.checkpoints import CheckpointError

    if run_cfg.head._target_ == train_cfg.head._target_:
        return "checkpoint"
    untrained = getattr(get_object(run_cfg.head._target_), "untrained", None)
    if untrained is None:
        raise CheckpointError(
            f"head={run_cfg.head.name} has parameters that need training, but {ckpt_file} was trained with "
            f"head={train_cfg.head.name}: they would be random. Evaluate a checkpoint trained with "
            f"head={run_cfg.head.name}, or choose a head that needs no training (e.g. none, densecrf)"
        )
    return untrained


def training_results(ckpt_file: Path) -> dict[str, Any]:
    """The results.json of the run folder holding ``ckpt_file``; {} where there is none readable."""
    try:
        document = read_results(ckpt_file.parent.parent)
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def training_wandb_id(training: dict[str, Any]) -> str | None:
    """The wandb id recorded in a training run's results.json ``training``, if any."""
    wandb = training.get("wandb")
    return wandb.get("id") if isinstance(wandb, dict) else None


def lineage(train_cfg: DictConfig) -> dict[str, Any]:
    """Which training run an evaluation's checkpoint comes from: its head, experiment, seed."""
    return {"head": train_cfg.head.name, "experiment": train_cfg.name, "seed": train_cfg.seed}


def wandb_source(cfg: DictConfig, train_cfg: DictConfig, ckpt_file: Path, run_id: str | None) -> dict[str, Any]:
    """What an evaluation's wandb config says besides the run config: the split, and which
    training run's checkpoint it evaluated (the checkpoint relative to that run's folder and
    its wandb id ``run_id``), so a densecrf row leads back to its ``none`` run."""
    run_folder = ckpt_file.parent.parent if ckpt_file.parent.name == "checkpoints" else ckpt_file.parent
    return {
        "split": cfg.split,
        "source": {"checkpoint": os.path.relpath(ckpt_file, run_folder), "run_id": run_id, **lineage(train_cfg)},
    }


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test (or validate) a checkpoint; write results.json; return the metrics."""
    if cfg.split not in SPLITS:
        raise ConfigValueError(f"split={cfg.split!r} must be one of {SPLITS}")
    import pytorch_lightning as pl

    from segrefine.build import build_data, build_loggers, build_module, build_trainer, run_info
    from segrefine.callbacks import StopOnSignal
    from segrefine.checkpoints import check_targets, load_checkpoint, load_weights, resolve_checkpoint_file
    from segrefine.data.common import evaluation_loader
    from segrefine.distributed import use_job_command_under_hydra
    from segrefine.tracking import close_wandb, finish_wandb, log_per_image_table, log_summary

    ckpt_file = resolve_checkpoint_file(cfg.ckpt_path)
    checkpoint = load_checkpoint(ckpt_file)
    stored = checkpoint["hyper_parameters"]["config"]
    check_targets(stored, f"the config stored in {ckpt_file}")
    train_cfg = OmegaConf.create(stored)
    run_cfg = eval_config(cfg, train_cfg)
    training = training_results(ckpt_file)
    label = evaluation_label(OmegaConf.to_container(run_cfg, resolve=True), stored, training.get("label"), cfg.split)
    if cfg.get("print_config"):
        print(OmegaConf.to_yaml(run_cfg, resolve=True))
    check_config(OmegaConf.to_container(run_cfg, resolve=True))
    weights = head_weights(run_cfg, train_cfg, ckpt_file)
    output_dir = Path(run_cfg.paths.output_dir)
    check_eval_folder(output_dir, run_cfg)
    pl.seed_everything(train_cfg.seed, workers=True)
    datamodule = build_data(run_cfg)
    module = build_module(run_cfg, datamodule)
    load_weights(module, checkpoint, ckpt_file, with_head=weights == "checkpoint")
    module.eval_prefix = cfg.split

    use_job_command_under_hydra()
    try:
        training_id = training_wandb_id(training)
        # An evaluation on the validation split chooses parameters: a tuning job to the tracker.
        run = run_info(run_cfg, "eval" if cfg.split == "test" else "tune", label=label,
                       extra_config=wandb_source(cfg, train_cfg, ckpt_file, training_id))
        logger = build_loggers(run_cfg, run)
        trainer = build_trainer(run_cfg, logger, [StopOnSignal()], output_dir)
        trainer.test(module, dataloaders=evaluation_loader(datamodule, cfg.split), verbose=False)
        params = module.parameter_counts()
        metrics = {**module.test_results, **params}
        if not trainer.is_global_zero:
            return metrics
        log_summary(logger, {**params, "metrics_protocol": run_cfg.metrics.protocol, "label": label})
        log_per_image_table(logger, module.test_rows, key=f"{cfg.split}/per_image")
        log_per_image_table(logger, module.volume_rows, key=f"{cfg.split}/per_volume")
        wandb_info = close_wandb(logger)
        run_record(
            run_cfg, "eval",
            label=label,
            split=cfg.split,
            metrics=metrics,
            per_image=module.test_rows,
            checkpoint=os.path.relpath(ckpt_file, output_dir),
            head_weights=weights,
            source={
                "checkpoint": os.path.relpath(ckpt_file, output_dir),
                **lineage(train_cfg),
                "run_config": comparable_config(stored),
                "wandb_id": training_id,
            },
            **evaluation_fields(module, output_dir, run_cfg),
            wandb=wandb_info,
        ).write(output_dir)
        return metrics
    finally:
        finish_wandb(sys.exc_info()[1])  # the exception in flight, if any: the wandb run is marked failed


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> float | None:
    quiet_console(is_verbose(cfg))
    metrics = run_cli_job(evaluate, cfg, "eval", "segrefine-eval")
    print(job_line(cfg.paths.output_dir, metrics, headline_key(cfg, cfg.split)), flush=True)
    # The value Hydra sweepers (e.g. Optuna over head parameters) optimise: what the report's Δ is on.
    volumetric = f"{cfg.split}/volume/dice" in (metrics or {})  # scored per subject volume
    return (metrics or {}).get(objective_key(cfg.metrics.protocol, cfg.split, volumetric))


def main() -> None:
    check_config_dir()
    sys.argv[1:] = force_data_keys(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
