"""segrefine.metrics.volume_metrics: per-volume Dice, IoU, NSD and HD95 in mm, checked against
hand counts (cubes) and a brute-force computation that shares no code with it (spheres)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segrefine.metrics import volume_dice, volume_means, volume_metrics, volume_row


def cube(shape, lo, hi):
    mask = np.zeros(shape, np.uint8)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
    return mask


def brute_surface(mask):
    """Voxels with at least one of their 6 neighbours outside the mask (or outside the volume)."""
    padded = np.pad(mask, 1)
    core = padded[1:-1, 1:-1, 1:-1]
    inside = np.ones_like(mask, dtype=bool)
    for axis in range(3):
        for step in (-1, 1):
            inside &= np.roll(padded, step, axis)[1:-1, 1:-1, 1:-1].astype(bool)
    return core.astype(bool) & ~inside


def brute_metrics(pred, target, spacing, tolerance):
    """Dice, NSD and HD95 of one class by explicit pairwise distances between surface voxels."""
    p, t = pred.astype(bool), target.astype(bool)
    sp, st = (np.argwhere(brute_surface(m)) * np.asarray(spacing) for m in (p, t))
    pairwise = np.sqrt(((sp[:, None, :] - st[None, :, :]) ** 2).sum(-1))
    to_t, to_p = pairwise.min(1), pairwise.min(0)
    nsd = ((to_t <= tolerance).sum() + (to_p <= tolerance).sum()) / (len(to_t) + len(to_p))
    hd95 = max(np.percentile(to_t, 95), np.percentile(to_p, 95))
    dice = 2 * (p & t).sum() / (p.sum() + t.sum())
    return dice, nsd, hd95


def test_cube_shifted_one_slice_counted_by_hand():
    # 4^3 cubes, the truth one voxel further along D. Each cube has 56 surface voxels. With
    # sz = 2 mm the prediction's first layer (16 voxels) lies 2 mm from the truth's surface; the
    # 4 inner voxels of its last layer lie 1 mm (one in-plane voxel) from the truth's ring; the
    # rest touch it. Symmetric for the truth. Overlap 48 voxels.
    pred, target = cube((10, 10, 10), (2, 2, 2), (6, 6, 6)), cube((10, 10, 10), (3, 2, 2), (7, 6, 6))
    values = volume_metrics(pred, target, (2.0, 1.0, 1.0), num_classes=2, nsd_tolerance_mm=1.0)
    assert values["dice"][0] == pytest.approx(96 / 128)
    assert values["iou"][0] == pytest.approx(48 / 80)
    assert values["nsd"][0] == pytest.approx(80 / 112)  # (40 + 40) of 56 + 56 within 1 mm
    assert values["hd95"][0] == pytest.approx(2.0)  # 16 of 56 sorted distances are 2 mm: p95 = 2
    # Isotropic 1 mm: the shifted layer is 1 mm away, within the tolerance.
    iso = volume_metrics(pred, target, (1.0, 1.0, 1.0), num_classes=2, nsd_tolerance_mm=1.0)
    assert iso["nsd"][0] == pytest.approx(1.0) and iso["hd95"][0] == pytest.approx(1.0)


def test_identical_missed_and_absent_classes():
    target = cube((6, 8, 8), (1, 1, 1), (4, 5, 5)) + 2 * cube((6, 8, 8), (4, 5, 5), (6, 8, 8))
    same = volume_metrics(target, target, (1, 1, 1), num_classes=4)
    assert same["dice"][:2].tolist() == [1.0, 1.0] and same["nsd"][:2].tolist() == [1.0, 1.0]
    assert same["hd95"][:2].tolist() == [0.0, 0.0]
    assert all(math.isnan(same[k][2]) for k in same)  # class 3 in neither: NaN
    missed = volume_metrics(np.where(target == 2, 0, target), target, (1, 1, 1), num_classes=3)
    assert missed["dice"][1] == 0 and missed["iou"][1] == 0 and missed["nsd"][1] == 0
    assert missed["hd95"][1] == math.inf  # never a distance that looks good
    hallucinated = volume_metrics(target, np.where(target == 2, 0, target), (1, 1, 1), num_classes=3)
    assert hallucinated["nsd"][1] == 0 and hallucinated["hd95"][1] == math.inf
    row = volume_row("s1", 6, missed, ["background", "a", "b"])
    assert row["dice"] == pytest.approx(0.5) and row["hd95"] == math.inf and row["nsd/b"] == 0.0
    assert row["subject"] == "s1" and row["n_slices"] == 6 and row["dice/a"] == 1.0
    assert row["infinite"] == ["hd95", "hd95/b"]  # null in results.json, but named as infinite


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.7, 1.1)])
def test_spheres_against_brute_force_distances(spacing):
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in (14, 16, 15)), indexing="ij"), -1).astype(float)
    distance = lambda centre: np.sqrt((((grid - centre) * np.asarray(spacing)) ** 2).sum(-1))  # noqa: E731
    target = (distance((7, 8, 7)) <= 5.0).astype(np.uint8)
    pred = (distance((7.6, 7.2, 7.4)) <= 4.2).astype(np.uint8)
    for tolerance in (0.5, 1.0, 2.0):
        values = volume_metrics(pred, target, spacing, num_classes=2, nsd_tolerance_mm=tolerance)
        dice, nsd, hd95 = brute_metrics(pred, target, spacing, tolerance)
        assert values["dice"][0] == pytest.approx(dice)
        assert values["nsd"][0] == pytest.approx(nsd)
        assert values["hd95"][0] == pytest.approx(hd95)
    assert 0 < values["nsd"][0] < 1 and values["hd95"][0] > 0  # a case that discriminates


def test_ignored_voxels_and_bad_arguments():
    target = cube((5, 6, 6), (1, 1, 1), (4, 4, 4))
    pred = target.copy()
    pred[0] = 1  # wrong, but only where the truth is ignored
    target_ignored = target.copy()
    target_ignored[0] = 255
    values = volume_metrics(pred, target_ignored, (1, 1, 1), num_classes=2)
    assert values["dice"][0] == 1.0 and values["hd95"][0] == 0.0
    with pytest.raises(ValueError, match="spacing"):
        volume_metrics(pred, target, (1, 0, 1), num_classes=2)
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        volume_metrics(pred[0], target[0], (1, 1, 1), num_classes=2)


def test_means_over_subjects_leave_absent_out_and_keep_inf():
    rows = [{"subject": "a", "n_slices": 3, "dice": 0.5, "hd95": 2.0},
            {"subject": "b", "n_slices": 3, "dice": math.nan, "hd95": math.nan},
            {"subject": "c", "n_slices": 3, "dice": 0.7, "hd95": 4.0}]
    means = volume_means(rows)
    assert means["volume/dice"] == pytest.approx(0.6) and means["volume/hd95"] == pytest.approx(3.0)
    assert volume_means(rows)["volume/subjects_hd95_infinite"] == 0
    rows[2]["hd95"] = math.inf
    assert volume_means(rows)["volume/hd95"] == math.inf
    assert volume_means(rows)["volume/subjects_hd95_infinite"] == 1


def test_volume_dice_is_the_rows_dice_without_the_distances():
    # Class 1: a 4x4x4 cube against the same cube shifted by one voxel (overlap 3x4x4 = 48):
    # Dice 2*48/128 = 0.75. Class 2 predicted where absent: Dice 0. Class 3 absent in both:
    # left out. Voxels marked 255 in the truth count for neither.
    truth = cube((8, 8, 8), (0, 0, 0), (4, 4, 4))
    pred = cube((8, 8, 8), (1, 0, 0), (5, 4, 4))
    pred[7, 7, 7] = 2
    truth[6, 6, 6] = 255
    pred[6, 6, 6] = 1
    assert volume_dice(pred, truth, num_classes=4) == pytest.approx((0.75 + 0.0) / 2)
    row = volume_row("s", 8, volume_metrics(pred, truth, (1.0, 1.0, 1.0), 4), ["bg", "a", "b", "c"])
    assert volume_dice(pred, truth, num_classes=4) == pytest.approx(row["dice"])
    assert math.isnan(volume_dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), num_classes=3))
