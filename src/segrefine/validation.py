"""Types and ranges of the common config keys, checked before anything is built.

One declarative table instead of checks scattered through the code: a bad value stops the
run with the key's name, not a traceback from deep inside Lightning or torch. Keys absent
from a config (another data source) are skipped. A backbone or head declares the rules of its
own keys beside its class (``CONFIG_RULES``, checked by ``segrefine.build.build_component``
through ``rule_problems``), so adding one touches no table here.
"""

from __future__ import annotations

from typing import Any, Mapping

from segrefine.record.protocols import IGNORE_INDEX  # torch-free

# dotted key -> (type, minimum or None, also allowed values). Integers accept no bools or floats.
Rules = Mapping[str, tuple]

# Class indices must stay below the ignore index: with 256 classes class 255 would silently be ignored.
MAX_CLASSES = IGNORE_INDEX - 1

RULES: Rules = {
    "seed": (int, 0, ()),
    "boundary_tolerance": (int, 0, ()),
    "trainer.max_epochs": (int, 1, ()),  # 0 would "complete" an untrained model
    "trainer.max_steps": (int, 1, (-1,)),  # -1: no limit (Lightning's default); 0: as max_epochs=0
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
}


class ConfigValueError(ValueError):
    pass


def class_count_problem(num_classes: Any, where: str = "data.num_classes") -> str | None:
    """Why a number of classes cannot be trained on (None if it can): from 255 on a class
    index would reach the ignore index 255."""
    if isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes > MAX_CLASSES:
        return (f"{where}={num_classes}: at most {MAX_CLASSES} classes are supported (class indices must stay below "
                f"{IGNORE_INDEX}, the index of ignored pixels)")
    return None


def train_batches_problem(limit: Any) -> str | None:
    """Why ``trainer.limit_train_batches`` would train nothing or is malformed (None if fine):
    an integer >= 1 (batches) or a fraction in (0, 1]."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        return f"trainer.limit_train_batches={limit!r} must be an integer >= 1 (batches) or a fraction in (0, 1]"
    if isinstance(limit, int) and limit < 1 or isinstance(limit, float) and not 0 < limit <= 1:
        return (f"trainer.limit_train_batches={limit!r} would train no step: give an integer >= 1 (batches) or a "
                "fraction in (0, 1]")
    return None


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


def rule_problems(config: Mapping[str, Any], rules: Rules, prefix: str | None = None) -> list[str]:
    """What breaks ``rules`` in ``config``, each naming the key (under ``prefix``, e.g. ``head``)."""
    problems = []
    for key, (kind, minimum, extra) in rules.items():
        present, value = _get(config, key)
        if not present or value in extra:
            continue
        what = f"{'an integer' if kind is int else 'a number'}" + (f" >= {minimum:g}" if minimum is not None else "")
        if extra:
            what += " or " + " or ".join(repr(e) for e in extra)
        if not _fits(value, kind) or (minimum is not None and value < minimum):
            problems.append(f"{prefix + '.' if prefix else ''}{key}={value!r} must be {what}")
    return problems


def check_config(config: Mapping[str, Any]) -> None:
    """Raise ConfigValueError naming every key of ``RULES`` whose value has the wrong type or range
    (the backbone's and head's own keys are checked when they are built)."""
    problems = rule_problems(config, RULES)
    present, value = _get(config, "data.num_classes")
    if present and (problem := class_count_problem(value)):
        problems.append(problem)
    present, value = _get(config, "trainer.limit_train_batches")
    if present and (problem := train_batches_problem(value)):
        problems.append(problem)
    if problems:
        raise ConfigValueError("; ".join(problems))
