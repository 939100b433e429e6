"""Finding, loading and writing segrefine checkpoints, and what a stored config may build.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain values only,
so a crafted ``.ckpt`` cannot run code (Lightning's own checkpoints need nothing more).
The ``_target_``s of a config read back from a checkpoint are instantiated only when they
are segrefine's own or in ``ALLOWED_TARGETS``.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from hydra.utils import get_object
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch import nn

from segrefine.atomic import atomic_open
from segrefine.record import FILENAME
from segrefine.record import read_document as read_results


class CheckpointError(ValueError):
    pass


# Third-party classes a stored config may name (besides segrefine.*): the trainer, Lightning's
# callbacks and torch optimisers / LR schedulers.
ALLOWED_TARGETS = ("pytorch_lightning.Trainer", "pytorch_lightning.callbacks.", "pytorch_lightning.loggers.", "torch.optim.")


def resolve_checkpoint_file(ckpt_path: str | Path, key: str = "ckpt_path") -> Path:
    """A .ckpt file, or a run folder -> the checkpoint its results.json names (else last.ckpt)."""
    path = Path(ckpt_path)
    if path.is_dir():
        recorded = read_results(path).get("checkpoint") if (path / FILENAME).is_file() else None
        path = path / recorded if recorded else path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise CheckpointError(f"{key}={str(ckpt_path)!r}: no checkpoint at {path}")
    return path


def load_checkpoint(path: Path, hint: str = "") -> dict[str, Any]:
    """The checkpoint dict; refuses files that are not segrefine Lightning checkpoints.

    ``hint`` (e.g. how to start afresh) is appended to every refusal."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: (GLOBAL \S+)", str(e))
        if refused:  # weights_only met an object it may not build: nothing of it ran
            raise CheckpointError(f"{path}: not a segrefine checkpoint: it holds objects other than tensors and "
                                  f"plain values, refused unread ({refused.group(1)}){hint}") from e
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint{hint} (torch: {_short(e)})") from e
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint{hint} (torch: {_short(e)})") from e
    config = checkpoint.get("hyper_parameters", {}).get("config") if isinstance(checkpoint, dict) else None
    if not config or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a segrefine checkpoint (it holds no segrefine run config){hint}")
    return checkpoint


def _short(error: Exception) -> str:
    return " ".join(str(error).split())[:160]


def check_targets(config: Any, where: str, prefix: str = "") -> None:
    """Refuse a stored config naming a ``_target_`` that is neither segrefine's nor allowed.

    The name is checked before anything is imported, and what it resolves to must be defined
    in that package (``segrefine.configs.os.system`` is ``os.system``, not segrefine's)."""
    if isinstance(config, Mapping):
        target = config.get("_target_")
        if target is not None:
            key = f"{prefix}_target_"
            allowed = isinstance(target, str) and (
                target.startswith("segrefine.") or any(target == a or (a.endswith(".") and target.startswith(a))
                                                       for a in ALLOWED_TARGETS))
            if allowed:
                try:
                    module = getattr(get_object(target), "__module__", "") or ""
                except Exception:  # unknown names fail later, when instantiated, with Hydra's message
                    module = target
                allowed = module.startswith(("segrefine.", "pytorch_lightning.", "torch.optim."))
            if not allowed:
                raise CheckpointError(
                    f"{where}: {key}={target!r} is not segrefine's nor an allowed third-party class "
                    f"({', '.join(ALLOWED_TARGETS)}); a stored config builds nothing else")
        for key, value in config.items():
            check_targets(value, where, f"{prefix}{key}.")
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            check_targets(value, where, f"{prefix}{i}.")


def load_weights(module: nn.Module, checkpoint: dict[str, Any], path: Path, with_head: bool) -> None:
    """Backbone weights (must fit exactly) and, if ``with_head``, the head's."""
    state = checkpoint["state_dict"]

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    try:
        module.backbone.load_state_dict(part("backbone."))
        if with_head:
            module.head.load_state_dict(part("head."))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit this model's backbone/head config ({e})") from e


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: a temp file in the same folder, fsync'ed,
    then renamed. A full disk or a kill leaves the previous checkpoint, never a partial one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_open(path, "wb") as f:
            torch.save(checkpoint, f)
