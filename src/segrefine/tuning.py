"""Choose a post-hoc head's parameters on the validation split (the DeepLab protocol).

``tune_densecrf`` searches the DenseCRF parameters of one trained checkpoint with Optuna
(TPE, log-scale ranges) and writes the tuned head config to a folder of the caller's (never
into the package's conf/). The backbone runs over the validation split once; each trial only
re-runs the CRF, scored on what the report's Δ is on: the protocol's per-image headline metric
averaged over images (``val/iou_image``, or ``val/unet_crfrnn/iu``), exactly as
``segrefine-eval split=val`` computes it. With ``head.volume=true`` among the overrides it
tunes the 3-D CRF: on whole validation subjects, widths in mm, scored on the split's slices of
the refined volumes (as segrefine-eval).

``SaveTunedHead`` does the same bookkeeping for a Hydra Optuna sweep over ``segrefine-eval``
(experiments/tune_densecrf).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from segrefine.crf.params import PYDENSECRF_KERNELS, CRFKernels
from segrefine.runs import objective_key

# Log-scale ranges. The weights reach ~0, so a CRF too weak to change most predictions is in the
# space (and enqueued). Even 1e-3 can flip a pixel whose class margin is tiny, so when no trial
# beats no CRF on the validation split the tuned CRF is the identity (both weights 0, NO_CRF):
# the tuned CRF is never worse than no CRF on the validation split. Keys: the CRFKernels fields
# (= the head's config keys).
SEARCH_SPACE = {
    "gaussian_sxy": (0.5, 10.0),
    "gaussian_compat": (1e-3, 20.0),
    "bilateral_sxy": (1.0, 160.0),
    "bilateral_schan": (1.0, 100.0),
    "bilateral_compat": (1e-3, 20.0),
}
_WEAKEST = CRFKernels().replace(gaussian_compat=1e-3, bilateral_compat=1e-3)
# Tried first, in this order: pydensecrf's README values, segrefine's defaults (CRFKernels(), the
# values of conf/head/densecrf.yaml), and the weakest corner of the space (practically no CRF).
# Plain dicts: they are Optuna trial parameters and JSON.
ENQUEUED = {"pydensecrf": PYDENSECRF_KERNELS.as_dict(), "segrefine": CRFKernels().as_dict(),
            "weakest": _WEAKEST.as_dict()}
NO_CRF = _WEAKEST.replace(gaussian_compat=0.0, bilateral_compat=0.0).as_dict()
TUNED_FILE = "densecrf_tuned.yaml"


def tuned_record(trials: int, keys: Iterable[str], by: str = "densecrf") -> dict[str, Any]:
    """``head.tuned``: how the listed parameters were chosen. Only protocol settings belong here
    (run configs compare it literally; the listed parameters compare as "<tuned>")."""
    return {"split": "val", "trials": int(trials), "sampler": "tpe", "by": by, "keys": sorted(keys)}


def tuned_densecrf(values: dict[str, float], trials: int, volume: bool = False) -> DictConfig:
    """conf/head/densecrf.yaml with the kernel ``values`` (the 3-D CRF's if ``volume``) and
    their ``tuned`` record: what ``tune_densecrf`` writes."""
    from segrefine.configs import CONFIG_DIR

    head = OmegaConf.load(Path(CONFIG_DIR, "head", "densecrf.yaml"))
    for key, value in values.items():
        head[key] = value
    if volume:
        head.volume = True
    head.tuned = tuned_record(trials, values)
    return head


def tuned_overrides(head_file: Path, name: str | None = None) -> list[str]:
    """Hydra overrides that give the composed head (densecrf, or crfrnn's initial values) the
    tuned values of ``head_file`` (written by ``tune_densecrf``) and its ``head.tuned`` record;
    ``name`` renames the head."""
    saved = OmegaConf.to_container(OmegaConf.load(head_file))
    tuned = saved["tuned"]
    record = {**tuned, "by": tuned.get("by", "densecrf")}
    overrides = [f"head.{key}={float(saved[key])!r}" for key in tuned["keys"]]
    if saved.get("volume"):  # tuned as the 3-D CRF (widths in mm): only valid as that
        overrides.append("head.volume=true")
    overrides.append("+head.tuned=" + _hydra_value(record))
    if name:
        overrides.append(f"head.name={name}")
    return overrides


def _hydra_value(value: Any) -> str:
    """A Hydra override value for a dict/list of plain strings and numbers."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


# -- tuning ------------------------------------------------------------------------------------


def _validation_cache(cfg: DictConfig) -> tuple[Any, list[Any], DictConfig, bool]:
    """The densecrf head; the validation split with the backbone run once, everything a trial
    needs; the run's ``metrics`` config (its protocol and merge_foreground say what the
    objective scores); whether the source is volumetric.

    Slices: per batch (padded image, backbone logits at that size, mask, height, width).
    Volumetric sources (``volume_dataloader``, e.g. msd): one ``_CachedVolume`` per validation
    subject, for the 2-D CRF as for the 3-D one (``head.volume``): there the subject is the
    unit, and the objective is its volume Dice, as the report compares such runs."""
    from segrefine.checkpoints import load_checkpoint, load_weights, resolve_checkpoint_file
    from segrefine.data.common import evaluation_loader
    from segrefine.evaluate import eval_config
    from segrefine.build import build_data, build_module

    ckpt_file = resolve_checkpoint_file(cfg.ckpt_path)
    checkpoint = load_checkpoint(ckpt_file)
    train_cfg = OmegaConf.create(checkpoint["hyper_parameters"]["config"])
    if train_cfg.head.name != "none":
        raise ValueError(f"ckpt_path={cfg.ckpt_path}: a head={train_cfg.head.name} run; the DenseCRF is tuned on "
                         "the softmax of a head=none run (the network the CRF post-processes)")
    run_cfg = eval_config(cfg, train_cfg)
    datamodule = build_data(run_cfg)
    volumetric = hasattr(datamodule, "volume_dataloader")
    volume_head = bool(run_cfg.head.get("volume"))
    module = build_module(run_cfg, datamodule)  # refuses head.volume=true on slice data
    load_weights(module, checkpoint, ckpt_file, with_head=False)
    module.eval()
    with torch.no_grad():
        if volumetric:
            cache = [_CachedVolume(batch, module, volume_head) for batch in evaluation_loader(datamodule, "val")]
        else:
            cache = []
            for batch in datamodule.val_dataloader():
                padded, _ = module._pad(batch["image"])
                cache.append((*_refinable(padded, module.backbone(padded)), batch["mask"], *batch["image"].shape[-2:]))
    return module.head, cache, run_cfg.metrics, volumetric


def _refinable(padded: torch.Tensor, out) -> tuple[torch.Tensor, Any]:
    """(padded image, the backbone's logits upsampled to it): what a 2-D head refines, as it
    would upsample them itself."""
    from segrefine.heads.base import upsample_logits
    from segrefine.types import BackboneOutput

    return padded, BackboneOutput(upsample_logits(out, padded.shape[-2:]), [], (), 1)


class _CachedVolume:
    """A validation subject as ``SegmentationModule.volume_logits`` would run it, the backbone
    done: the 3-D CRF's unrefined slice logits, or the 2-D CRF's inputs per chunk of slices."""

    def __init__(self, batch: dict, module, volume_head: bool):
        self.batch = batch
        self.logits = module.volume_logits(batch, refine=False) if volume_head else None
        self.chunks = [] if volume_head else [(*_refinable(padded, out), h, w)
                                              for padded, out, h, w in module.volume_chunks(batch)]

    def predict(self, head) -> torch.Tensor:
        """(S, H, W) labels of every slice, refined by ``head`` (None: the backbone's own)."""
        batch = self.batch
        if self.logits is not None:
            logits = self.logits if head is None else head.refine_volume(
                self.logits, batch["image"], batch["spacing"], batch["height"], batch["width"])
        else:
            logits = torch.cat([(out.logits if head is None else head(out, padded))[..., :h, :w]
                                for padded, out, h, w in self.chunks])
        return logits.argmax(1)


def _val_objective(head, cache, num_classes: int, protocol: str, merge: bool = False) -> float:
    """``objective_key`` as segrefine-eval computes it. Slices: the per-image headline metric
    (``metrics.per_image_metrics``' definitions) averaged over the validation images. Subject
    volumes: each subject's volume Dice (``metrics.volume_dice``, the volume without padding),
    averaged over the validation subjects (NaN left out), as ``val/volume/dice``."""
    from segrefine.metrics import (_class_mean, _confusions, foreground_mean, per_class_iou, unet_crfrnn_per_image,
                                   volume_dice)

    def headline(preds: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if protocol == "unet_crfrnn":  # with the run's metrics.merge_foreground, as evaluation scores it
            return unet_crfrnn_per_image(preds, masks, num_classes, merge=merge)["iu"]
        return foreground_mean(per_class_iou(_confusions(preds, masks, num_classes)))

    with torch.no_grad():
        if cache and isinstance(cache[0], _CachedVolume):
            dice = []
            for volume in cache:
                height, width = volume.batch["height"], volume.batch["width"]
                preds = volume.predict(head)[:, :height, :width]
                dice.append(volume_dice(preds, volume.batch["mask"][:, :height, :width], num_classes))
            return _class_mean(dice)
        values = []
        for image, out, mask, height, width in cache:
            preds = (head(out, image) if head is not None else out.logits)[..., :height, :width].argmax(1)
            values.append(headline(preds, mask))
    return float(torch.cat(values).mean())


def tuning_outcome(best: dict[str, float]) -> str:
    """Which point won: ``no_crf`` (zero kernel weights), one of the enqueued starting points
    (``pydensecrf``, ``segrefine`` = the head's defaults, ``weakest``) or ``new``."""
    if best == NO_CRF:
        return "no_crf"
    return next((name for name, point in ENQUEUED.items() if point == best), "new")


def tune_densecrf(ckpt_path: str | Path, output: Path, trials: int, overrides: Iterable[str] = (), seed: int = 0) -> dict:
    """Tune the DenseCRF parameters of a head=none checkpoint on its validation split.

    Writes ``output/densecrf_tuned.yaml`` (conf/head/densecrf.yaml with the best values and a
    ``tuned`` record) and ``output/tuning.json`` (every trial, the none run's value); returns
    the latter. ``overrides`` are eval-config overrides (paths, head.num_workers, ...).
    """
    import optuna

    from segrefine.configs import compose

    if trials < len(ENQUEUED):
        raise ValueError(f"trials={trials}: at least {len(ENQUEUED)}, the enqueued starting points {list(ENQUEUED)}")
    output = Path(output)
    cfg = compose("eval", [f"ckpt_path={ckpt_path}", "head=densecrf", "split=val", "logger=none",
                           f"paths.output_dir={output}", *overrides])
    head, cache, metrics_cfg, volumetric = _validation_cache(cfg)
    num_classes, protocol = head.num_classes, metrics_cfg.protocol
    merge = bool(metrics_cfg.get("merge_foreground", False))
    none_value = _val_objective(None, cache, num_classes, protocol, merge)

    def objective(trial: optuna.Trial) -> float:
        values = {k: trial.suggest_float(k, lo, hi, log=True) for k, (lo, hi) in SEARCH_SPACE.items()}
        head.kernels = CRFKernels(**values)
        return _val_objective(head, cache, num_classes, protocol, merge)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    with warnings.catch_warnings():  # enqueue_trial is "experimental" in optuna 2.x
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for params in ENQUEUED.values():
            study.enqueue_trial(params)
    try:
        study.optimize(objective, n_trials=trials)
        best, best_value = {k: float(v) for k, v in study.best_params.items()}, float(study.best_value)
        no_crf = best_value <= none_value
        if no_crf:  # nothing beat no CRF: keep the predictions (zero pairwise weights change nothing)
            head.kernels = CRFKernels(**NO_CRF)
            best, best_value = dict(NO_CRF), _val_objective(head, cache, num_classes, protocol, merge)  # needs the pool
    finally:
        if getattr(head, "_pool", None) is not None:
            head._pool.shutdown(cancel_futures=True)
    saved = tuned_densecrf(best, trials, volume=head.volume)
    metric = objective_key(protocol, volumetric=volumetric)
    summary = {
        "checkpoint": str(ckpt_path), "split": "val", "metric": metric, "volume": bool(head.volume),
        "none_value": none_value, "best_value": best_value, "best_params": best, "no_crf_chosen": no_crf,
        "outcome": tuning_outcome(best), "search_space": SEARCH_SPACE,
        "enqueued": ENQUEUED, "trials": [{"params": t.params, "value": t.value} for t in study.trials],
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / TUNED_FILE).write_text(
        f"# Tuned on the validation split of {ckpt_path}: {metric} {best_value:.4f} "
        f"(no CRF: {none_value:.4f}), {trials} trials{'; no trial beat no CRF' if no_crf else ''}.\n"
        + OmegaConf.to_yaml(saved))
    (output / "tuning.json").write_text(json.dumps(summary, indent=2))
    return summary


# -- Hydra Optuna sweeps ------------------------------------------------------------------------


def example_tuned_file(folder: Path) -> Path:
    """A stand-in for ``tune_densecrf``'s head file, so a study checks its pairings before any
    tuning ran (the values do not matter: tuned parameters compare as "<tuned>")."""
    path = Path(folder) / TUNED_FILE.replace(".yaml", ".example.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(tuned_densecrf(ENQUEUED["pydensecrf"], 1)))
    return path


def tuned_head_config(base: Path, best_params: dict[str, Any], name: str, trials: int | None = None) -> DictConfig:
    """The base head config with ``head.<key>`` best parameters filled in, a new name and the
    ``tuned`` record."""
    head = OmegaConf.load(base)
    keys = []
    for key, value in best_params.items():
        if not key.startswith("head."):
            continue
        field = key.removeprefix("head.")
        if field not in head:
            raise KeyError(f"tuned parameter {key!r} is not a field of {base}")
        head[field] = value
        keys.append(field)
    head.name = name
    head.tuned = tuned_record(trials or 0, keys, by=base.stem)
    return head


def tuned_head_file(sweep_dir: str | Path, name: str, output: str | Path | None = None) -> Path:
    """Where ``SaveTunedHead`` writes the tuned head: ``output``, else
    ``<sweep dir>/conf/head/<name>.yaml``, a config folder of the sweep's own. Refused inside
    the configs segrefine ships (an install is not a place for results, and a reinstall would
    drop it): a folder of the user's, added with ``--config-dir``, holds a reusable copy."""
    from segrefine.configs import package_config_dir

    path = Path(output) if output else Path(sweep_dir) / "conf" / "head" / f"{name}.yaml"
    shipped = package_config_dir().resolve()
    if path.resolve().is_relative_to(shipped):
        culprit = f"hydra.callbacks.save_tuned_head.output={output}" if output else f"hydra.sweep.dir={sweep_dir}"
        raise ValueError(f"{culprit}: the tuned head would be written into segrefine's own configs ({shipped}); "
                         f"write it to a folder of yours (e.g. output=<dir>/head/{name}.yaml) and add that folder "
                         f"with --config-dir=<dir>")
    return path


class SaveTunedHead(Callback):
    """At the end of an Optuna multirun: print the best parameters and save them as
    ``<sweep dir>/conf/head/<name>.yaml`` (or ``output``, e.g. ``<your conf>/head/<name>.yaml``),
    with a copy in the sweep folder; ``--config-dir=<sweep dir>/conf`` (or
    ``hydra.searchpath=[file://<sweep dir>/conf]``) then makes ``head=<name>`` usable. Never
    writes into the package's configs (``tuned_head_file``)."""

    def __init__(self, base_head: str = "densecrf", name: str = "densecrf_tuned", output: str | None = None):
        self.base_head, self.name, self.output = base_head, name, output

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Refuse a destination inside the package before any trial runs, not after the sweep.
        tuned_head_file(config.hydra.sweep.dir, self.name, self.output)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from segrefine.configs import CONFIG_DIR

        sweep_dir = Path(config.hydra.sweep.dir)
        output = tuned_head_file(sweep_dir, self.name, self.output)
        results_file = sweep_dir / "optimization_results.yaml"
        if not results_file.exists():
            print(f"[tune] no {results_file}: was the Optuna sweeper used?")
            return
        results = OmegaConf.load(results_file)
        trials = config.hydra.sweeper.get("n_trials")
        head = tuned_head_config(Path(CONFIG_DIR, "head", f"{self.base_head}.yaml"), dict(results.best_params),
                                 self.name, trials)
        header = f"# Tuned on the validation split by {sweep_dir} (best value {results.best_value:.4f}).\n"
        text = header + OmegaConf.to_yaml(head)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        if output != sweep_dir / f"{self.name}.yaml":
            (sweep_dir / f"{self.name}.yaml").write_text(text)
        print(f"[tune] best value {results.best_value:.4f} with")
        for key, value in results.best_params.items():
            print(f"[tune]   {key}={value}")
        print(f"[tune] saved as {output}")
