"""PSPNet (Zhao et al. 2017) in two named variants.

``lite`` (the default, and what earlier runs used): segmentation-models-pytorch's PSPNet on
a shallow encoder (ResNet-18 up to ``encoder_depth=3``, no dilation, no auxiliary loss),
logits at stride ``2**encoder_depth``. Small and fast; *not* Zhao et al.'s network.

``zhao``: the paper's design. A dilated ResNet at full depth (smp encoder with
``output_stride=8``: layer3 and layer4 dilated 2 and 4 instead of strided), the pyramid pooling
module with bins 1/2/3/6 (each pooled map reduced to C/4 channels, upsampled, concatenated
with the features), a 3x3 conv to 512 channels + BN + ReLU + dropout 0.1 + 1x1 classifier, and
the auxiliary classifier on stage 3 (layer3: 3x3 conv to 256 + BN + ReLU + dropout 0.1 + 1x1)
trained with weight 0.4 (``BackboneOutput.auxiliary``, training only). Logits at stride 8.
One deviation: the bin-1 branch has no BatchNorm (a 1x1 map normalises to zero with batch 1;
smp does the same), it gets a bias instead.

Both take ``fine_skip=true``: the "none + stride-4 skip" control (segrefine.models.fineskip).
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from segrefine.models.base import Backbone, resolve_output_stride
from segrefine.models.encoders import build_encoder, check_encoder_name, prune_unused, pyramid
from segrefine.models.fineskip import FINE_STRIDE, build_fine_skip
from segrefine.types import BackboneOutput

VARIANTS = ("lite", "zhao")
# What a null encoder_name / encoder_depth / psp_out_channels means for each variant.
DEFAULTS = {
    "lite": {"encoder_name": "resnet18", "encoder_depth": 3, "psp_out_channels": 256},
    "zhao": {"encoder_name": "resnet50", "encoder_depth": 5, "psp_out_channels": 512},
}
PYRAMID_BINS = (1, 2, 3, 6)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class PyramidPooling(nn.Module):
    """Zhao et al.'s pyramid pooling module: features concatenated with C/len(bins)-channel
    summaries pooled to each bin size and upsampled back."""

    def __init__(self, in_channels: int, bins: tuple[int, ...] = PYRAMID_BINS):
        super().__init__()
        reduced = in_channels // len(bins)
        self.bins = tuple(bins)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, reduced, 1), nn.ReLU(inplace=True)) if b == 1
            else conv_bn_relu(in_channels, reduced, 1)
            for b in self.bins
        )
        self.out_channels = in_channels + reduced * len(self.bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(branch(F.adaptive_avg_pool2d(x, b)), size=size, mode="bilinear", align_corners=False)
            for b, branch in zip(self.bins, self.branches)
        ]
        return torch.cat([x, *pooled], dim=1)


def classifier(in_channels: int, mid_channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """3x3 conv + BN + ReLU + dropout + 1x1 classifier (the PSP head and the auxiliary head)."""
    return nn.Sequential(conv_bn_relu(in_channels, mid_channels, 3), nn.Dropout2d(dropout), nn.Conv2d(mid_channels, num_classes, 1))


class PSPNet(Backbone):
    """PSPNet, ``variant`` ``lite`` or ``zhao`` (module docstring). Null ``encoder_name``,
    ``encoder_depth``, ``psp_out_channels`` take the variant's values (``DEFAULTS``).

    aux_weight, aux_channels: the zhao variant's stage-3 auxiliary loss weight (0.4) and width (256).
    dropout: before the zhao classifiers (0.1).
    fine_skip, fine_skip_channels, fine_skip_layers, fine_skip_coarse_weight: the stride-4 control.
    output_stride: None, or the stride the variant gives (lite 2**encoder_depth, zhao 8; 4 with
        fine_skip); anything else is refused.
   
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        variant: str = "lite",
        encoder_name: str | None = None,
        encoder_weights: str | None = None,
        encoder_depth: int | None = None,
        psp_out_channels: int | None = None,
        aux_weight: float = 0.4,
        aux_channels: int = 256,
        dropout: float = 0.1,
        fine_skip: bool = False,
        fine_skip_channels: int = 256,
        fine_skip_layers: int = 3,
        fine_skip_coarse_weight: float = 1.0,
        output_stride: int | None = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"backbone.variant={variant!r} is not one of {list(VARIANTS)}")
        defaults = DEFAULTS[variant]
        encoder_name = encoder_name or defaults["encoder_name"]
        psp_out_channels = psp_out_channels or defaults["psp_out_channels"]
        encoder_depth = encoder_depth or defaults["encoder_depth"]
        self.variant = variant
        if variant == "lite":
            self._build_lite(in_channels, num_classes, encoder_name, encoder_weights, encoder_depth, psp_out_channels)
        else:
            if encoder_depth != 5:
                raise ValueError(
                    f"backbone.encoder_depth={encoder_depth!r}: the zhao variant uses the full-depth encoder (5); "
                    "use backbone.variant=lite for a truncated one"
                )
            self._build_zhao(in_channels, num_classes, encoder_name, encoder_weights, psp_out_channels, aux_channels, dropout)
        self.aux_weight = float(aux_weight)
        own = FINE_STRIDE if fine_skip else self.native_stride
        how = "backbone.fine_skip=true" if fine_skip else (
            f"backbone.variant=lite, encoder_depth={encoder_depth}: 2**encoder_depth" if variant == "lite"
            else "backbone.variant=zhao: dilated to 8")
        self.declare(
            feature_channels=self.encoder.out_channels[1:],
            # Dilation keeps zhao's layer3 and layer4 at stride 8 (feature_at(8) is layer2, the first of them).
            feature_strides=(2, 4, 8, 8, 8) if variant == "zhao" else None,
            required_divisor=self.native_stride,
            output_stride=resolve_output_stride(output_stride, (own,), own, how),
        )
        self.fine_skip = build_fine_skip(
            fine_skip, self.feature_channels, self.feature_strides, num_classes, fine_skip_channels, fine_skip_layers
        )
        self.fine_skip_coarse_weight = float(fine_skip_coarse_weight)

    def _build_lite(self, in_channels, num_classes, encoder_name, encoder_weights, encoder_depth, psp_out_channels):
        check_encoder_name(encoder_name)
        net = smp.PSPNet(
            encoder_name=encoder_name,
            encoder_weights=encoder_weights,
            encoder_depth=encoder_depth,
            psp_out_channels=psp_out_channels,
            in_channels=in_channels,
            classes=num_classes,
            upsampling=2**encoder_depth,
        )
        self.encoder, self.decoder = prune_unused(net.encoder, in_channels), net.decoder
        # smp's head is conv -> upsample -> activation; keep only the conv (heads upsample).
        self.classifier = net.segmentation_head[0]
        self.native_stride = 2**encoder_depth

    def _build_zhao(self, in_channels, num_classes, encoder_name, encoder_weights, psp_out_channels, aux_channels, dropout):
        check_encoder_name(encoder_name)
        try:
            self.encoder = build_encoder(encoder_name, in_channels, 5, encoder_weights, output_stride=8)
        except (ValueError, AttributeError, NotImplementedError) as e:
            raise ValueError(f"backbone.encoder_name={encoder_name!r} cannot be dilated to output stride 8 by smp ({e})") from None
        channels = self.encoder.out_channels
        self.ppm = PyramidPooling(channels[5])
        self.classifier = classifier(self.ppm.out_channels, psp_out_channels, num_classes, dropout)
        self.aux_classifier = classifier(channels[4], aux_channels, num_classes, dropout)
        self.native_stride = 8

    def forward(self, image: torch.Tensor) -> BackboneOutput:
        features = self.encoder(image)
        auxiliary = {}
        levels = pyramid(features)
        if self.variant == "lite":
            logits = self.classifier(self.decoder(features))
        else:
            logits = self.classifier(self.ppm(levels[-1]))
            if self.training:  # deep supervision only; inference never computes it
                auxiliary["aux_stage3"] = (self.aux_weight, self.aux_classifier(levels[3]))
        if self.fine_skip is not None:
            auxiliary["coarse"] = (self.fine_skip_coarse_weight, logits)
            logits = self.fine_skip(logits, levels[self.feature_strides.index(FINE_STRIDE)])
        return self.output(logits, levels, auxiliary)
