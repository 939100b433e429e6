"""Metrics against values computed by hand."""

import math

import pytest
import torch

from segrefine.metrics import (
    SegmentationMetrics,
    protocol_metrics,
    tolerance_pixels,
    boundary_counts,
    boundary_f1_from_counts,
    class_boundaries,
    per_image_metrics,
)
from segrefine.types import IGNORE_INDEX as I


def t(rows):
    return torch.tensor(rows)[None]


TARGET = t([[0, 0, 1, 1],
            [0, 0, 1, 1],
            [2, 2, 0, 0],
            [2, 2, 0, I]])
PRED = t([[0, 1, 1, 1],
          [0, 0, 1, 1],
          [2, 0, 0, 0],
          [2, 2, 2, 1]])  # the last pixel is on an ignored target: never scored


def test_iou_dice_pixel_accuracy_by_hand():
    m = per_image_metrics(PRED, TARGET, num_classes=3, boundary_tolerance=2, boundary_tolerance_unit="pixels")
    # class 1: target 4 px, pred 5 scored px (one on ignore not counted), tp 4 -> IoU 4/5, Dice 8/9
    # class 2: target 4 px, pred 4 px, tp 3 -> IoU 3/5, Dice 6/8
    assert m["iou"].item() == pytest.approx((4 / 5 + 3 / 5) / 2)
    assert m["dice"].item() == pytest.approx((8 / 9 + 6 / 8) / 2)
    # 15 scored pixels, wrong at (0,1), (2,1), (3,2) -> 12/15
    assert m["pixel_acc"].item() == pytest.approx(12 / 15)


def test_dataset_metrics_accumulate_pixels_not_images():
    metrics = SegmentationMetrics(num_classes=2)
    perfect = torch.zeros(1, 4, 4, dtype=torch.long)
    perfect[0, :2, :2] = 1
    empty_pred = torch.zeros(1, 4, 4, dtype=torch.long)
    metrics.update(perfect, perfect)        # class 1: tp 4
    metrics.update(empty_pred, perfect)     # class 1: fn 4
    assert metrics.compute()["iou"] == pytest.approx(4 / 8)
    assert metrics.compute()["pixel_acc"] == pytest.approx(28 / 32)


def test_absent_class_is_left_out_and_nothing_to_find_scores_one():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0, 0] = 1
    pred = target.clone()
    m = per_image_metrics(pred, target, num_classes=3)  # class 2 absent from both
    assert m["iou"].item() == 1.0 and m["dice"].item() == 1.0
    background = torch.zeros(1, 4, 4, dtype=torch.long)
    m = per_image_metrics(background, background, num_classes=3)
    assert m["iou"].item() == 1.0 and m["boundary_f1"].item() == 1.0


def test_class_boundaries_are_inner_four_neighbour_edges():
    labels = torch.zeros(1, 5, 5, dtype=torch.long)
    labels[0, 1:4, 1:4] = 1
    b = class_boundaries(labels, 2)[0, 1]
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[1:4, 1:4] = True
    expected[2, 2] = False  # the centre has only class-1 neighbours
    assert torch.equal(b, expected)


def test_image_border_is_not_a_boundary():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :, :2] = 1
    b = class_boundaries(labels, 2)[0, 1]
    assert b.sum() == 4 and b[:, 1].all()  # only the column touching class 0


def test_boundary_f1_with_and_without_tolerance():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, :, :4] = 1           # true class-1 boundary: column 3 (8 px)
    pred = torch.zeros(1, 8, 8, dtype=torch.long)
    pred[0, :, :5] = 1             # predicted boundary: column 4, one pixel off
    exact = boundary_counts(pred, target, 2, tolerance=0, unit="pixels")
    assert exact[0, :, 1].tolist() == [0, 8, 0, 8]
    assert boundary_f1_from_counts(exact)[0, 1].item() == 0.0
    near = boundary_counts(pred, target, 2, tolerance=1, unit="pixels")[0, :, 1]
    assert near.tolist() == [8, 8, 8, 8]
    far = torch.zeros(1, 8, 8, dtype=torch.long)
    far[0, :, :7] = 1              # boundary at column 6: 3 px away
    assert boundary_counts(far, target, 2, tolerance=2, unit="pixels")[0, 0, 1] == 0
    assert boundary_counts(far, target, 2, tolerance=3, unit="pixels")[0, 0, 1] == 8


def test_boundary_f1_partial_match_by_hand():
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[0, 1:5, 1:5] = 1        # 12 boundary px (ring of a 4x4 square)
    pred = torch.zeros(1, 6, 6, dtype=torch.long)
    pred[0, 1:3, 1:3] = 1          # 2x2 square: all 4 of its pixels are boundary
    counts = boundary_counts(pred, target, 2, tolerance=0, unit="pixels")
    # (1,1), (1,2), (2,1) lie on the true ring; (2,2) is inside the true square, not on it.
    # So 3 of 4 predicted px match, and 3 of the 12 true ring px are predicted.
    assert counts[0, :, 1].tolist() == [3, 4, 3, 12]
    precision, recall = 3 / 4, 3 / 12
    assert boundary_f1_from_counts(counts)[0, 1].item() == pytest.approx(2 * precision * recall / (precision + recall))


def test_boundary_on_ignored_pixels_is_not_scored():
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[0, :, 3:] = I
    pred = torch.zeros(1, 6, 6, dtype=torch.long)
    pred[0, :, 4:] = 1             # a class-1 region entirely inside the ignored area
    counts = boundary_counts(pred, target, 2, tolerance=2, unit="pixels")
    assert counts[0, :, 1].tolist() == [0, 0, 0, 0]
    assert math.isnan(boundary_f1_from_counts(counts)[0, 1].item())


def test_missing_prediction_scores_zero_boundary_f1():
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[0, 2:4, 2:4] = 1
    m = per_image_metrics(torch.zeros_like(target), target, num_classes=2)
    assert m["boundary_f1"].item() == 0.0 and m["iou"].item() == 0.0


def test_per_image_rows_match_dataset_metrics_for_one_image():
    metrics = SegmentationMetrics(3, boundary_tolerance=1, boundary_tolerance_unit="pixels")
    metrics.update(PRED, TARGET)
    whole = metrics.compute()
    row = per_image_metrics(PRED, TARGET, 3, boundary_tolerance=1, boundary_tolerance_unit="pixels")
    for name in ("iou", "dice", "pixel_acc", "boundary_f1"):
        assert whole[name] == pytest.approx(row[name].item())


# -- boundary tolerance and ignored pixels ------------------------------------------------


def test_tolerance_is_a_fraction_of_the_diagonal_unless_pixels():
    assert tolerance_pixels(0.0075, "diagonal", 300, 400) == pytest.approx(3.75)  # diagonal 500
    assert tolerance_pixels(2, "pixels", 300, 400) == 2.0
    with pytest.raises(ValueError, match="boundary_tolerance_unit=pixels"):
        tolerance_pixels(2, "diagonal", 64, 64)
    # 8x8 image, column boundaries one pixel apart: 0.0075 of the 11.3 px diagonal is below
    # one pixel (exact matching), 0.1 of it (1.13 px) accepts the one-pixel offset.
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, :, :4] = 1
    pred = torch.zeros(1, 8, 8, dtype=torch.long)
    pred[0, :, :5] = 1
    assert boundary_counts(pred, target, 2)[0, :, 1].tolist() == [0, 8, 0, 8]
    assert boundary_counts(pred, target, 2, tolerance=0.1)[0, :, 1].tolist() == [8, 8, 8, 8]


def test_ignored_pixels_leave_both_boundary_sets_alike():
    # Class 1 on the left, an ignored band in columns 3-4, background right. The prediction
    # puts class 1 everywhere: a predicted boundary can only come from the ignore region, and
    # it is treated exactly as the target's (same edges, none on ignored pixels).
    target = torch.zeros(1, 6, 8, dtype=torch.long)
    target[0, :, :3] = 1
    target[0, :, 3:5] = I
    pred = torch.ones(1, 6, 8, dtype=torch.long)
    counts = boundary_counts(pred, target, 2, tolerance=0, unit="pixels")[0]
    # class 1: predicted at columns 2 and 5 (both beside the band), true at column 2 only
    assert counts[:, 1].tolist() == [6, 12, 6, 6]
    # class 0: the target's column 5; the prediction has no class 0 at all
    assert counts[:, 0].tolist() == [0, 0, 0, 6]
    # swapping prediction and target swaps precision and recall counts
    swapped = boundary_counts(target.clamp(max=1), pred.masked_fill(target == I, I), 2, tolerance=0, unit="pixels")[0]
    assert swapped[:, 0].tolist() == [0, 6, 0, 0]
    assert swapped[:, 1].tolist() == [6, 6, 6, 12]


# -- the unet_crfrnn protocol (hand computed) ----------------------------------------------


def test_unet_crfrnn_protocol_by_hand_two_classes():
    # 4x4; gt foreground 4 px (top-left 2x2); prediction foreground 6 px covering 3 of them.
    gt = torch.zeros(1, 4, 4, dtype=torch.long)
    gt[0, :2, :2] = 1
    pred = torch.zeros(1, 4, 4, dtype=torch.long)
    pred[0, 0, :3] = 1
    pred[0, 1, 0] = 1
    pred[0, 2, :2] = 1
    # fg: tp 3, |pred| 6, |gt| 4 -> IoU 3/7, Dice 7/11; bg: tp 9, |pred| 10, |gt| 12 -> IoU 9/13, Dice 19/23
    out = protocol_metrics(pred, gt, 2)
    assert out["iu"] == pytest.approx((3 / 7 + 9 / 13) / 2)
    assert out["dsc"] == pytest.approx((7 / 11 + 19 / 23) / 2)
    assert out["pa"] == pytest.approx(3 / 4)  # foreground recall, not pixel accuracy (12/16)


def test_unet_crfrnn_empty_prediction_empty_truth_and_all_ignored():
    gt = torch.zeros(3, 4, 4, dtype=torch.long)
    pred = torch.zeros(3, 4, 4, dtype=torch.long)
    gt[0, :2, :2] = 1                 # image 0: foreground missed entirely (empty prediction)
    pred[1, 0, 0] = 1                 # image 1: no foreground in the truth, one false positive
    gt[2] = I                         # image 2: every pixel ignored
    pred[2] = 1
    per_image = {k: [] for k in ("iu", "dsc", "pa")}
    for i in range(3):
        for k, v in protocol_metrics(pred[i : i + 1], gt[i : i + 1], 2).items():
            per_image[k].append(v)
    # 0: bg IoU 12/16, fg 0 (empty prediction) -> 0.375; bg Dice 25/29; PA 0/4
    # 1: bg IoU 15/16, fg 0 (empty truth); bg Dice 31/32; PA 0 (no foreground)
    # 2: nothing scored: both classes empty in the truth -> 0 everywhere
    assert per_image["iu"] == pytest.approx([12 / 16 / 2, 15 / 16 / 2, 0.0])
    assert per_image["dsc"] == pytest.approx([25 / 29 / 2, 31 / 32 / 2, 0.0])
    assert per_image["pa"] == [0.0, 0.0, 0.0]
    together = protocol_metrics(pred, gt, 2)  # averaged over images, the empty one included
    assert together["iu"] == pytest.approx(sum(per_image["iu"]) / 3)


def test_unet_crfrnn_three_classes_and_ignored_prediction_pixels():
    # TARGET/PRED above (C = 3, one ignored target pixel whose prediction is not scored).
    # bg: gt 7, pred 6, tp 5 -> IoU 5/8, Dice 11/14; c1: gt 4, pred 5, tp 4 -> 4/5, 9/10;
    # c2: gt 4, pred 4, tp 3 -> 3/5, 7/9. PA = (4 + 3) / 8.
    out = protocol_metrics(PRED, TARGET, 3)
    assert out["iu"] == pytest.approx((5 / 8 + 4 / 5 + 3 / 5) / 3)
    assert out["dsc"] == pytest.approx((11 / 14 + 9 / 10 + 7 / 9) / 3)
    assert out["pa"] == pytest.approx(7 / 8)
    row = per_image_metrics(PRED, TARGET, 3)
    assert row["unet_crfrnn/iu"].item() == pytest.approx(out["iu"])


def test_protocol_metrics_refuses_bad_input():
    with pytest.raises(ValueError, match="protocol"):
        protocol_metrics(PRED, TARGET, 3, protocol="voc")
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        protocol_metrics(PRED[0], TARGET[0], 3)


def test_the_old_top_level_tolerance_key_is_refused_with_its_new_place(make_cfg):
    from segrefine.build import check_metrics_config

    check_metrics_config(make_cfg())  # the default composes
    with pytest.raises(ValueError, match="metrics.boundary_tolerance"):
        check_metrics_config(make_cfg("+boundary_tolerance=2"))
    cfg = make_cfg("metrics=unet_crfrnn")
    assert cfg.metrics.protocol == "unet_crfrnn" and cfg.metrics.boundary_tolerance == 0.0075
    with pytest.raises(ValueError, match=r"metrics.protocol=.voc. must be one of"):
        check_metrics_config(make_cfg("metrics.protocol=voc"))
