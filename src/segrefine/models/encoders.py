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


def prune_unused(encoder: nn.Module, in_channels: int) -> nn.Module:
    """Remove the encoder's top-level blocks that its forward never calls.

    smp keeps e.g. ResNet's layer3/layer4 at encoder_depth=3 although they are unused; they
    would inflate the parameter count and make DDP fail on parameters without gradients.
    """
    called: set[str] = set()
    hooks = [child.register_forward_hook(lambda *_, name=name: called.add(name))
             for name, child in encoder.named_children()]
    was_training = encoder.training
    try:
        with torch.no_grad():
            encoder.eval()(torch.zeros(1, in_channels, 64, 64))
    finally:
        for hook in hooks:
            hook.remove()
        encoder.train(was_training)
    for name, _ in list(encoder.named_children()):
        if name not in called:
            delattr(encoder, name)
    return encoder


def pyramid(features: list[torch.Tensor]) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """Drop smp's stride-1 identity entry; return the levels (finest first) and their strides."""
    levels = list(features[1:])
    return levels, tuple(2 ** (i + 1) for i in range(len(levels)))
