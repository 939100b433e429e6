"""The two data contracts shared by backbones, heads and the training module."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Mask value that is never scored or trained on (Pascal VOC convention).
IGNORE_INDEX = 255


@dataclass
class BackboneOutput:
    """What every backbone returns (``segrefine.models.base.Backbone.output`` fills the
    strides from the backbone's declaration).

    logits: ``(B, C, H/stride, W/stride)`` class scores at the backbone's output stride.
    features: encoder pyramid, finest first and coarsest last.
    feature_strides: the stride of each tensor in ``features`` (same order).
    stride: the output stride of ``logits`` (1 = full resolution).
    auxiliary: extra training-only predictions as ``{name: (weight, logits)}`` at any stride
        (e.g. PSPNet's stage-3 classifier, weight 0.4). The training module adds
        ``weight * cross-entropy`` of each, upsampled to the mask, to the head's loss
        (``segrefine.heads.base.auxiliary_losses``); inference ignores them.
    """

    logits: torch.Tensor
    features: list[torch.Tensor]
    feature_strides: tuple[int, ...]
    stride: int
    auxiliary: dict[str, tuple[float, torch.Tensor]] = field(default_factory=dict)

    def feature_at(self, stride: int) -> torch.Tensor:
        """The pyramid level with exactly this stride (for heads that need fine features)."""
        try:
            return self.features[self.feature_strides.index(stride)]
        except ValueError:
            raise ValueError(
                f"no feature level at stride {stride}; this backbone has strides {self.feature_strides}"
            ) from None
