"""Issue-13 variants: PSPNet zhao, SegNet, the stride-4 skip control, CRF-RNN zheng through the
module, PointRend budgets. Shapes on odd sizes with every head that applies, and behaviour."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from segrefine.build import build_component
from segrefine.heads.pointrend import PointRendHead, grid_point_coords
from segrefine.models.pspnet import PSPNet, PyramidPooling
from segrefine.models.segnet import SegNet
from segrefine.build import build_module
from segrefine.types import BackboneOutput

DATA = SimpleNamespace(in_channels=1, num_classes=3, class_names=["background", "a", "b"])

BACKBONES = {
    "segnet": ["backbone=segnet"],
    # The zhao design on a dilated ResNet-18 keeps this matrix fast; ResNet-50 is tested below.
    "pspnet-zhao-r18": ["backbone=pspnet", "backbone.variant=zhao", "backbone.encoder_name=resnet18"],
    "pspnet-lite-fine_skip": ["backbone=pspnet", "backbone.fine_skip=true"],
    "fcn-fine_skip": ["backbone=fcn", "backbone.fine_skip=true"],
}
HEADS = {
    "none": ["head=none"],
    "crfrnn-zheng": ["head=crfrnn", "head.parametrisation=zheng", "head.eval_iterations=3", "head.iterations=2"],
    "pointrend": ["head=pointrend"],
}
# SegNet outputs full resolution (stride 1): PointRend has no coarse map to refine there.
CASES = [(b, h) for b in BACKBONES for h in HEADS if not (b == "segnet" and h == "pointrend")]


def _module(make_cfg, *overrides):
    torch.manual_seed(0)
    return build_module(make_cfg(*overrides), DATA)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("backbone,head", CASES, ids=lambda v: str(v))
def test_odd_sizes_train_and_infer_through_the_module(make_cfg, backbone, head, batch):
    module = _module(make_cfg, *BACKBONES[backbone], *HEADS[head])
    g = torch.Generator().manual_seed(batch)
    image = torch.randn(batch, 1, 37, 45, generator=g)
    mask = torch.randint(0, 3, (batch, 37, 45), generator=g)
    module.train()
    loss = module.training_step({"image": image, "mask": mask}, 0)
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    first = next(p for n, p in module.backbone.named_parameters() if "encoder" in n)
    assert first.grad.abs().sum() > 0  # the loss reaches the first encoder layer
    module.eval()
    with torch.no_grad():
        out = module(image)
        assert out.shape == (batch, 3, 37, 45) and torch.isfinite(out).all()
        # Behaviour: in eval mode an image's prediction does not depend on its batch mates
        # (padding, cropping, CRF lattices and point selection are per image).
        alone = module(image[-1:])
    torch.testing.assert_close(out[-1:], alone, atol=1e-4, rtol=1e-4)


def test_segnet_refuses_pointrend_by_its_stride(make_cfg):
    with pytest.raises(Exception, match="stride 1"):
        _module(make_cfg, "backbone=segnet", "head=pointrend")


# -- SegNet --------------------------------------------------------------------------------


def test_segnet_vgg16_bn_parameter_count_matches_the_published_29_4_million():
    # All trainable parameters (conv weights + biases, BN scale + shift), CamVid's 3 channels in, 11 classes.
    count = sum(p.numel() for p in SegNet(3, 11).parameters())
    assert count == pytest.approx(29.4e6, rel=0.005)
    assert count == 29_449_355  # encoder = VGG-16-BN's conv part (14.7 M) + the mirrored decoder


def test_segnet_unpools_to_the_argmax_positions_of_its_encoder():
    net = SegNet(1, 2, encoder_depth=2).eval()
    encoded, unpooled = [], []
    net.encoder[-1].register_forward_hook(lambda m, i, o: encoded.append(o))
    net.unpool.register_forward_hook(lambda m, i, o: unpooled.append(o))
    with torch.no_grad():
        out = net(torch.randn(1, 1, 12, 20))
    assert out.logits.shape == (1, 2, 12, 20) and out.stride == 1
    before_pool, after_unpool = encoded[0], unpooled[0]  # the deepest stage, unpooled first
    windows = F.unfold(before_pool, 2, stride=2).view(1, before_pool.shape[1], 4, -1)
    placed = F.unfold(after_unpool, 2, stride=2).view_as(windows)
    # Exactly the window's maximum sits at the maximum's position, everything else is zero.
    expected = torch.zeros_like(windows).scatter_(2, windows.argmax(2, keepdim=True), windows.amax(2, keepdim=True))
    torch.testing.assert_close(placed, expected)


def test_segnet_depth_is_configurable_and_mirrored():
    net = SegNet(1, 4, encoder_depth=3)
    assert net.required_divisor == 8 and net.feature_strides == (2, 4, 8) and net.feature_channels == (64, 128, 256)
    assert [len(stage) for stage in net.encoder] == [2, 2, 3] and [len(stage) for stage in net.decoder] == [3, 2, 2]
    assert net.decoder[-1][-1].out_channels == 4  # the last decoder conv is the classifier
    with pytest.raises(ValueError, match="encoder_depth=6"):
        SegNet(1, 4, encoder_depth=6)


# -- PSPNet (Zhao et al.) --------------------------------------------------------------------


def test_zhao_is_a_full_depth_resnet_dilated_to_stride_8():
    net = PSPNet(1, 3, variant="zhao")
    encoder = net.encoder
    assert [len(getattr(encoder, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]  # ResNet-50
    assert encoder.layer3[0].conv2.stride == (1, 1) and encoder.layer3[-1].conv2.dilation == (2, 2)
    assert encoder.layer4[0].conv2.stride == (1, 1) and encoder.layer4[-1].conv2.dilation == (4, 4)
    out = net.eval()(torch.randn(1, 1, 40, 56))
    assert out.stride == 8 and out.logits.shape == (1, 3, 5, 7)
    assert [f.shape[-2:] for f in out.features][2:] == [(5, 7)] * 3 and out.auxiliary == {}


def test_pyramid_pooling_bins_and_concatenation():
    ppm = PyramidPooling(8).eval()
    assert ppm.bins == (1, 2, 3, 6) and ppm.out_channels == 16
    x = torch.randn(2, 8, 12, 12)
    y = ppm(x)
    assert torch.equal(y[:, :8], x)  # the features themselves, then one 2-channel summary per bin
    global_branch = y[:, 8:10]
    assert torch.allclose(global_branch, global_branch[..., :1, :1].expand_as(global_branch))  # bin 1: constant


def test_zhao_auxiliary_loss_enters_training_with_weight_0_4(make_cfg):
    module = _module(make_cfg, "backbone=pspnet", "backbone.variant=zhao", "backbone.dropout=0.0")
    module.train()
    image, mask = torch.randn(2, 1, 40, 48), torch.randint(0, 3, (2, 40, 48))
    out = module.backbone(image)
    weight, aux = out.auxiliary["aux_stage3"]
    assert weight == 0.4 and aux.shape == (2, 3, 5, 6)
    up = lambda t: F.interpolate(t, size=(40, 48), mode="bilinear", align_corners=False)  # noqa: E731
    expected = F.cross_entropy(up(out.logits), mask) + 0.4 * F.cross_entropy(up(aux), mask)
    # BN in train mode and no dropout: a second forward is the same computation.
    torch.testing.assert_close(module.training_step({"image": image, "mask": mask}, 0), expected, rtol=1e-5, atol=1e-5)


def test_zhao_parameter_count_beside_the_published_resnet101():
    # PSPNet on dilated ResNet-101, 19 classes (Cityscapes), without the training-only auxiliary
    # head: 65.6 M here; published 65.9 M (HRNetV2 paper's Cityscapes table; its ResNet has a deep stem).
    net = PSPNet(3, 19, variant="zhao", encoder_name="resnet101")
    count = sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in net.aux_classifier.parameters())
    assert count == 65_583_187
    assert count == pytest.approx(65.9e6, rel=0.01)


def test_zhao_refuses_a_truncated_encoder():
    with pytest.raises(ValueError, match="encoder_depth=3.*full-depth"):
        PSPNet(1, 3, variant="zhao", encoder_depth=3)
    with pytest.raises(ValueError, match="variant='deep'"):
        PSPNet(1, 3, variant="deep")


# -- "none + stride-4 skip" ------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [BACKBONES["fcn-fine_skip"], BACKBONES["pspnet-lite-fine_skip"],
                                       ["backbone=pspnet", "backbone.variant=zhao", "backbone.fine_skip=true"]],
                         ids=["fcn", "pspnet-lite", "pspnet-zhao"])
def test_fine_skip_is_pointrends_point_head_at_every_stride4_cell(make_cfg, overrides):
    torch.manual_seed(0)
    backbone = build_component(make_cfg(*overrides).backbone, in_channels=1, num_classes=3).eval()
    out = backbone(torch.randn(2, 1, 40, 48))
    assert out.stride == 4 and out.logits.shape == (2, 3, 10, 12)
    coarse_weight, coarse = out.auxiliary["coarse"]
    assert coarse_weight == 1.0 and coarse.shape[-2:] == (5, 6)  # the stride-8 score map, still supervised
    # The logits are PointRend's point head applied at each stride-4 cell centre, seeing what it
    # sees there (stride-4 features and the coarse logits, sampled at the point).
    fine = out.feature_at(4).detach().requires_grad_()
    head = PointRendHead(3, backbone=backbone.spec())
    head.point_head.load_state_dict(backbone.fine_skip.point_head.state_dict())
    points = BackboneOutput(logits=coarse.detach(), features=[out.features[0], fine, *out.features[2:]],
                            feature_strides=out.feature_strides, stride=8)
    index = torch.arange(10 * 12).expand(2, -1)
    expected = head.point_logits(points, grid_point_coords(index, (10, 12)))
    torch.testing.assert_close(out.logits.flatten(2), expected, atol=1e-5, rtol=1e-5)
    # ... so a gradient reaches the stride-4 features directly (not only through deeper layers).
    grad, = torch.autograd.grad(backbone.fine_skip(coarse.detach(), fine).square().sum(), fine)
    assert (grad.abs().flatten(1).sum(1) > 0).all()


def test_fine_skip_needs_a_stride4_level():
    with pytest.raises(ValueError, match="fine_skip=true needs a stride-4"):
        PSPNet(1, 3, encoder_depth=1, fine_skip=True)


# -- CRF-RNN zheng through the module ---------------------------------------------------------


def test_zheng_head_learns_its_matrices_and_the_backbone(make_cfg):
    module = _module(make_cfg, "backbone=fcn", "head=crfrnn", "head.parametrisation=zheng", "head.iterations=2")
    module.train()
    image, mask = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 32, 32))
    module.training_step({"image": image, "mask": mask}, 0).backward()
    crf = module.head.crf
    for name, param in [("backbone", next(module.backbone.parameters())), ("spatial_weights", crf.spatial_weights),
                        ("bilateral_weights", crf.bilateral_weights), ("compatibility", crf.compatibility)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # Unsymmetrised: the compatibility's gradient is not symmetric (a symmetrised M would have one).
    assert (crf.compatibility.grad - crf.compatibility.grad.t()).abs().max() > 1e-6
    assert set(module.head.extra_metrics()) >= {"compat_diag_mean", "compat_asymmetry"}


def test_zheng_refuses_a_potts_compatibility(make_cfg):
    with pytest.raises(Exception, match="does not apply to head.parametrisation=zheng"):
        _module(make_cfg, "head=crfrnn", "head.parametrisation=zheng", "head.compatibility=potts")
    with pytest.raises(Exception, match="parametrisation='zhang' is not one of"):
        _module(make_cfg, "head=crfrnn", "head.parametrisation=zhang")


# -- PointRend budgets -------------------------------------------------------------------------


def test_detectron2_semantic_budget_reproduces_its_point_counts(make_cfg):
    cfg = make_cfg("backbone=fcn", "head=pointrend", "head.budget=detectron2_semantic")
    head = build_component(cfg.head, num_classes=3, backbone=build_component(cfg.backbone, in_channels=1, num_classes=3).spec())
    assert head.budget == "detectron2_semantic"
    assert head.num_training_points(512, 1024) == 2048  # TRAIN_NUM_POINTS on Cityscapes 512x1024 crops
    assert head.num_subdivision_points((1024, 2048), (1024, 2048)) == 8192  # SUBDIVISION_NUM_POINTS
    assert (head.oversample_ratio, head.importance_sample_ratio) == (3, 0.75)
    assert head.num_subdivision_points((64, 64), (32, 32)) == 16  # no floor: sparse on small images too
    default = build_component(make_cfg("head=pointrend").head, num_classes=3, backbone=build_component(cfg.backbone, in_channels=1, num_classes=3).spec())
    assert default.num_training_points(64, 64) == 256 and default.num_subdivision_points((64, 64), (32, 32)) == 1024
    # A single key still overrides the budget's value.
    cfg = make_cfg("head=pointrend", "head.budget=detectron2_semantic", "head.train_num_points=100")
    assert cfg.head.train_num_points == 100 and cfg.head.subdivision_min_points == 1


def test_unknown_budget_is_named(make_cfg):
    cfg = make_cfg("backbone=fcn", "head=pointrend", "head.budget=huge")
    with pytest.raises(Exception, match="head.budget='huge' is not one of"):
        build_component(cfg.head, num_classes=3, backbone=build_component(cfg.backbone, in_channels=1, num_classes=3).spec())
