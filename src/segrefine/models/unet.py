"""U-Net (Ronneberger et al. 2015) from segmentation-models-pytorch."""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import nn

from segrefine.models.encoders import build_encoder, pyramid
from segrefine.types import BackboneOutput


class UNet(nn.Module):
    """smp U-Net returning logits at ``output_stride`` (default 1: full resolution) and the encoder pyramid.

    ``output_stride`` > 1 (a power of two up to ``2**(encoder_depth - 1)``) truncates the decoder:
    only the blocks up to the one that reaches that stride are kept, and a new 3x3 classifier
    (like smp's segmentation head) on that block's channels gives a coarse map for heads that
    refine one (PointRend). The dropped blocks and smp's full-resolution head are removed, so
    they cost nothing and hold no unused parameters. ``output_stride=1`` is smp's U-Net unchanged.

    ``feature_channels``: channels of each pyramid level, aligned with ``feature_strides``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        encoder_name: str = "resnet18",
        encoder_weights: str | None = None,
        encoder_depth: int = 5,
        decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 16),
        output_stride: int = 1,
        name: str = "unet",
    ):
        super().__init__()
        build_encoder(encoder_name, in_channels, encoder_depth, None)  # validates the name cheaply
        self.net = smp.Unet(
            encoder_name=encoder_name,
            encoder_weights=encoder_weights,
            encoder_depth=encoder_depth,
            decoder_channels=tuple(decoder_channels)[:encoder_depth],
            in_channels=in_channels,
            classes=num_classes,
        )
        self.required_divisor = 2**encoder_depth
        self.feature_channels = tuple(self.net.encoder.out_channels[1:])
        allowed = [2**k for k in range(encoder_depth)]
        if output_stride not in allowed:
            raise ValueError(
                f"backbone.output_stride={output_stride!r} must be one of {allowed} "
                f"(a power of two below 2**encoder_depth={2**encoder_depth})"
            )
        self.stride = output_stride
        if output_stride > 1:
            # Decoder block i upsamples to stride 2**(encoder_depth - 1 - i); keep those down to output_stride.
            keep = encoder_depth - output_stride.bit_length() + 1
            self.net.decoder.blocks = self.net.decoder.blocks[:keep]
            channels = tuple(decoder_channels)[:encoder_depth][keep - 1]
            self.net.segmentation_head = nn.Conv2d(channels, num_classes, kernel_size=3, padding=1)

    def forward(self, image: torch.Tensor) -> BackboneOutput:
        features = self.net.encoder(image)
        logits = self.net.segmentation_head(self.net.decoder(features))
        levels, strides = pyramid(features)
        return BackboneOutput(logits=logits, features=levels, feature_strides=strides, stride=self.stride)
