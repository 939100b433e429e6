"""PointRend: point sampling, training point selection, subdivision inference, losses,
the U-Net truncation that gives it a coarse map, and that it renders better boundaries."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from segrefine.build import build_component
from torch import nn

from segrefine.heads.base import upsample_logits
from segrefine.heads.none import NoHead
from segrefine.heads.pointrend import (
    PointRendHead,
    grid_point_coords,
    point_sample,
    sample_training_points,
    subdivision_sizes,
    uncertainty,
)
from segrefine.metrics import SegmentationMetrics
from segrefine.models.base import Backbone
from segrefine.models.unet import UNet
from segrefine.build import build_data, build_module
from segrefine.train import train
from segrefine.types import IGNORE_INDEX, BackboneOutput


class FakeBackbone(Backbone):
    """Declares ``stride`` and feature levels as a backbone; ``hand_over`` builds an output
    from given logits and random features of the declared shapes."""

    def __init__(self, stride: int, feature_channels=(4, 4), feature_strides=(2, 4)):
        super().__init__()
        self.declare(feature_channels=feature_channels, feature_strides=feature_strides, required_divisor=1,
                     output_stride=stride)

    def hand_over(self, logits: torch.Tensor, image_size: tuple[int, int], seed: int = 0) -> BackboneOutput:
        g = torch.Generator().manual_seed(seed)
        height, width = image_size
        features = [
            torch.randn(logits.shape[0], c, -(-height // s), -(-width // s), generator=g)
            for c, s in zip(self.feature_channels, self.feature_strides)
        ]
        return self.output(logits, features)


# -- point_sample ------------------------------------------------------------------------


def test_point_sample_is_exact_at_cell_centres_and_bilinear_between():
    grid = torch.tensor([[0.0, 1.0, 2.0, 3.0], [10.0, 20.0, 40.0, 80.0]])  # H=2, W=4 (binary-exact centres)
    features = torch.stack([grid, -grid])[None]  # (1, 2, 2, 4)
    H, W = grid.shape
    centres = [((j + 0.5) / W, (i + 0.5) / H) for i in range(H) for j in range(W)]
    values = point_sample(features, torch.tensor([centres]))
    assert values.shape == (1, 2, 8)
    assert torch.equal(values[0, 0], grid.flatten()) and torch.equal(values[0, 1], -grid.flatten())

    coords = torch.tensor([[
        [3 / 4, 1 / 4],                      # halfway between the centres of (0, 2) and (0, 3)
        [(0.5 + 0.25) / 4, (0.5 + 0.25) / 2],  # a quarter of the way from (0, 0) towards (1, 1)
        [2 / 4, 1 / 2],                      # the middle of (0, 1), (0, 2), (1, 1), (1, 2)
        [(1.5 + 0.1) / 4, (0.5 + 0.7) / 2],  # 0.1 right of (0, 1), 0.7 down
    ]])
    expected = torch.tensor([
        (2.0 + 3.0) / 2,
        0.75 * 0.75 * 0.0 + 0.75 * 0.25 * 1.0 + 0.25 * 0.75 * 10.0 + 0.25 * 0.25 * 20.0,
        (1.0 + 2.0 + 20.0 + 40.0) / 4,
        0.3 * 0.9 * 1.0 + 0.3 * 0.1 * 2.0 + 0.7 * 0.9 * 20.0 + 0.7 * 0.1 * 40.0,
    ])
    assert torch.allclose(point_sample(features, coords)[0, 0], expected, atol=1e-5)
    assert torch.allclose(point_sample(features, coords)[0, 1], -expected, atol=1e-5)


def test_point_sample_at_finer_pixel_centres_equals_bilinear_interpolation():
    """Border clamping included: the outer half pixel matches F.interpolate(align_corners=False)."""
    features = torch.randn(2, 3, 5, 7)
    size = (10, 14)
    index = torch.arange(size[0] * size[1]).expand(2, -1)
    sampled = point_sample(features, grid_point_coords(index, size)).view(2, 3, *size)
    assert torch.allclose(sampled, F.interpolate(features, size=size, mode="bilinear", align_corners=False), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.long, torch.uint8, torch.float32])
def test_point_sample_nearest_keeps_labels_and_the_ignore_index(dtype):
    mask = torch.tensor([[0, 1, 2], [IGNORE_INDEX, 2, 1]], dtype=dtype)[None, None]  # (1, 1, 2, 3)
    coords = torch.tensor([[[(j + 0.5 + dx) / 3, (i + 0.5 + dy) / 2] for i in range(2) for j in range(3)
                            for dx, dy in ((0, 0), (0.3, -0.2), (-0.4, 0.4))]])
    labels = point_sample(mask, coords, mode="nearest")
    assert labels.dtype == dtype
    assert torch.equal(labels[0, 0], mask.flatten().repeat_interleave(3))
    with pytest.raises(ValueError, match="mode='nearest'"):
        point_sample(mask.long(), coords)


# -- training point selection ------------------------------------------------------------


def test_training_points_are_the_most_uncertain_candidates_plus_uniform_ones():
    # Uncertainty falls with x: -(top1 - top2) = -10 x, so the most uncertain points have the smallest x.
    H, W = 16, 32
    x = (torch.arange(W) + 0.5) / W
    logits = torch.zeros(2, 3, H, W)
    logits[:, 0] = 10 * x
    logits[:, 2] = -5.0
    N, k, beta = 200, 3, 0.75
    coords = sample_training_points(logits, N, k, beta, generator=torch.Generator().manual_seed(0))
    assert coords.shape == (2, N, 2)
    assert ((coords >= 0) & (coords <= 1)).all()
    n_uncertain = int(beta * N)

    # Replay the draws: k*N candidates, then (1 - beta)*N uniform points.
    g = torch.Generator().manual_seed(0)
    candidates = torch.rand(2, k * N, 2, generator=g)
    uniform = torch.rand(2, N - n_uncertain, 2, generator=g)
    scores = uncertainty(point_sample(logits, candidates).unsqueeze(-1))[..., 0]
    for b in range(2):
        expected = candidates[b, scores[b].topk(n_uncertain).indices]
        assert torch.allclose(coords[b, :n_uncertain], expected)
        # ... which are the candidates with the smallest x (exact up to ties at equal x).
        assert coords[b, :n_uncertain, 0].max() <= candidates[b, :, 0].sort().values[n_uncertain] + 1e-6
    assert torch.equal(coords[:, n_uncertain:], uniform)
    # The uniform rest covers the whole square, not just the uncertain strip (x < ~0.25).
    assert coords[:, n_uncertain:, 0].max() > 0.8 and coords[:, :n_uncertain, 0].max() < 0.35


def test_all_points_uncertain_or_all_uniform_at_the_extremes():
    logits = torch.randn(1, 2, 8, 8)
    assert sample_training_points(logits, 64, 3, 1.0).shape == (1, 64, 2)
    assert sample_training_points(logits, 64, 3, 0.0).shape == (1, 64, 2)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        sample_training_points(logits, 64, 3, 1.5)


# -- subdivision inference ---------------------------------------------------------------


def test_subdivision_sizes_end_on_the_image_size():
    assert subdivision_sizes((64, 64), 8) == [(16, 16), (32, 32), (64, 64)]
    assert subdivision_sizes((37, 45), 8) == [(10, 12), (19, 23), (37, 45)]
    assert subdivision_sizes((37, 45), 2) == [(37, 45)]


@pytest.mark.parametrize("stride", [4, 8, 16, 32])
@pytest.mark.parametrize("size", [(64, 96), (37, 45), (33, 1)])
def test_inference_reaches_the_input_size(stride, size):
    backbone = FakeBackbone(stride)
    head = PointRendHead(3, backbone.spec(), feature_stride=4, subdivision_num_points=50, hidden_channels=16).eval()
    coarse = torch.randn(2, 3, -(-size[0] // stride), -(-size[1] // stride))
    image = torch.zeros(2, 1, *size)
    with torch.no_grad():
        logits = head(backbone.hand_over(coarse, size), image)
    assert logits.shape == (2, 3, *size)
    assert torch.isfinite(logits).all()


def test_inference_changes_only_the_most_uncertain_points():
    backbone = FakeBackbone(2)
    head = PointRendHead(3, backbone.spec(), feature_stride=2, subdivision_num_points=40, subdivision_min_points=1,
                         hidden_channels=16).eval()
    nn.init.normal_(head.point_head.predictor.weight, std=1.0)  # make the point head's answers visible
    coarse = torch.randn(2, 3, 8, 12) * 3
    out = backbone.hand_over(coarse, (16, 24))
    with torch.no_grad():
        rendered = head(out, torch.zeros(2, 1, 16, 24))
    upsampled = F.interpolate(coarse, size=(16, 24), mode="bilinear", align_corners=False)
    selected = uncertainty(upsampled).flatten(1).topk(40, dim=1).indices
    changed = torch.zeros(2, 16 * 24, dtype=torch.bool)
    changed.scatter_(1, selected, True)
    changed = changed.view(2, 1, 16, 24).expand_as(rendered)
    assert torch.equal(rendered[~changed], upsampled[~changed])  # bit-identical elsewhere
    assert (rendered[changed] != upsampled[changed]).float().mean() > 0.9
    # ... and there it holds the point head's prediction at those pixel centres.
    with torch.no_grad():
        expected = head.point_logits(out, grid_point_coords(selected, (16, 24)))
    got = rendered.flatten(2).gather(2, selected[:, None].expand(-1, 3, -1))
    assert torch.allclose(got, expected, atol=1e-6)


def test_point_head_echoing_the_coarse_logits_renders_plain_bilinear_upsampling():
    """Coordinates of re-predicted points line up with the pixels they are scattered into."""

    class Echo(nn.Module):
        def forward(self, fine, coarse):
            return coarse

    backbone = FakeBackbone(2)
    head = PointRendHead(3, backbone.spec(), feature_stride=2, subdivision_num_points=10**6, hidden_channels=8).eval()
    head.point_head = Echo()
    coarse = torch.randn(1, 3, 9, 7)
    with torch.no_grad():
        rendered = head(backbone.hand_over(coarse, (17, 13)), torch.zeros(1, 1, 17, 13))
    assert torch.allclose(rendered, F.interpolate(coarse, size=(17, 13), mode="bilinear", align_corners=False), atol=1e-5)


def test_training_mode_forward_is_the_upsampled_coarse_map():
    backbone = FakeBackbone(4)
    head = PointRendHead(3, backbone.spec(), hidden_channels=8).train()
    out = backbone.hand_over(torch.randn(1, 3, 8, 8), (32, 32))
    assert torch.equal(head(out, torch.zeros(1, 1, 32, 32)), upsample_logits(out, (32, 32)))


def test_stride_one_is_refused_with_the_fix_named():
    with pytest.raises(ValueError, match="backbone.output_stride=4"):
        PointRendHead(3, UNet(1, 3, encoder_depth=3, decoder_channels=(16, 16, 16)).spec())
    head = PointRendHead(3, FakeBackbone(4).spec(), hidden_channels=8).eval()
    out = BackboneOutput(torch.randn(1, 3, 8, 8), [torch.randn(1, 4, 4, 4)] * 2, (2, 4), stride=1)
    with pytest.raises(ValueError, match="backbone.output_stride"):
        head(out, torch.zeros(1, 1, 8, 8))


def test_unknown_feature_stride_is_named():
    with pytest.raises(ValueError, match="head.feature_stride=8 .* strides \\(2, 4\\)"):
        PointRendHead(3, FakeBackbone(4).spec(), feature_stride=8)


# -- losses ------------------------------------------------------------------------------


def test_losses_are_named_finite_and_respect_the_ignore_index():
    backbone = FakeBackbone(4)
    head = PointRendHead(3, backbone.spec(), hidden_channels=8, train_num_points=100)
    out = backbone.hand_over(torch.randn(2, 3, 8, 8), (32, 32))
    image, mask = torch.zeros(2, 1, 32, 32), torch.randint(0, 3, (2, 32, 32))
    losses = head.losses(out, image, mask)
    assert set(losses) == {"loss", "loss_coarse", "loss_points"}
    assert torch.allclose(losses["loss"], losses["loss_coarse"] + losses["loss_points"])
    coarse_ce = F.cross_entropy(upsample_logits(out, (32, 32)), mask)
    assert torch.allclose(losses["loss_coarse"], coarse_ce)
    # Fully ignored masks give zero losses, not NaN.
    ignored = head.losses(out, image, torch.full_like(mask, IGNORE_INDEX))
    assert all(v.item() == 0 for v in ignored.values())
    # Points are counted only where the mask is not ignored: ignoring the right half changes the point loss
    # to the mean over the left half's points only (finite, and still trained).
    half = mask.clone()
    half[..., 16:] = IGNORE_INDEX
    assert torch.isfinite(head.losses(out, image, half)["loss_points"])


@pytest.mark.parametrize("value,expected", [(1024, 1024), (10**6, 32 * 32), (0.25, 256), (0.0625, 64)])
def test_number_of_training_points(value, expected):
    head = PointRendHead(3, FakeBackbone(4).spec(), hidden_channels=8, train_num_points=value)
    assert head.num_training_points(32, 32) == expected


def test_losses_equal_the_hand_computed_coarse_and_point_cross_entropies():
    """Constant logits and features: every point sees the same inputs, so both losses follow by
    hand (logsumexp - logit of the true class) whichever points are drawn."""
    torch.manual_seed(0)
    head = PointRendHead(3, FakeBackbone(4).spec(), hidden_channels=5, num_layers=2, train_num_points=40,
                         point_loss_weight=0.5)
    nn.init.normal_(head.point_head.predictor.weight)  # the paper's 0.001 init would make every point ~uniform
    nn.init.normal_(head.point_head.predictor.bias)
    coarse, fine = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, -2.0, 0.25, 3.0])
    out = BackboneOutput(coarse.view(1, 3, 1, 1).expand(2, 3, 8, 8),
                         [torch.zeros(2, 4, 16, 16), fine.view(1, 4, 1, 1).expand(2, 4, 8, 8)], (2, 4), stride=4)
    mask = torch.ones(2, 32, 32, dtype=torch.long)
    losses = head.losses(out, torch.zeros(2, 1, 32, 32), mask)
    # The point head by hand: layers of (weight @ x + bias).relu(), the coarse logits appended each time.
    x = torch.cat([fine, coarse])
    for layer in head.point_head.layers:
        x = torch.cat([(layer.weight[..., 0] @ x + layer.bias).relu(), coarse])
    point = head.point_head.predictor.weight[..., 0] @ x + head.point_head.predictor.bias
    point_ce, coarse_ce = point.logsumexp(0) - point[1], coarse.logsumexp(0) - coarse[1]
    assert torch.allclose(losses["loss_points"], point_ce, atol=1e-5)
    assert torch.allclose(losses["loss_coarse"], coarse_ce, atol=1e-6)
    assert torch.allclose(losses["loss"], coarse_ce + 0.5 * point_ce, atol=1e-5)


def test_gradients_reach_the_point_head_and_the_backbone(make_cfg):
    cfg = make_cfg("backbone=pspnet", "head=pointrend", "head.hidden_channels=32")
    backbone = build_component(cfg.backbone, in_channels=1, num_classes=3)
    head = build_component(cfg.head, num_classes=3, backbone=backbone.spec())
    image, mask = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 32, 32))
    head.losses(backbone(image), image, mask)["loss_points"].backward()  # the point loss alone
    for name, p in head.point_head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Through the sampled fine features (encoder) and the sampled coarse logits (decoder + classifier).
    for part in (backbone.encoder, backbone.decoder, backbone.classifier):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0


# -- U-Net truncation and config composition -----------------------------------------------


def test_unet_default_is_smp_unet_bit_for_bit():
    torch.manual_seed(0)
    ours = UNet(1, 3, encoder_depth=3, decoder_channels=(32, 16, 8))
    torch.manual_seed(0)  # the same draws: UNet checks the encoder name without building anything
    reference = smp.Unet(encoder_name="resnet18", encoder_weights=None, encoder_depth=3,
                         decoder_channels=(32, 16, 8), in_channels=1, classes=3)
    theirs = reference.state_dict()
    # Ours lacks only the encoder stages smp keeps unused below depth 5 (ResNet's layer3, layer4).
    assert {k for k in theirs if k not in ours.net.state_dict()} == {k for k in theirs if k.startswith(("encoder.layer3", "encoder.layer4"))}
    assert all(torch.equal(value, theirs[key]) for key, value in ours.net.state_dict().items())
    ours.eval(), reference.eval()
    image = torch.randn(1, 1, 32, 32)
    assert torch.equal(ours(image).logits, reference(image))


@pytest.mark.parametrize("output_stride", [1, 2, 4, 8, 16])
def test_unet_truncated_decoder_gives_logits_at_its_stride(output_stride):
    unet = UNet(1, 3, output_stride=output_stride)
    out = unet(torch.randn(1, 1, 64, 96))
    assert out.stride == output_stride and out.logits.shape == (1, 3, 64 // output_stride, 96 // output_stride)
    assert len(unet.net.decoder.blocks) == 5 - (output_stride.bit_length() - 1)
    assert unet.feature_channels == tuple(f.shape[1] for f in out.features)
    with pytest.raises(ValueError, match="backbone.output_stride=3"):
        UNet(1, 3, output_stride=3)


def test_head_config_sets_the_unet_coarse_stride(make_cfg):
    assert make_cfg("backbone=unet", "head=pointrend").backbone.output_stride == 4
    assert make_cfg("backbone=unet", "head=none").backbone.output_stride == 1
    assert make_cfg("backbone=unet", "head=pointrend", "head.coarse_stride=8").backbone.output_stride == 8
    assert make_cfg("backbone=unet", "head=pointrend", "backbone.output_stride=2").backbone.output_stride == 2
    cfg = make_cfg("backbone=unet", "head=pointrend")
    backbone = build_component(cfg.backbone, in_channels=1, num_classes=3)
    assert backbone.output_stride == 4
    assert isinstance(build_component(cfg.head, num_classes=3, backbone=backbone.spec()), PointRendHead)


@pytest.mark.parametrize(
    "overrides",
    [["backbone=unet"], ["backbone=pspnet"], ["backbone=fcn"], ["backbone=fcn", "backbone.variant=32s"]],
    ids=["unet", "pspnet", "fcn8s", "fcn32s"],
)
def test_every_backbone_trains_an_epoch_with_pointrend(make_cfg, tmp_path, overrides):
    out = tmp_path / "run"
    # TINY's 32 px: FCN-32s hands over a 1x1 coarse map and PointRend renders it in 5 steps.
    metrics = train(make_cfg(*overrides, "head=pointrend", "head.hidden_channels=64", output_dir=out))
    saved = json.loads((out / "results.json").read_text())
    assert saved["head"] == "pointrend"
    assert 0 <= metrics["test/boundary_f1"] <= 1 and metrics["test/ms_per_image"] > 0


# -- does it render better boundaries? -------------------------------------------------------


def _discs(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for c in (1, 2):
            cy, cx = (torch.rand(2, generator=generator) * 0.6 + 0.2) * size
            r = (torch.rand(1, generator=generator) * 0.15 + 0.1) * size
            masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = c
    return masks


class BlurryOracle(Backbone):
    """Coarse logits from the class fractions at stride 16; features: the fractions at strides 2..16."""

    def __init__(self):
        super().__init__()
        self.declare(feature_channels=(3, 3, 3, 3), required_divisor=16, output_stride=16)

    def forward(self, mask: torch.Tensor) -> BackboneOutput:
        onehot = F.one_hot(mask, 3).permute(0, 3, 1, 2).float()
        features = [F.avg_pool2d(onehot, s) for s in self.feature_strides]
        return self.output(4 * features[-1], features)


def test_point_head_learns_sharper_boundaries_than_upsampling_fast():
    """Fast, mechanism-level: only the point head trains, on a fixed blurry coarse map."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    train_masks, test_masks = _discs(32, 64, g), _discs(16, 64, g)
    backbone = BlurryOracle()
    head = PointRendHead(3, backbone.spec(), feature_stride=2, train_num_points=256, hidden_channels=64,
                         subdivision_num_points=1024)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(80):
        masks = train_masks[torch.randint(0, 32, (8,))]
        loss = head.losses(backbone(masks), masks, masks)["loss_points"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    rendered, upsampled = SegmentationMetrics(3), SegmentationMetrics(3)
    with torch.no_grad():
        out = backbone(test_masks)
        rendered.update(head(out, test_masks).argmax(1), test_masks)
        upsampled.update(upsample_logits(out, (64, 64)).argmax(1), test_masks)
    bf1_rendered, bf1_upsampled = rendered.compute()["boundary_f1"], upsampled.compute()["boundary_f1"]
    assert bf1_rendered > bf1_upsampled + 0.2, (bf1_rendered, bf1_upsampled)


@pytest.mark.slow
def test_pointrend_beats_its_own_coarse_map_upsampled(make_cfg, tmp_path):
    """End to end, paired: the same trained weights evaluated with PointRend vs bilinear upsampling."""
    out = tmp_path / "run"
    cfg = make_cfg("backbone=pspnet", "head=pointrend", "data.image_size=64", "data.num_train=96",
                   "data.batch_size=16", "trainer.max_epochs=6", "metrics.boundary_tolerance=2",
                   "metrics.boundary_tolerance_unit=pixels", output_dir=out)
    metrics = train(cfg)
    saved = json.loads((out / "results.json").read_text())
    datamodule = build_data(cfg)
    module = build_module(cfg, datamodule)
    module.load_state_dict(torch.load(out / saved["checkpoint"], weights_only=False)["state_dict"])
    module.head = NoHead(datamodule.num_classes)  # the same backbone weights, coarse logits upsampled
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, datamodule=datamodule, verbose=False)
    pointrend, coarse = metrics["test/boundary_f1"], module.test_results["test/boundary_f1"]
    print(f"boundary F1: pointrend {pointrend:.3f} vs coarse upsampled {coarse:.3f}; "
          f"IoU {metrics['test/iou']:.3f} vs {module.test_results['test/iou']:.3f}")
    assert pointrend > coarse + 0.05, (pointrend, coarse)
    assert metrics["test/iou"] >= module.test_results["test/iou"]


def test_default_point_budget_follows_the_papers_stride16_rule_with_a_floor():
    from segrefine.models.pspnet import PSPNet

    head = PointRendHead(3, PSPNet(1, 3).spec())
    assert head.num_subdivision_points((1024, 2048), (512, 1024)) == 1024 * 2048 // 256  # 8192, the paper's scale
    assert head.num_subdivision_points((320, 320), (160, 160)) == 1024  # 400 by the rule, floored
    assert head.num_subdivision_points((64, 64), (16, 16)) == 256  # never more than the map holds
