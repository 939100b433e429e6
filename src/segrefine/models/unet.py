"""U-Net (Ronneberger et al. 2015) from segmentation-models-pytorch."""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import nn

from segrefine.models.encoders import build_encoder, pyramid
from segrefine.types import BackboneOutput


class UNet(nn.Module):
    """smp U-Net returning full-resolution logits (stride 1) and the encoder pyramid."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        encoder_name: str = "resnet18",
        encoder_weights: str | None = None,
        encoder_depth: int = 5,
        decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 16),
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
        self.stride = 1

    def forward(self, image: torch.Tensor) -> BackboneOutput:
        features = self.net.encoder(image)
        logits = self.net.segmentation_head(self.net.decoder(features))
        levels, strides = pyramid(features)
        return BackboneOutput(logits=logits, features=levels, feature_strides=strides, stride=self.stride)
