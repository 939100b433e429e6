"""The backbone contract: what every backbone declares about itself, and the one stride rule.

A head or the training module asks a backbone these things instead of probing its insides:

- ``feature_channels``, ``feature_strides``: channels and stride of each level of
  ``BackboneOutput.features`` (finest first, coarsest last),
- ``required_divisor``: the input height and width must be multiples of it (the training
  module pads to it),
- ``output_stride``: the stride of ``BackboneOutput.logits`` (1 = full resolution).

A coarse map is requested with the constructor argument ``output_stride`` (``None``: the
backbone's own stride). A backbone gives exactly the stride asked or refuses, naming the key
(``resolve_output_stride``); none silently gives another. U-Net can stop its decoder at any
power of two and reads ``head.coarse_stride`` (conf/backbone/unet.yaml); the others have one
stride, set by their variant.
"""

from __future__ import annotations

import torch
from torch import nn

from segrefine.types import BackboneOutput, BackboneSpec


def pyramid_strides(levels: int) -> tuple[int, ...]:
    """Strides of an undilated encoder's levels, finest first: ``2, 4, ..., 2**levels``.

    The only place this rule lives (each level halves the resolution of the one before).
    """
    return tuple(2 ** (i + 1) for i in range(levels))


def resolve_output_stride(requested: int | None, allowed: tuple[int, ...], own: int, how: str) -> int:
    """The logits stride to build: ``own`` when ``requested`` is None, else ``requested`` if
    the backbone can give it (``allowed``); otherwise a ValueError naming the key and the fix.

    ``how``: what sets this backbone's stride, for the message (e.g. "backbone.variant=8s").
    """
    if requested is None:
        return own
    if requested not in allowed:
        raise ValueError(
            f"backbone.output_stride={requested!r} is not a stride this backbone gives: it gives "
            f"{', '.join(map(str, allowed))} ({how}). Leave backbone.output_stride unset/null for its own stride "
            "or pick one of those (only conf/backbone/unet.yaml sets it from head.coarse_stride)"
        )
    return int(requested)


class Backbone(nn.Module):
    """Base class of every backbone: ``forward(image) -> BackboneOutput`` (segrefine.types).

    Subclasses call ``declare(...)`` in ``__init__`` once their layers are built, and return
    ``self.output(logits, features, auxiliary)`` from ``forward`` so the output carries the
    declared strides. See the module docstring for the attributes.
    """

    feature_channels: tuple[int, ...]
    feature_strides: tuple[int, ...]
    required_divisor: int
    output_stride: int
    # Types and ranges of this backbone's own config keys (segrefine.validation.rule_problems),
    # checked by segrefine.build.build_component before the backbone is built.
    CONFIG_RULES: dict = {}

    def declare(
        self,
        *,
        feature_channels: tuple[int, ...],
        required_divisor: int,
        output_stride: int,
        feature_strides: tuple[int, ...] | None = None,
    ) -> None:
        """Record the contract. ``feature_strides`` defaults to ``pyramid_strides`` (undilated)."""
        channels = tuple(int(c) for c in feature_channels)
        strides = pyramid_strides(len(channels)) if feature_strides is None else tuple(int(s) for s in feature_strides)
        if len(strides) != len(channels):
            raise ValueError(f"{type(self).__name__}: {len(channels)} feature channels but {len(strides)} strides")
        if list(strides) != sorted(strides) or any(s < 1 for s in strides):
            raise ValueError(f"{type(self).__name__}: feature strides {strides} must be >= 1 and finest first")
        if required_divisor < 1 or output_stride < 1:
            raise ValueError(
                f"{type(self).__name__}: required_divisor={required_divisor} and output_stride={output_stride} must be >= 1"
            )
        self.feature_channels, self.feature_strides = channels, strides
        self.required_divisor, self.output_stride = int(required_divisor), int(output_stride)

    def spec(self) -> BackboneSpec:
        """The declaration as a plain value: what a head is built from."""
        return BackboneSpec(self.feature_channels, self.feature_strides, self.output_stride, self.required_divisor)

    def output(
        self,
        logits: torch.Tensor,
        features: list[torch.Tensor],
        auxiliary: dict[str, tuple[float, torch.Tensor]] | None = None,
    ) -> BackboneOutput:
        """The ``BackboneOutput`` of ``forward``, with the declared strides."""
        if len(features) != len(self.feature_strides):
            raise RuntimeError(
                f"{type(self).__name__} returned {len(features)} feature levels but declares {len(self.feature_strides)}"
            )
        return BackboneOutput(
            logits=logits,
            features=list(features),
            feature_strides=self.feature_strides,
            stride=self.output_stride,
            auxiliary=auxiliary or {},
        )
