"""Every backbone variant composes through Hydra, runs forward/backward, keeps its strides."""

import pytest
import torch
import torch.nn.functional as F

from segrefine.build import build_component
from segrefine.models.fcn import bilinear_kernel
from segrefine.build import build_data, build_module

VARIANTS = [
    (["backbone=unet"], 1),
    (["backbone=unet", "backbone.variant=vanilla", "backbone.base_width=8"], 1),
    (["backbone=pspnet"], 8),
    (["backbone=fcn", "backbone.variant=32s"], 32),
    (["backbone=fcn", "backbone.variant=16s"], 16),
    (["backbone=fcn", "backbone.variant=8s"], 8),
    (["backbone=fcn", "backbone.variant=8s", "backbone.encoder_name=vgg16"], 8),
    (["backbone=fcn", "backbone.variant=8s", "backbone.upsampling=bilinear"], 8),
    (["backbone=fcn", "backbone.fine_skip=true"], 4),
    (["backbone=pspnet", "backbone.variant=zhao"], 8),
    (["backbone=pspnet", "backbone.fine_skip=true"], 4),
    (["backbone=segnet"], 1),
]


@pytest.mark.parametrize("overrides,stride", VARIANTS, ids=lambda v: "-".join(v) if isinstance(v, list) else str(v))
def test_backbone_shapes_strides_and_gradients(make_cfg, overrides, stride):
    cfg = make_cfg(*overrides)
    backbone = build_component(cfg.backbone, in_channels=2, num_classes=4)
    image = torch.randn(2, 2, 64, 96)
    out = backbone(image)
    assert out.stride == backbone.output_stride == stride
    assert out.logits.shape == (2, 4, 64 // stride, 96 // stride)
    # The declared pyramid is what comes out (the variants' strides differ, e.g. dilated zhao).
    assert len(out.features) == len(backbone.feature_strides)
    for feature, s, c in zip(out.features, backbone.feature_strides, backbone.feature_channels):
        assert feature.shape[1:] == (c, 64 // s, 96 // s)
    out.logits.square().mean().backward()
    first_conv = next(p for n, p in backbone.named_parameters() if "encoder" in n or "vanilla.down" in n)
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_bilinear_kernel_reproduces_bilinear_upsampling_inside():
    x = torch.randn(1, 3, 6, 7)
    deconv = F.conv_transpose2d(x, bilinear_kernel(3, 2), stride=2, padding=1)
    reference = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    # Equal away from the border (the transposed conv zero-pads; interpolate clamps).
    assert torch.allclose(deconv[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1], atol=1e-6)


@pytest.mark.parametrize("backbone", ["unet", "pspnet", "fcn", "segnet"])
def test_module_pads_odd_sizes_and_crops_back(make_cfg, backbone):
    cfg = make_cfg(f"backbone={backbone}")
    module = build_module(cfg, build_data(cfg))
    image = torch.randn(1, 1, 37, 45)
    logits = module(image)
    assert logits.shape == (1, 3, 37, 45)
    # The crop keeps the top-left: the image content sits at the same pixels as before padding.
    mask = torch.zeros(1, 37, 45, dtype=torch.long)
    padded_image, padded_mask = module._pad(image, mask)
    assert padded_image.shape[-2] % module.backbone.required_divisor == 0
    assert torch.equal(padded_image[..., :37, :45], image)
    assert (padded_mask[..., 37:, :] == 255).all() and (padded_mask[..., :, 45:] == 255).all()


@pytest.mark.parametrize("overrides", [["backbone=unet"], ["backbone=fcn"], ["backbone=pspnet"],
                                       ["backbone=pspnet", "backbone.variant=zhao"]], ids=["unet", "fcn", "lite", "zhao"])
def test_unknown_encoder_name_is_named_before_anything_is_built(make_cfg, overrides):
    cfg = make_cfg(*overrides, "backbone.encoder_name=resnet_nope")
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with pytest.raises(Exception, match="encoder_name='resnet_nope' is not an encoder"):
        build_component(cfg.backbone, in_channels=1, num_classes=2)
    # Nothing was built: no initial weights drawn, so the run's random numbers are not shifted.
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("encoder_name", ["resnet34", "tu-resnet10t"])
def test_known_encoder_names_pass_the_check(encoder_name):
    from segrefine.models.encoders import check_encoder_name

    check_encoder_name(encoder_name)  # smp's own list, and timm's for tu- names: no error


@pytest.mark.parametrize("overrides,message", [
    (["backbone=fcn", "+backbone.output_stride=4"], "gives 8 .*backbone.variant=8s"),
    (["backbone=fcn", "backbone.fine_skip=true", "+backbone.output_stride=8"], "gives 4 .*fine_skip"),
    (["backbone=pspnet", "+backbone.output_stride=4"], "gives 8 .*variant=lite"),
    (["backbone=segnet", "+backbone.output_stride=2"], "gives 1 "),
    (["backbone=unet", "backbone.output_stride=32"], "gives 1, 2, 4, 8, 16 "),
])
def test_an_output_stride_a_backbone_cannot_give_is_refused(make_cfg, overrides, message):
    cfg = make_cfg(*overrides)
    with pytest.raises(Exception, match=f"backbone.output_stride=.* is not a stride this backbone gives: it {message}"):
        build_component(cfg.backbone, in_channels=1, num_classes=2)


@pytest.mark.parametrize("overrides,stride", [(["backbone=fcn", "backbone.variant=16s"], 16), (["backbone=segnet"], 1),
                                              (["backbone=pspnet"], 8)])
def test_the_backbones_own_output_stride_is_accepted(make_cfg, overrides, stride):
    cfg = make_cfg(*overrides, f"+backbone.output_stride={stride}")
    assert build_component(cfg.backbone, in_channels=1, num_classes=2).output_stride == stride
