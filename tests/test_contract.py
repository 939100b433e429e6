"""The backbone x head contract matrix.

Every backbone and every head is listed once below (Hydra overrides at a tiny scale) and
joins every test here: each pair runs forward at odd sizes through the training module
(padding to the backbone's declared divisor, cropping back) and, where the head trains,
backward into the backbone; each backbone's declared pyramid is checked against the
feature maps it really returns.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from segrefine.build import build_component
from segrefine.heads.base import auxiliary_losses
from segrefine.models.base import Backbone
from segrefine.models.fcn import FCN
from segrefine.module import SegmentationModule
from segrefine.types import IGNORE_INDEX, BackboneOutput

# -- the lists: a new backbone or head joins the matrix here -------------------------------

BACKBONES = {
    "fcn": ["backbone=fcn"],
    "unet": ["backbone=unet", "backbone.encoder_depth=3", "backbone.decoder_channels=[16,8,8]"],
    "unet-vanilla": ["backbone=unet", "backbone.variant=vanilla", "backbone.encoder_depth=3", "backbone.base_width=4"],
    "pspnet": ["backbone=pspnet", "backbone.psp_out_channels=16"],
    "segnet": ["backbone=segnet", "backbone.encoder_name=vgg11_bn", "backbone.encoder_depth=3"],
}
HEADS = {
    "none": ["head=none"],
    # No gradient: the CRF runs (pydensecrf, numpy) at evaluation only, and its training is
    # exactly head=none's (the none column covers it). Forward only.
    "densecrf": ["head=densecrf", "head.num_workers=1", "head.iterations=2"],
    "crfrnn": ["head=crfrnn", "head.iterations=2", "head.eval_iterations=2"],
    "pointrend": ["head=pointrend", "head.hidden_channels=16", "head.subdivision_min_points=64"],
}
# Heads without a backward pass (see their entry above).
FORWARD_ONLY = {"densecrf"}
# Heads that refine a coarse map: a backbone with output stride 1 must be refused by name.
NEEDS_COARSE_MAP = {"pointrend"}

NUM_CLASSES, IN_CHANNELS = 3, 1
# (batch, height, width): odd sizes, never a multiple of any backbone's divisor.
SHAPES = [(1, 37, 45), (3, 33, 50)]


@cache
def composed(*overrides: str):
    """The train config with these overrides (composed once per module: composing takes ~0.5 s)."""
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose("train", overrides=[*overrides, "logger=none"])


def build_head(cfg, backbone: Backbone) -> nn.Module:
    """The head of a composed config, built as the train entry point builds it."""
    return build_component(cfg.head, num_classes=NUM_CLASSES, backbone=backbone.spec())


# -- the matrix ----------------------------------------------------------------------------


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_every_backbone_with_every_head_forward_and_backward(single_thread, backbone, head):
    torch.manual_seed(0)
    cfg = composed(*BACKBONES[backbone], *HEADS[head])
    net = build_component(cfg.backbone, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES)
    assert isinstance(net, Backbone)
    if head in NEEDS_COARSE_MAP and net.output_stride == 1:
        with pytest.raises(Exception, match="needs a coarse prediction .* backbone.output_stride"):
            build_head(cfg, net)
        return
    module = SegmentationModule(net, build_head(cfg, net), NUM_CLASSES, [f"c{i}" for i in range(NUM_CLASSES)])
    for batch, height, width in SHAPES:
        image = torch.randn(batch, IN_CHANNELS, height, width)
        mask = torch.randint(0, NUM_CLASSES, (batch, height, width))
        mask[:, :5, :5] = IGNORE_INDEX

        module.eval()
        with torch.no_grad():
            logits = module(image)
        assert logits.shape == (batch, NUM_CLASSES, height, width)
        assert torch.isfinite(logits).all()

        if head in FORWARD_ONLY:
            continue
        module.train()
        module.zero_grad()
        padded, padded_mask = module._pad(image, mask)  # what training_step does, without a Trainer
        out = module.backbone(padded)
        loss = module.head.losses(out, padded, padded_mask)["loss"] + sum(auxiliary_losses(out, padded_mask).values())
        assert torch.isfinite(loss)
        loss.backward()
        grads = {name: p.grad for name, p in module.backbone.named_parameters() if p.requires_grad}
        missing = [name for name, g in grads.items() if g is None]
        assert not missing, f"backbone parameters without a gradient (unused, and DDP fails on them): {missing}"
        assert all(torch.isfinite(g).all() for g in grads.values())
        # The first parameter is the bottom of the network: the gradient went all the way through.
        first = next(iter(grads))
        assert grads[first].abs().sum() > 0, first


# -- declared pyramid == measured pyramid ------------------------------------------------------


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_declared_channels_and_strides_match_the_feature_maps(single_thread, backbone):
    cfg = composed(*BACKBONES[backbone], *HEADS["none"])
    net = build_component(cfg.backbone, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES).eval()
    height, width = 2 * net.required_divisor, 3 * net.required_divisor
    with torch.no_grad():
        out = net(torch.randn(2, IN_CHANNELS, height, width))
    # Strides measured as input size / map size, channels as the maps' widths.
    measured_strides = tuple(height // f.shape[-2] for f in out.features)
    assert all(f.shape[-2:] == (height // s, width // s) for f, s in zip(out.features, measured_strides))
    assert measured_strides == net.feature_strides
    assert tuple(f.shape[1] for f in out.features) == net.feature_channels
    assert out.logits.shape == (2, NUM_CLASSES, height // net.output_stride, width // net.output_stride)
    assert out.feature_strides == net.feature_strides and out.stride == net.output_stride


# -- what a head accepts as a backbone ----------------------------------------------------------


class Duck(nn.Module):
    """Has every attribute a backbone declares, but is not a Backbone."""

    feature_channels, feature_strides, required_divisor, output_stride = (4,), (4,), 4, 4

    def forward(self, image: torch.Tensor) -> BackboneOutput:
        raise AssertionError("never called")


@pytest.mark.parametrize("head", list(HEADS))
def test_a_head_takes_the_backbone_declaration_never_a_module(head):
    cfg = composed(*BACKBONES[next(iter(BACKBONES))], *HEADS[head])
    for wrong in (Duck(), FCN(1, NUM_CLASSES)):  # a look-alike, and a real backbone module
        with pytest.raises(Exception) as caught:
            build_component(cfg.head, num_classes=NUM_CLASSES, backbone=wrong)
        error = caught.value.__cause__ or caught.value  # Hydra wraps constructor errors
        assert isinstance(error, TypeError) and type(wrong).__name__ in str(error) and "BackboneSpec" in str(error)

