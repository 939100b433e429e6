"""Finding and loading segrefine checkpoints (for evaluate and init_from)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segrefine.results import FILENAME, read_results


class CheckpointError(ValueError):
    pass


def resolve_checkpoint_file(ckpt_path: str | Path, key: str = "ckpt_path") -> Path:
    """A .ckpt file, or a run folder -> the checkpoint its results.json names (else last.ckpt)."""
    path = Path(ckpt_path)
    if path.is_dir():
        recorded = read_results(path).get("checkpoint") if (path / FILENAME).is_file() else None
        path = path / recorded if recorded else path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise CheckpointError(f"{key}={str(ckpt_path)!r}: no checkpoint at {path}")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict; refuses files that are not segrefine Lightning checkpoints."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    config = checkpoint.get("hyper_parameters", {}).get("config") if isinstance(checkpoint, dict) else None
    if not config or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a segrefine checkpoint (it holds no segrefine run config)")
    return checkpoint


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
