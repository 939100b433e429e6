"""What a run computes, apart from where and how it runs: the one definition of run-only keys.

A resolved run config holds settings that never change a result (output paths, the logger,
resume/force flags, thread counts, progress bars). The run's own are ``RUN_ONLY_KEYS``; a
component (head, backbone, data, ...) declares its own in its config, ``run_only: [keys]``
(conf/head/densecrf.yaml: its CRF worker count), so a new component touches no table here.
``comparable_config`` drops them and
replaces machine paths by placeholders, so two configs compare equal exactly when they ask
for the same computation, wherever the runs' folders are. Resume checks, sweep reruns and
the report's rows all use it. ``curated_config`` is the same view for people (the wandb run
config, results.json's ``run_config``): it keeps the values a tuning protocol chose.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from segrefine.record.run_record import UNDECLARED_RUN_ONLY

# Dotted keys (a whole subtree when a prefix) that never change what a run computes.
RUN_ONLY_KEYS = (
    "paths",
    "hydra",
    "logger",
    "run",  # how trackers file the run: its name, group, job type (segrefine.build.run_info)
    "label",  # the row in words (segrefine.labels); which runs form a row is the config's business
    "name",
    "print_config",
    "verbose",
    "ckpt_path",
    "resume",
    "force",
    "num_threads",
    "save_predictions",
    "metrics.protocol",
    "trainer.accelerator",  # where it runs (cpu/gpu/auto); devices and precision do change results
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "callbacks.model_checkpoint.dirpath",
    "callbacks.last_checkpoint.dirpath",
    "callbacks.wandb_images",
)
# A component config's list of its own run-only keys (``head.run_only: [num_workers]``); the
# list itself is a declaration, not a setting. segrefine.build leaves it out of the component.
RUN_ONLY_DECLARATION = "run_only"
# Callbacks that only report on training (under any name in ``callbacks``): adding one makes
# no new configuration. EarlyStopping, by contrast, changes when training ends.
LOGGING_CALLBACKS = ("LearningRateMonitor", "TQDMProgressBar", "RichProgressBar", "ModelSummary",
                     "RichModelSummary", "DeviceStatsMonitor", "WandbValidationImages")
LOGGING_CALLBACK_MODULES = ("pytorch_lightning.", "lightning.pytorch.", "segrefine.tracking.")


def is_logging_callback(target: Any) -> bool:
    """Whether a callback's ``_target_`` is one of Lightning's (or segrefine's) ``LOGGING_CALLBACKS``."""
    target = str(target or "")
    return target.startswith(LOGGING_CALLBACK_MODULES) and target.rsplit(".", 1)[-1] in LOGGING_CALLBACKS


def declared_run_only(config: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The dotted run-only keys the components of ``config`` declare (``<node>.run_only``), with
    the declarations themselves; for a node written before declarations, ``UNDECLARED_RUN_ONLY``."""
    keys: list[str] = []
    for name, node in (config or {}).items():
        if not isinstance(node, Mapping):
            continue
        declared = node.get(RUN_ONLY_DECLARATION)
        if declared is None:
            declared = UNDECLARED_RUN_ONLY.get(str(node.get("_target_")), ())
        elif isinstance(declared, str) or not all(isinstance(k, str) for k in declared):
            raise ValueError(f"{name}.{RUN_ONLY_DECLARATION}={declared!r} must be a list of {name}'s keys")
        keys += [f"{name}.{key}" for key in declared] + [f"{name}.{RUN_ONLY_DECLARATION}"]
    return tuple(keys)


def is_run_only(dotted: str, config: Mapping[str, Any] | None = None) -> bool:
    """Whether a dotted key (or a Hydra override's key: ``+``/``~`` prefixes, ``/`` groups)
    is run-only: in ``RUN_ONLY_KEYS`` or below one, Hydra's own, or declared run-only by a
    component of ``config`` (the run's resolved config, when the caller has it)."""
    key = dotted.lstrip("+~").replace("/", ".")
    keys = (*RUN_ONLY_KEYS, *declared_run_only(config))
    return key.startswith("hydra") or any(key == k or key.startswith(k + ".") for k in keys)


def _path_prefixes(config: Mapping[str, Any], absolute: bool = False) -> list[tuple[str, str]]:
    """(value, placeholder) for every ``paths.*`` string, longest value first; with
    ``absolute`` also the absolute form of each relative one."""
    paths = config.get("paths") or {}
    pairs = [(str(v).rstrip("/"), f"<paths.{k}>") for k, v in paths.items() if isinstance(v, str) and v.strip("./")]
    if absolute:
        pairs += [(os.path.abspath(value), placeholder) for value, placeholder in pairs if not os.path.isabs(value)]
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def _replace_paths(value: Any, prefixes: list[tuple[str, str]]) -> Any:
    if isinstance(value, str):
        for prefix, placeholder in prefixes:
            if value == prefix or value.startswith(prefix + "/"):
                return placeholder + value[len(prefix):]
        return value
    if isinstance(value, Mapping):
        return {k: _replace_paths(v, prefixes) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_paths(v, prefixes) for v in value]
    return value


def _drop(config: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = config
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(leaf, None)


def _settings(config: Mapping[str, Any], drop: tuple[str, ...] = (), absolute: bool = False) -> dict[str, Any]:
    """``config`` without run-only keys (and ``drop``), machine paths as placeholders
    (``absolute``: relative ``paths.*`` also in their absolute form, as of this process)."""
    result = _replace_paths(dict(config), _path_prefixes(config, absolute))
    for dotted in (*RUN_ONLY_KEYS, *declared_run_only(config), *drop):
        _drop(result, dotted)
    callbacks = result.get("callbacks")
    if isinstance(callbacks, Mapping):
        result["callbacks"] = {k: v for k, v in callbacks.items()
                               if not (isinstance(v, Mapping) and is_logging_callback(v.get("_target_")))}
    return result


def curated_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a run shows as its settings (its wandb config, results.json's ``run_config``):
    the resolved config without run-only keys, machine paths as ``<paths.key>/rest``.

    Unlike ``comparable_config`` it keeps what the run really used: tuned head values and
    ``init_from`` stay as they are, since a results table wants the values themselves.
    Computed where the run runs, so relative ``paths.*`` (the default ``.``) also match the
    absolute paths a study hands over (``init_from=/abs/outputs/...``)."""
    return _settings(config, absolute=True)


def comparable_config(config: Mapping[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The resolved config without run-only keys (and ``drop``), machine paths as placeholders.

    ``config`` is a resolved config as a plain dict (results.json's ``config`` or a
    checkpoint's). Values under a ``paths.*`` folder become ``<paths.key>/rest``, so a study
    moved to another folder still compares equal to itself. Head parameters chosen by a
    tuning protocol (listed in ``head.tuned.keys``) are outcomes, not settings: they become
    ``"<tuned>"``, so models tuned by the same protocol form one configuration. With ``seed``
    in ``drop`` (rows across seeds), ``init_from`` compares as "<a run of the same seed>".
    """
    result = _settings(config, drop)
    if "seed" in drop and result.get("init_from"):
        # Each seed fine-tunes its own seed's checkpoint, so across seeds the path differs by
        # construction; what stays comparable is that the run started from a trained run.
        result["init_from"] = "<a run of the same seed>"
    head = result.get("head")
    tuned = head.get("tuned") if isinstance(head, dict) else None
    if isinstance(tuned, Mapping):
        result["head"] = {k: ("<tuned>" if k in (tuned.get("keys") or ()) else v) for k, v in head.items()}
    return result


def config_group(config: Mapping[str, Any]) -> str:
    """The tracker group of a run: one per exact configuration (a row of the report), so the
    seeds of a configuration share it and two configurations never do. A readable prefix
    ``<backbone>-<head>-<data>`` and a hash of ``comparable_config(config, drop=("seed",))``."""
    import hashlib
    import json

    def name(key: str) -> str:
        node = config.get(key)
        return str(node.get("name")) if isinstance(node, Mapping) else "?"

    settings = json.dumps(comparable_config(config, drop=("seed",)), sort_keys=True, default=str)
    return f"{name('backbone')}-{name('head')}-{name('data')}-{hashlib.sha1(settings.encode()).hexdigest()[:8]}"


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two (comparable) configs, sorted."""
    keys = sorted(set(a) | set(b))
    out: list[str] = []
    for key in keys:
        name = f"{prefix}{key}"
        if key not in a or key not in b:
            out.append(name)
        elif isinstance(a[key], Mapping) and isinstance(b[key], Mapping):
            out += config_differences(a[key], b[key], prefix=f"{name}.")
        elif a[key] != b[key]:
            out.append(name)
    return out
