"""U-Net (Ronneberger et al. 2015) from segmentation-models-pytorch."""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import nn

from segrefine.models.base import Backbone, resolve_output_stride
from segrefine.models.encoders import check_encoder_name, prune_unused, pyramid
from segrefine.types import BackboneOutput


class UNet(Backbone):
    """smp U-Net returning logits at ``output_stride`` (default 1: full resolution) and the encoder pyramid.

    ``output_stride`` > 1 (a power of two up to ``2**(encoder_depth - 1)``) truncates the decoder:
    only the blocks up to the one that reaches that stride are kept, and a new 3x3 classifier
    (like smp's segmentation head) on that block's channels gives a coarse map for heads that
    refine one (PointRend). The dropped blocks and smp's full-resolution head are removed, so
    they cost nothing and hold no unused parameters (nor do encoder stages beyond
    ``encoder_depth``, which smp keeps). ``output_stride=1`` is smp's U-Net otherwise unchanged.

   
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        encoder_name: str = "resnet18",
        encoder_weights: str | None = None,
        encoder_depth: int = 5,
        decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 16),
        output_stride: int | None = 1,
    ):
        super().__init__()
        check_encoder_name(encoder_name)
        how = f"a power of two below 2**encoder_depth={2**encoder_depth}"
        output_stride = resolve_output_stride(output_stride, tuple(2**k for k in range(encoder_depth)), 1, how)
        self.net = smp.Unet(
            encoder_name=encoder_name,
            encoder_weights=encoder_weights,
            encoder_depth=encoder_depth,
            decoder_channels=tuple(decoder_channels)[:encoder_depth],
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
            channels = tuple(decoder_channels)[:encoder_depth][keep - 1]
            self.net.segmentation_head = nn.Conv2d(channels, num_classes, kernel_size=3, padding=1)

    def forward(self, image: torch.Tensor) -> BackboneOutput:
        features = self.net.encoder(image)
        logits = self.net.segmentation_head(self.net.decoder(features))
        return self.output(logits, pyramid(features))
