"""The "none + stride-4 skip" control: PointRend's fine features, used densely.

PointRend's point head sees, at each point, the stride-4 features and the coarse logits
sampled there, and predicts the class with a small MLP. ``FineSkip`` runs that same MLP
(``segrefine.layers.PointHead``, same layers and initialisation) at *every* cell of
the stride-4 map, on the coarse logits upsampled bilinearly (which equals PointRend's
``point_sample`` at the cell centres). A ``none`` run on such a backbone has everything
PointRend's point head sees, so ``pointrend`` vs this control isolates point-wise
refinement from the gain of the extra features. The coarse logits are also supervised
(weight ``coarse_loss_weight``, as PointRend's coarse loss) through
``BackboneOutput.auxiliary``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segrefine.layers import PointHead

FINE_STRIDE = 4


class FineSkip(nn.Module):
    def __init__(self, fine_channels: int, num_classes: int, hidden_channels: int = 256, num_layers: int = 3):
        super().__init__()
        self.point_head = PointHead(fine_channels, num_classes, hidden_channels, num_layers, coarse_pred_each_layer=True)

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        """``coarse`` ``(B, C, h, w)`` logits and ``fine`` ``(B, F, H/4, W/4)`` -> ``(B, C, H/4, W/4)`` logits."""
        up = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        batch, classes, height, width = up.shape
        return self.point_head(fine.flatten(2), up.flatten(2)).reshape(batch, classes, height, width)


def build_fine_skip(
    enabled: bool, feature_channels: tuple[int, ...], feature_strides: tuple[int, ...], num_classes: int,
    hidden_channels: int, num_layers: int,
) -> FineSkip | None:
    """A ``FineSkip`` on the backbone's stride-4 level, or None; refuses a backbone without one."""
    if not enabled:
        return None
    if FINE_STRIDE not in feature_strides:
        raise ValueError(
            f"backbone.fine_skip=true needs a stride-{FINE_STRIDE} feature level; this backbone has strides "
            f"{tuple(feature_strides)}"
        )
    return FineSkip(feature_channels[feature_strides.index(FINE_STRIDE)], num_classes, hidden_channels, num_layers)
