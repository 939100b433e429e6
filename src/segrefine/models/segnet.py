"""SegNet (Badrinarayanan, Kendall & Cipolla, TPAMI 2017).

Encoder: the convolutional layers of a VGG (torchvision's ``vgg16_bn`` layout by default,
built here with weights=None: nothing downloads), in stages separated by 2x2 max pooling that
keeps its argmax indices. Decoder: the mirror image. Each stage first *unpools* with the
indices of the matching encoder pooling (values go back to the positions they came from,
zeros elsewhere; no learned upsampling), then applies as many 3x3 conv + BN + ReLU as the
encoder stage had, the last one reducing to that stage's input width. The final decoder conv
is the classifier: 3x3 to the classes, no BN/ReLU (the paper's conv1_1_D). Logits at stride 1.

With VGG-16-BN, 3 input channels and 11 classes (CamVid) it has 29,449,355 trainable
parameters (conv weights and biases, BN scales and shifts; BN running statistics are buffers,
not counted): the ~29.4 M usually quoted for SegNet (14.7 M encoder + a mirrored decoder).

``encoder_depth`` (1-5) keeps that many VGG stages and mirrors them.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vgg import cfgs as VGG_CFGS

from segrefine.models.base import Backbone, resolve_output_stride
from segrefine.types import BackboneOutput

# torchvision's layer lists: "A" vgg11, "B" vgg13, "D" vgg16, "E" vgg19.
ENCODERS = {"vgg11_bn": "A", "vgg13_bn": "B", "vgg16_bn": "D", "vgg19_bn": "E"}


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def vgg_stages(encoder_name: str) -> list[list[int]]:
    """Output widths of the convs of each VGG stage, e.g. vgg16: [[64, 64], [128, 128], [256]*3, [512]*3, [512]*3]."""
    if encoder_name not in ENCODERS:
        raise ValueError(f"backbone.encoder_name={encoder_name!r} is not one of {sorted(ENCODERS)}")
    stages, current = [], []
    for item in VGG_CFGS[ENCODERS[encoder_name]]:
        if item == "M":
            stages.append(current)
            current = []
        else:
            current.append(int(item))
    return stages


class SegNet(Backbone):
    """See the module docstring. ``feature_channels``/``feature_strides``: the pooled output of
    each encoder stage (stride 2, 4, ..., 2**encoder_depth).

    output_stride: None or 1 (SegNet has no coarse map; anything else is refused).
   """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        encoder_name: str = "vgg16_bn",
        encoder_depth: int = 5,
        output_stride: int | None = None,
    ):
        super().__init__()
        stages = vgg_stages(encoder_name)
        if not 1 <= encoder_depth <= len(stages):
            raise ValueError(f"backbone.encoder_depth={encoder_depth!r} must be in 1..{len(stages)} for {encoder_name}")
        stages = stages[:encoder_depth]
        self.encoder, self.decoder = nn.ModuleList(), nn.ModuleList()
        stage_inputs = []
        width = in_channels
        for widths in stages:
            layers, c = [], width
            for w in widths:
                layers.append(conv_bn_relu(c, w))
                c = w
            stage_inputs.append(width)
            self.encoder.append(nn.Sequential(*layers))
            width = c
        # Mirror: decoder stage i (coarsest first) keeps the width, then goes down to its input width.
        for index, (widths, stage_in) in enumerate(reversed(list(zip(stages, stage_inputs)))):
            last = index == len(stages) - 1
            c, layers = widths[-1], []
            for _ in widths[:-1]:
                layers.append(conv_bn_relu(c, c))
            layers.append(nn.Conv2d(c, num_classes, 3, padding=1) if last else conv_bn_relu(c, stage_in))
            self.decoder.append(nn.Sequential(*layers))
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.declare(
            feature_channels=tuple(widths[-1] for widths in stages),
            required_divisor=2**encoder_depth,
            output_stride=resolve_output_stride(output_stride, (1,), 1, "SegNet's decoder always unpools to full size"),
        )

    def forward(self, image: torch.Tensor) -> BackboneOutput:
        x, levels, indices, sizes = image, [], [], []
        for stage in self.encoder:
            x = stage(x)
            sizes.append(x.shape[-2:])
            x, index = self.pool(x)
            indices.append(index)
            levels.append(x)
        for stage, index, size in zip(self.decoder, reversed(indices), reversed(sizes)):
            x = stage(self.unpool(x, index, output_size=size))
        return self.output(x, levels)
