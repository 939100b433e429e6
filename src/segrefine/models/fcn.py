"""FCN-32s/16s/8s (Long et al. 2015) as a decoder over an smp encoder (smp has no FCN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segrefine.models.base import Backbone, resolve_output_stride
from segrefine.models.encoders import build_encoder, pyramid
from segrefine.models.fineskip import FINE_STRIDE, build_fine_skip
from segrefine.types import BackboneOutput

VARIANT_STRIDES = {"32s": 32, "16s": 16, "8s": 8}


def bilinear_kernel(channels: int, factor: int) -> torch.Tensor:
    """Weights that make a transposed conv (kernel 2*factor, stride factor) a per-channel bilinear upsampler."""
    size = 2 * factor - factor % 2
    centre = (size - 1) / 2 if size % 2 == 1 else factor - 0.5
    ramp = 1 - (torch.arange(size, dtype=torch.float32) - centre).abs() / factor
    weight = torch.zeros(channels, channels, size, size)
    weight[range(channels), range(channels)] = ramp[:, None] * ramp[None, :]
    return weight


class FCN(Backbone):
    """1x1 score layers on the stride-32 (and 16, 8) features; coarser scores are upsampled
    2x (learned transposed conv initialised bilinear, or fixed bilinear) and summed with the
    next finer ones. Logits come out at the variant's stride; the head upsamples the rest.

    ``fine_skip=true``: the "none + stride-4 skip" control (segrefine.models.fineskip) on top
    of the variant's score map; logits then come out at stride 4.

    output_stride: None, or the stride just described (anything else is refused: the variant
    sets FCN's stride)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        variant: str = "8s",
        upsampling: str = "learned",
        encoder_name: str = "resnet18",
        encoder_weights: str | None = None,
        fine_skip: bool = False,
        fine_skip_channels: int = 256,
        fine_skip_layers: int = 3,
        fine_skip_coarse_weight: float = 1.0,
        output_stride: int | None = None,
    ):
        super().__init__()
        if variant not in VARIANT_STRIDES:
            raise ValueError(f"backbone.variant={variant!r} is not one of {sorted(VARIANT_STRIDES)}")
        if upsampling not in ("learned", "bilinear"):
            raise ValueError(f"backbone.upsampling={upsampling!r} must be 'learned' or 'bilinear'")
        self.encoder = build_encoder(encoder_name, in_channels, 5, encoder_weights)
        self.score_stride = VARIANT_STRIDES[variant]
        own = FINE_STRIDE if fine_skip else self.score_stride
        how = "backbone.fine_skip=true" if fine_skip else f"backbone.variant={variant}; 32s, 16s, 8s give 32, 16, 8"
        self.declare(
            feature_channels=tuple(self.encoder.out_channels[1:]),
            required_divisor=32,
            output_stride=resolve_output_stride(output_stride, (own,), own, how),
        )
        # Score layers for strides 32, 16, 8 (as many as the variant uses), coarsest first.
        self.score_strides = [s for s in (32, 16, 8) if s >= self.score_stride]
        by_stride = dict(zip(self.feature_strides, self.feature_channels))
        self.scores = nn.ModuleList(nn.Conv2d(by_stride[s], num_classes, 1) for s in self.score_strides)
        for conv in self.scores[1:]:
            # Skip scores start at zero as in the paper, so training begins from the coarser net.
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.learned = upsampling == "learned"
        if self.learned:
            self.up = nn.ModuleList(
                nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, padding=1, bias=False)
                for _ in self.score_strides[1:]
            )
            for deconv in self.up:
                deconv.weight.data.copy_(bilinear_kernel(num_classes, 2))
        self.fine_skip = build_fine_skip(
            fine_skip, self.feature_channels, self.feature_strides, num_classes, fine_skip_channels, fine_skip_layers
        )
        self.fine_skip_coarse_weight = float(fine_skip_coarse_weight)

    def forward(self, image: torch.Tensor) -> BackboneOutput:
        levels = pyramid(self.encoder(image))
        by_stride = dict(zip(self.feature_strides, levels))
        logits = self.scores[0](by_stride[32])
        for i, s in enumerate(self.score_strides[1:]):
            skip = self.scores[i + 1](by_stride[s])
            if self.learned:
                up = self.up[i](logits)[..., : skip.shape[-2], : skip.shape[-1]]
            else:
                up = F.interpolate(logits, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            logits = up + skip
        auxiliary = {}
        if self.fine_skip is not None:
            auxiliary["coarse"] = (self.fine_skip_coarse_weight, logits)
            logits = self.fine_skip(logits, by_stride[FINE_STRIDE])
        return self.output(logits, levels, auxiliary)
