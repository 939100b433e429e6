"""Types and ranges of the common config keys, checked before anything is built.

One declarative table instead of checks scattered through the code: a bad value stops the
run with the key's name, not a traceback from deep inside Lightning or torch. Keys absent
from a config (another data source, another head) are skipped.
"""

from __future__ import annotations

from typing import Any, Mapping

# dotted key -> (type, minimum or None, also allowed values). Integers accept no bools or floats.
RULES: dict[str, tuple[type, float | None, tuple[Any, ...]]] = {
    "seed": (int, 0, ()),
    "boundary_tolerance": (int, 0, ()),
    "trainer.max_epochs": (int, 1, ()),  # 0 would "complete" an untrained model
    "trainer.log_every_n_steps": (int, 1, ()),
    "trainer.check_val_every_n_epoch": (int, 1, ()),
    "trainer.num_nodes": (int, 1, ()),
    "data.batch_size": (int, 1, ()),
    "data.num_workers": (int, 0, ()),
    "data.image_size": (int, 1, ()),
    "data.num_train": (int, 1, ()),
    "data.num_val": (int, 1, ()),
    "data.num_test": (int, 1, ()),
    "data.num_classes": (int, 1, ()),
    "data.val_fraction": (float, 0, ()),
    "data.empty_slice_fraction": (float, 0, ()),
    "metrics.nsd_tolerance_mm": (float, 0, ()),
    "optim.optimizer.lr": (float, 0, ()),
    "optim.optimizer.weight_decay": (float, 0, ()),
    "head.iterations": (int, 1, ()),
    "head.eval_iterations": (int, 1, ()),
}


class ConfigValueError(ValueError):
    pass


def _get(config: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return False, None
        node = node[key]
    return True, node


def _fits(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind is int else isinstance(value, (int, float))


def check_config(config: Mapping[str, Any]) -> None:
    """Raise ConfigValueError naming every key of ``RULES`` whose value has the wrong type or range."""
    problems = []
    for key, (kind, minimum, extra) in RULES.items():
        present, value = _get(config, key)
        if not present or value in extra:
            continue
        what = f"{'an integer' if kind is int else 'a number'}" + (f" >= {minimum:g}" if minimum is not None else "")
        if extra:
            what += " or " + " or ".join(repr(e) for e in extra)
        if not _fits(value, kind) or (minimum is not None and value < minimum):
            problems.append(f"{key}={value!r} must be {what}")
    if problems:
        raise ConfigValueError("; ".join(problems))
