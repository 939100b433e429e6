"""The origin study as it ran: its schedule, its vanilla U-Net, its binary protocol, its table.

Values are computed by hand or by an independent transcription of the origin's own code
(EsmeYi/UNet-CRF-RNN: train.py, Models/VanillaUnet.py, utils.py).
"""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stdout
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from segrefine.metrics import merge_foreground, merged_confusion, per_image_metrics, protocol_metrics
from segrefine.types import IGNORE_INDEX as I


# -- the schedule: x0.9 after every epoch (tf.train.exponential_decay, staircase=True) ---------


def rates_at(module, steps: list[int]) -> dict[int, float]:
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    rates, step = {}, 0
    for target in steps:
        while step < target:
            optimizer.step()
            scheduler.step()
            step += 1
        rates[target] = optimizer.param_groups[0]["lr"]
    return rates


def test_staircase_schedule_of_the_origin_table_by_hand(make_cfg):
    from hydra.utils import instantiate

    from segrefine.module import SegmentationModule

    cfg = make_cfg("experiment=unet_crfrnn_table")
    assert cfg.optim.scheduler.gamma == 0.9 and cfg.optim.scheduler.step_size is None
    module = SegmentationModule(torch.nn.Conv2d(1, 2, 1), torch.nn.Identity(), 2, ["bg", "fg"],
                                optimizer=instantiate(cfg.optim.optimizer), scheduler=instantiate(cfg.optim.scheduler))
    # preset=full: 80 epochs of 10 steps; step_size null = one epoch = 800 / 80 = 10 steps.
    module.trainer = SimpleNamespace(max_epochs=80, estimated_stepping_batches=800)
    rates = rates_at(module, [0, 9, 10, 800])
    assert rates[0] == pytest.approx(1e-3)
    assert rates[9] == pytest.approx(1e-3)                       # still the first epoch
    assert rates[10] == pytest.approx(0.9e-3)                    # one decay after 10 steps
    assert rates[800] == pytest.approx(1e-3 * 0.9**80, rel=1e-9)  # 80 decays: ~2.2e-4 of the rate left
    assert rates[800] / 1e-3 == pytest.approx(2.18e-4, rel=1e-2)
    # An epoch length the trainer cannot give is refused by name.
    module.trainer = SimpleNamespace(max_epochs=-1, estimated_stepping_batches=float("inf"))
    with pytest.raises(ValueError, match="optim.scheduler.step_size"):
        module.configure_optimizers()


def test_paper_table_keeps_poly_and_the_experiment_shows_its_protocol(make_cfg):
    assert make_cfg("experiment=paper_table", "preset=full").optim.scheduler.power == 0.9
    cfg = make_cfg("experiment=unet_crfrnn_table")
    assert cfg.metrics.protocol == "unet_crfrnn" and cfg.metrics.merge_foreground is True
    assert make_cfg().metrics.merge_foreground is False and make_cfg("metrics=unet_crfrnn").metrics.merge_foreground is False
    from segrefine.build import check_metrics_config

    with pytest.raises(ValueError, match="metrics.merge_foreground='yes' must be true or false"):
        check_metrics_config(make_cfg("metrics.merge_foreground=yes"))


# -- the vanilla U-Net -------------------------------------------------------------------------


def test_vanilla_unet_has_the_origin_parameter_count():
    from segrefine.models.unet import UNet

    # Models/VanillaUnet.py at 3 channels in, 2 classes; a 3x3 conv has 9*in*out + out parameters.
    #   down: 3->32 (896) 32->32 (9,248) | 32->64 (18,496) 64->64 (36,928) | 64->128 (73,856)
    #         128->128 (147,584) | 128->256 (295,168) 256->256 (590,080) | 256->512 (1,180,160)
    #         512->512 (2,359,808)
    #   up:   512+256->256 (1,769,728) 256->256 (590,080) | 256+128->128 (442,496) 128->128 (147,584)
    #         128+64->64 (110,656) 64->64 (36,928) | 64+32->32 (27,680) 32->32 (9,248)
    #   1x1 classifier 32->2: 66
    # sum: 7,846,690 (no batch norm, no learned upsampling)
    net = UNet(3, 2, variant="vanilla")
    assert sum(p.numel() for p in net.parameters()) == 7_846_690
    assert not any(isinstance(m, torch.nn.BatchNorm2d | torch.nn.ConvTranspose2d) for m in net.modules())
    assert (net.required_divisor, net.feature_channels) == (16, (32, 64, 128, 256, 512))
    # The CRF-U-Net's widths (64-1024): every weight count scales by 4 except the first conv's input and the classifier.
    wide = UNet(3, 2, variant="vanilla", base_width=64)
    assert wide.feature_channels == (64, 128, 256, 512, 1024)


def test_vanilla_unet_refuses_keys_of_the_other_variant():
    from segrefine.models.unet import UNet

    with pytest.raises(ValueError, match=r"backbone.encoder_name='resnet18'.*leave these null"):
        UNet(3, 2, variant="vanilla", encoder_name="resnet18")
    with pytest.raises(ValueError, match=r"backbone.base_width=32 is a key of backbone.variant=vanilla"):
        UNet(3, 2, base_width=32)
    with pytest.raises(ValueError, match="backbone.variant='tiny'"):
        UNet(3, 2, variant="tiny")


def test_vanilla_unet_stops_its_decoder_at_a_coarse_stride():
    from segrefine.models.unet import UNet

    net = UNet(1, 3, variant="vanilla", base_width=4, output_stride=4)
    out = net(torch.zeros(1, 1, 32, 48))
    assert out.logits.shape == (1, 3, 8, 12) and out.stride == 4


@pytest.mark.slow  # ~10 s; the contract matrix builds and runs FCN-8s on VGG-16 in the default suite
def test_fcn8s_on_vgg16_trains(make_cfg):
    from segrefine.build import build_component

    cfg = make_cfg("backbone=fcn", "backbone.variant=8s", "backbone.encoder_name=vgg16")
    assert cfg.backbone.encoder_weights is None  # no download: random VGG-16 weights unless asked
    torch.manual_seed(0)
    net = build_component(cfg.backbone, in_channels=1, num_classes=2)
    mask = torch.zeros(2, 64, 64, dtype=torch.long)
    mask[0, 8:40, 16:48], mask[1, 24:56, 4:36] = 1, 1   # bright squares on noise
    image = (mask[:, None].float() + 0.1 * torch.randn(2, 1, 64, 64))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    losses = []
    for _ in range(6):
        logits = torch.nn.functional.interpolate(net(image).logits, size=(64, 64), mode="bilinear")
        loss = torch.nn.functional.cross_entropy(logits, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]  # 0.69 -> 0.59 with this seed


# -- the binary protocol against a transcription of the origin's utils.py ---------------------


def origin_scores(pred: np.ndarray, gt_labels: np.ndarray) -> tuple[float, float, float]:
    """utils.py's mean_IU, dice_coef_2 and pixel_accuracy, transcribed: cl = [0, 1] hard-coded,
    the ground truth one-hot (H, W, 2) as its loader makes it, n_cl_gt = number of distinct
    values in that one-hot array."""
    gt = np.stack([gt_labels == 0, gt_labels == 1], axis=-1).astype(float)
    n_cl_gt = len(np.unique(gt))
    ev = np.stack([pred == 0, pred == 1], axis=-1).astype(float)
    iu, dice = [0.0, 0.0], [0.0, 0.0]
    for i in range(2):
        e, g = ev[:, :, i], gt[:, :, i]
        if e.sum() == 0 or g.sum() == 0:
            continue
        n_ii = np.logical_and(e, g).sum()
        iu[i] = n_ii / (g.sum() + e.sum() - n_ii)
        dice[i] = (2.0 * (e.flatten() * g.flatten()).sum() + 1.0) / (e.sum() + g.sum() + 1.0)
    n_ii = np.logical_and(ev[:, :, 1], gt[:, :, 1]).sum()
    t_i = gt[:, :, 1].sum()
    pa = 0.0 if t_i == 0 else float(n_ii) / float(t_i)
    return sum(iu) / n_cl_gt, sum(dice) / n_cl_gt, pa


def test_merged_protocol_equals_the_origin_on_three_class_masks():
    generator = torch.Generator().manual_seed(3)
    masks = torch.randint(0, 3, (6, 12, 10), generator=generator)
    preds = torch.randint(0, 3, (6, 12, 10), generator=generator)
    masks[1] = 0                      # no foreground in the truth
    preds[2] = 0                      # nothing predicted
    preds[3] = masks[3]               # perfect
    masks[4] = torch.where(masks[4] > 0, 2, 0)  # only class 2: the origin's class 1 would be empty
    expected = np.array([origin_scores((p > 0).numpy(), (m > 0).numpy()) for p, m in zip(preds, masks)])
    out = protocol_metrics(preds, masks, 3, merge_foreground=True)
    assert [out["iu"], out["dsc"], out["pa"]] == pytest.approx(expected.mean(0).tolist())
    rows = per_image_metrics(preds, masks, 3, merge_foreground=True)
    assert rows["unet_crfrnn/iu"].tolist() == pytest.approx(expected[:, 0].tolist())
    # The standard numbers never merge.
    assert rows["iou"].tolist() == pytest.approx(per_image_metrics(preds, masks, 3)["iou"].tolist())


def test_merging_the_foreground_scores_a_perfect_prediction_1_and_ignored_pixels_stay_ignored():
    # Class 2 the only foreground, predicted perfectly: over C = 3 the empty class 1 scores 0.
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    mask[0, :2, :2] = 2
    assert protocol_metrics(mask, mask, 3) == pytest.approx({"iu": 2 / 3, "dsc": 2 / 3, "pa": 1.0})
    assert protocol_metrics(mask, mask, 3, merge_foreground=True) == pytest.approx({"iu": 1.0, "dsc": 1.0, "pa": 1.0})
    # utils.py itself on these 3-class labels (cl = [0, 1]): class 1 empty, no foreground recall.
    assert origin_scores(mask[0].numpy(), mask[0].numpy()) == pytest.approx((0.5, 0.5, 0.0))
    # Ignored pixels: never foreground, never scored, whatever is predicted there.
    ignored = mask.clone()
    ignored[0, 3, :] = I
    assert merge_foreground(ignored)[0, 3].tolist() == [I] * 4
    pred = mask.clone()
    pred[0, 3, :] = 1                # wrong only where ignored
    assert protocol_metrics(pred, ignored, 3, merge_foreground=True) == pytest.approx({"iu": 1.0, "dsc": 1.0, "pa": 1.0})
    pred[0, 2, 0] = 1                # one background pixel called foreground: bg 7/8, fg 4/5 by hand
    out = protocol_metrics(pred, ignored, 3, merge_foreground=True)
    assert out["iu"] == pytest.approx((7 / 8 + 4 / 5) / 2)
    assert out["dsc"] == pytest.approx(((2 * 7 + 1) / (8 + 7 + 1) + (2 * 4 + 1) / (5 + 4 + 1)) / 2)
    with pytest.raises(ValueError, match="merge_foreground=True is part of the unet_crfrnn protocol"):
        protocol_metrics(pred, ignored, 3, protocol="standard", merge_foreground=True)


def test_the_merged_confusion_is_the_confusion_of_the_merged_labels():
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    generator = torch.Generator().manual_seed(3)
    preds = torch.randint(0, 4, (5, 9, 7), generator=generator)
    masks = torch.randint(0, 4, (5, 9, 7), generator=generator)
    masks[torch.rand(masks.shape, generator=generator) < 0.25] = I
    masks[1][masks[1] != I] = 0       # no foreground in the truth
    preds[2] = 0                      # nothing predicted

    def confusion(p, m, classes):
        return torch.stack([multiclass_confusion_matrix(a, b, classes, ignore_index=I) for a, b in zip(p, m)])

    merged = merged_confusion(confusion(preds, masks, 4))
    assert torch.equal(merged, confusion(merge_foreground(preds), merge_foreground(masks), 2))
    # Image 1 by hand: every scored pixel is background in the truth.
    scored = masks[1] != I
    assert merged[1].tolist() == [[int((scored & (preds[1] == 0)).sum()), int((scored & (preds[1] > 0)).sum())], [0, 0]]


# -- the table's plan ------------------------------------------------------------------------------


def test_plan_only_shows_the_three_blocks_and_an_extrapolated_full_run(monkeypatch, tmp_path):
    from segrefine.study import origin

    monkeypatch.setattr(sys, "argv", ["run.py", "--plan-only", "--out", str(tmp_path / "study")])
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert origin.main() == 0
    text = printed.getvalue()
    for line in ("| (a) | crfunet-crfrnn-s0 | train |", "| (a) | fcn-none-s0 | train |",
                 "| (b) | unet-crfrnn-s0 | train | 0 | unet-none-continued-s0 |", "| (c) | published:"):
        assert line in text
    # The full preset's plan: 6 trainings, 2 tunings, 4 evaluations per seed, and its time labelled.
    assert "preset=full: 12 jobs (train 6, tune 2, eval 4)" in text
    assert "EXTRAPOLATION, not a measurement" in text
    assert not (tmp_path / "study" / "train").exists()
