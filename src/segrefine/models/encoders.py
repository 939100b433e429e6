"""The encoder side shared by all backbones: an smp encoder and its pyramid bookkeeping."""

from __future__ import annotations

import torch
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn


def build_encoder(name: str, in_channels: int, depth: int, weights: str | None) -> nn.Module:
    """An smp encoder; turns smp's KeyError for unknown names into a readable error."""
    try:
        return get_encoder(name, in_channels=in_channels, depth=depth, weights=weights)
    except KeyError:
        raise ValueError(
            f"backbone.encoder_name={name!r} is not an encoder segmentation-models-pytorch knows; "
            "list them with segmentation_models_pytorch.encoders.get_encoder_names()"
        ) from None


def pyramid(features: list[torch.Tensor]) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """Drop smp's stride-1 identity entry; return the levels (finest first) and their strides."""
    levels = list(features[1:])
    return levels, tuple(2 ** (i + 1) for i in range(len(levels)))
