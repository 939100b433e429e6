"""Layers shared by backbones and heads, so that neither imports the other.

``PointHead`` is PointRend's point MLP: ``heads/pointrend.py`` runs it on sampled points and
``models/fineskip.py`` (PointRend's control) runs the same layers densely at every stride-4 cell.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PointHead"]


class PointHead(nn.Module):
    """MLP of 1x1 ``Conv1d`` layers on ``(B, fine + C, P)`` point features -> ``(B, C, P)`` logits.

    With ``coarse_pred_each_layer`` the sampled coarse logits are concatenated to the input
    of every layer (the final predictor included), as in the paper's semantic branch.

    The layers are ``nn.Conv1d`` (the paper's formulation, and its parameter layout), but they
    are evaluated as ``F.linear`` on a point-major ``(B, P, channels)`` layout: the same
    arithmetic as a 1x1 convolution, run as one GEMM per layer, which is about 1.5x faster on
    CPU than ``conv1d`` here (8096 points, 3 x 256).
    """

    def __init__(
        self,
        fine_channels: int,
        num_classes: int,
        hidden_channels: int = 256,
        num_layers: int = 3,
        coarse_pred_each_layer: bool = True,
    ):
        super().__init__()
        self.coarse_pred_each_layer = coarse_pred_each_layer
        extra = num_classes if coarse_pred_each_layer else 0
        self.layers = nn.ModuleList()
        in_channels = fine_channels + num_classes
        for _ in range(num_layers):
            layer = nn.Conv1d(in_channels, hidden_channels, kernel_size=1)
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
            self.layers.append(layer)
            in_channels = hidden_channels + extra
        self.predictor = nn.Conv1d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """``fine`` ``(B, F, P)`` and ``coarse`` ``(B, C, P)`` -> point logits ``(B, C, P)``."""
        coarse = coarse.transpose(1, 2)  # (B, P, C): point-major, see the class docstring
        x = torch.cat([fine.transpose(1, 2), coarse], dim=2)
        for layer in self.layers:
            x = F.linear(x, layer.weight[..., 0], layer.bias).relu_()
            if self.coarse_pred_each_layer:
                x = torch.cat([x, coarse], dim=2)
        return F.linear(x, self.predictor.weight[..., 0], self.predictor.bias).transpose(1, 2)
