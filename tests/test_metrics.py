"""Metrics against values computed by hand."""

import math

import pytest
import torch

from segrefine.metrics import (
    SegmentationMetrics,
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
    m = per_image_metrics(PRED, TARGET, num_classes=3, boundary_tolerance=2)
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
    exact = boundary_counts(pred, target, 2, tolerance=0)
    assert exact[0, :, 1].tolist() == [0, 8, 0, 8]
    assert boundary_f1_from_counts(exact)[0, 1].item() == 0.0
    near = boundary_counts(pred, target, 2, tolerance=1)[0, :, 1]
    assert near.tolist() == [8, 8, 8, 8]
    far = torch.zeros(1, 8, 8, dtype=torch.long)
    far[0, :, :7] = 1              # boundary at column 6: 3 px away
    assert boundary_counts(far, target, 2, tolerance=2)[0, 0, 1] == 0
    assert boundary_counts(far, target, 2, tolerance=3)[0, 0, 1] == 8


def test_boundary_f1_partial_match_by_hand():
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[0, 1:5, 1:5] = 1        # 12 boundary px (ring of a 4x4 square)
    pred = torch.zeros(1, 6, 6, dtype=torch.long)
    pred[0, 1:3, 1:3] = 1          # 2x2 square: all 4 of its pixels are boundary
    counts = boundary_counts(pred, target, 2, tolerance=0)
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
    counts = boundary_counts(pred, target, 2, tolerance=2)
    assert counts[0, :, 1].tolist() == [0, 0, 0, 0]
    assert math.isnan(boundary_f1_from_counts(counts)[0, 1].item())


def test_missing_prediction_scores_zero_boundary_f1():
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[0, 2:4, 2:4] = 1
    m = per_image_metrics(torch.zeros_like(target), target, num_classes=2)
    assert m["boundary_f1"].item() == 0.0 and m["iou"].item() == 0.0


def test_per_image_rows_match_dataset_metrics_for_one_image():
    metrics = SegmentationMetrics(3, boundary_tolerance=1)
    metrics.update(PRED, TARGET)
    whole = metrics.compute()
    row = per_image_metrics(PRED, TARGET, 3, boundary_tolerance=1)
    for name in ("iou", "dice", "pixel_acc", "boundary_f1"):
        assert whole[name] == pytest.approx(row[name].item())
