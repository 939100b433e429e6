"""The encoder side shared by the smp backbones: name checks, encoders, pyramid bookkeeping."""

from __future__ import annotations

import timm
import torch
from segmentation_models_pytorch import encoders as smp_encoders
from torch import nn


def check_encoder_name(name: str) -> None:
    """Refuse a name segmentation-models-pytorch does not know, before anything is built.

    Checked against smp's own list (and timm's for ``tu-`` names), so a typo costs nothing:
    building an encoder to find out would draw random initial weights and shift every later
    random number of the run.
    """
    known = (
        name in smp_encoders.encoders
        or (name.startswith("tu-") and timm.is_model(name[3:]))
        or (name.startswith("timm-") and smp_encoders.is_equivalent_to_timm_universal(name))
    )
    if not known:
        raise ValueError(
            f"backbone.encoder_name={name!r} is not an encoder segmentation-models-pytorch knows; "
            "list them with segmentation_models_pytorch.encoders.get_encoder_names()"
        )


def build_encoder(name: str, in_channels: int, depth: int, weights: str | None, **kwargs) -> nn.Module:
    """An smp encoder, its name checked first (``check_encoder_name``)."""
    check_encoder_name(name)
    return smp_encoders.get_encoder(name, in_channels=in_channels, depth=depth, weights=weights, **kwargs)


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


def pyramid(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """smp's encoder output without its stride-1 identity entry: the levels, finest first."""
    return list(features[1:])
