"""The ``none`` head: no refinement, just bilinear upsampling of the backbone's logits."""

from __future__ import annotations

import torch

from segrefine.heads.base import Head, upsample_logits
from segrefine.types import BackboneOutput, BackboneSpec


class NoHead(Head):
    """"""

    untrained = "none needed"

    def __init__(self, num_classes: int, backbone: BackboneSpec | None = None):
        super().__init__(num_classes, backbone)

    def forward(self, out: BackboneOutput, image: torch.Tensor) -> torch.Tensor:
        return upsample_logits(out, image.shape[-2:])
