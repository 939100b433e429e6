"""U-Net (Ronneberger et al. 2015): segmentation-models-pytorch's, or the origin study's vanilla one.

``variant="smp"`` (default): smp's U-Net over an smp encoder (ResNet-18 unless
``encoder_name`` says otherwise). ``variant="vanilla"``: the U-Net of the study segrefine grew
out of (its ``Models/VanillaUnet.py``): per level two 3x3 conv + ReLU, 2x2 max pooling, widths
``base_width * 2**level``; decoder by nearest 2x upsampling, concatenation with the skip and two
3x3 conv + ReLU; a 1x1 classifier. No batch norm, no pretrained encoder, weights drawn as
Keras's defaults (Glorot uniform, zero bias). ``base_width=32`` is the origin's "Vanilla U-Net"
(7,846,690 parameters at 3 input channels and 2 classes); 64 the width of its CRF-U-Net.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from segrefine.models.base import Backbone, resolve_output_stride
from segrefine.models.encoders import check_encoder_name, prune_unused, pyramid
from segrefine.types import BackboneOutput

VARIANTS = ("smp", "vanilla")
# Each variant's own values of the keys left null in conf/backbone/unet.yaml.
SMP_DEFAULTS = {"encoder_name": "resnet18", "encoder_depth": 5, "decoder_channels": (128, 64, 32, 16, 16)}
VANILLA_DEFAULTS = {"encoder_depth": 4, "base_width": 32}


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True),
    )


class VanillaUNetLayers(nn.Module):
    """The origin's vanilla U-Net layers: ``depth`` poolings, widths ``base_width * 2**level``."""

    def __init__(self, in_channels: int, num_classes: int, base_width: int, depth: int, decoder_blocks: int):
        super().__init__()
        widths = [base_width * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList(_double_conv(c_in, c_out) for c_in, c_out in zip([in_channels, *widths], widths))
        # Decoder block i: upsampled level depth-i (widths[depth-i] channels) + skip of level depth-1-i.
        self.up = nn.ModuleList(
            _double_conv(widths[depth - i] + widths[depth - 1 - i], widths[depth - 1 - i]) for i in range(decoder_blocks)
        )
        self.classifier = nn.Conv2d(widths[depth - decoder_blocks], num_classes, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # Keras's default initialisers, as the origin's model got
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        levels, x = [], image
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            levels.append(x)
        for i, block in enumerate(self.up):
            skip = levels[-2 - i]
            x = block(torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skip], dim=1))
        return self.classifier(x), levels


class UNet(Backbone):
    """U-Net returning logits at ``output_stride`` (default 1: full resolution) and its encoder pyramid.

    ``output_stride`` > 1 (a power of two below ``2**encoder_depth``) truncates the decoder:
    only the blocks up to the one that reaches that stride are kept, and a classifier on that
    block's channels gives a coarse map for heads that refine one (PointRend). For ``smp`` the
    dropped blocks and smp's full-resolution head are removed, so they cost nothing and hold
    no unused parameters (nor do encoder stages beyond ``encoder_depth``, which smp keeps);
    ``output_stride=1`` is smp's U-Net otherwise unchanged.

    Keys left ``None`` take the variant's values (``SMP_DEFAULTS``, ``VANILLA_DEFAULTS``); a key
    the variant has no use for must stay ``None`` (the vanilla U-Net has no smp encoder or
    decoder widths; smp's has no ``base_width``), so no config claims a network it did not get.
    ``encoder_depth`` of the vanilla U-Net is its number of 2x2 poolings (4, as the origin).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        variant: str = "smp",
        encoder_name: str | None = None,
        encoder_weights: str | None = None,
        encoder_depth: int | None = None,
        decoder_channels: tuple[int, ...] | None = None,
        base_width: int | None = None,
        output_stride: int | None = 1,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"backbone.variant={variant!r} must be one of {VARIANTS}")
        if variant == "vanilla":
            unused = {"encoder_name": encoder_name, "encoder_weights": encoder_weights, "decoder_channels": decoder_channels}
            set_keys = [f"backbone.{k}={v!r}" for k, v in unused.items() if v is not None]
            if set_keys:
                raise ValueError(
                    f"{', '.join(set_keys)}: the vanilla U-Net has no smp encoder or decoder widths (its widths follow "
                    "backbone.base_width); leave these null, or use backbone.variant=smp"
                )
            self._build_vanilla(in_channels, num_classes, base_width or VANILLA_DEFAULTS["base_width"],
                                encoder_depth or VANILLA_DEFAULTS["encoder_depth"], output_stride)
        else:
            if base_width is not None:
                raise ValueError(f"backbone.base_width={base_width!r} is a key of backbone.variant=vanilla; "
                                 "leave it null for smp's U-Net (its widths are backbone.decoder_channels)")
            self._build_smp(in_channels, num_classes, encoder_name or SMP_DEFAULTS["encoder_name"], encoder_weights,
                            encoder_depth or SMP_DEFAULTS["encoder_depth"],
                            tuple(decoder_channels or SMP_DEFAULTS["decoder_channels"]), output_stride)
        self.variant = variant

    def _build_vanilla(self, in_channels, num_classes, base_width, depth, output_stride) -> None:
        if depth < 1 or base_width < 1:
            raise ValueError(f"backbone.encoder_depth={depth} and backbone.base_width={base_width} must be >= 1")
        how = f"a power of two below 2**encoder_depth={2**depth}"
        output_stride = resolve_output_stride(output_stride, tuple(2**k for k in range(depth)), 1, how)
        # Decoder block i brings stride 2**(depth - i) to 2**(depth - 1 - i); keep those down to output_stride.
        self.vanilla = VanillaUNetLayers(in_channels, num_classes, base_width, depth,
                                         decoder_blocks=depth - output_stride.bit_length() + 1)
        self.declare(
            feature_channels=tuple(base_width * 2**level for level in range(depth + 1)),
            feature_strides=tuple(2**level for level in range(depth + 1)),
            required_divisor=2**depth,
            output_stride=output_stride,
        )

    def _build_smp(self, in_channels, num_classes, encoder_name, encoder_weights, encoder_depth, decoder_channels,
                   output_stride) -> None:
        check_encoder_name(encoder_name)
        how = f"a power of two below 2**encoder_depth={2**encoder_depth}"
        output_stride = resolve_output_stride(output_stride, tuple(2**k for k in range(encoder_depth)), 1, how)
        self.net = smp.Unet(
            encoder_name=encoder_name,
            encoder_weights=encoder_weights,
            encoder_depth=encoder_depth,
            decoder_channels=decoder_channels[:encoder_depth],
            in_channels=in_channels,
            classes=num_classes,
        )
        # smp keeps ResNet's deeper stages below encoder_depth=5 although its forward skips them.
        self.net.encoder = prune_unused(self.net.encoder, in_channels)
        self.declare(
            feature_channels=self.net.encoder.out_channels[1:],
            required_divisor=2**encoder_depth,
            output_stride=output_stride,
        )
        if output_stride > 1:
            # Decoder block i upsamples to stride 2**(encoder_depth - 1 - i); keep those down to output_stride.
            keep = encoder_depth - output_stride.bit_length() + 1
            self.net.decoder.blocks = self.net.decoder.blocks[:keep]
            channels = decoder_channels[:encoder_depth][keep - 1]
            self.net.segmentation_head = nn.Conv2d(channels, num_classes, kernel_size=3, padding=1)

    def forward(self, image: torch.Tensor) -> BackboneOutput:
        if self.variant == "vanilla":
            logits, levels = self.vanilla(image)
            return self.output(logits, levels)
        features = self.net.encoder(image)
        logits = self.net.segmentation_head(self.net.decoder(features))
        return self.output(logits, pyramid(features))
