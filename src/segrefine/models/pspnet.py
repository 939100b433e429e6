"""PSPNet (Zhao et al. 2017) from segmentation-models-pytorch, at its native output stride."""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import nn

from segrefine.models.encoders import build_encoder, prune_unused, pyramid
from segrefine.types import BackboneOutput


class PSPNet(nn.Module):
    """smp PSPNet without its final x8 upsampling: logits at stride 2**encoder_depth."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        encoder_name: str = "resnet18",
        encoder_weights: str | None = None,
        encoder_depth: int = 3,
        psp_out_channels: int = 256,
        name: str = "pspnet",
    ):
        super().__init__()
        build_encoder(encoder_name, in_channels, encoder_depth, None)
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
        self.stride = 2**encoder_depth
        self.required_divisor = self.stride
        # Channels of each pyramid level in BackboneOutput.features (aligned with feature_strides).
        self.feature_channels = tuple(self.encoder.out_channels[1:])

    def forward(self, image: torch.Tensor) -> BackboneOutput:
        features = self.encoder(image)
        logits = self.classifier(self.decoder(features))
        levels, strides = pyramid(features)
        return BackboneOutput(logits=logits, features=levels, feature_strides=strides, stride=self.stride)
