"""Segmentation metrics: IoU, Dice, pixel accuracy (from torchmetrics' confusion
matrix) and boundary F1 (not in torchmetrics, implemented here).

Conventions, shared by the dataset-level metrics and the per-image rows:
- IoU and Dice are averaged over the foreground classes 1..C-1 (class 0 is background).
  A class that appears neither in the target nor in the prediction is left out of the
  mean; if every class is left out (nothing to find, nothing predicted) the score is 1.
- Pixels whose target is ``ignore_index`` are never scored.
- Boundary F1 (Csurka et al. 2013, "BF score"): per class, the boundary pixels of the
  predicted and true class masks; a predicted boundary pixel is correct if a true one
  lies within the tolerance (Euclidean), and vice versa for recall. The tolerance is a
  fraction of the image diagonal (0.75 % by default, as Csurka et al.) or, with
  ``unit="pixels"``, a distance in pixels. Ignored target pixels are treated the same way
  in both maps: the prediction takes the ignore label there before boundaries are found,
  and boundary pixels on ignored pixels belong to neither set.

Metric protocols (``PROTOCOLS``): ``standard`` is the above (pooled over the split, plus the
mean over images of the same per-image values); ``unet_crfrnn`` is the evaluation of the
U-Net + CRF-RNN study segrefine grew out of, generalised to C classes, see
``protocol_per_image``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.functional.classification import multiclass_confusion_matrix

from segrefine.record.protocols import DEFINITIONS
from segrefine.types import IGNORE_INDEX

METRIC_NAMES = ("iou", "dice", "pixel_acc", "boundary_f1")
PROTOCOL_NAMES = ("iu", "dsc", "pa")
# Plain-words definitions, recorded in every results.json next to the numbers (one registry:
# segrefine.record.protocols, torch-free, beside the report's columns).
PROTOCOLS = DEFINITIONS


def per_class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """IoU per class from a ``(..., C, C)`` confusion matrix (rows = target); NaN where the class is absent."""
    confusion = confusion.double()
    tp = confusion.diagonal(dim1=-2, dim2=-1)
    union = confusion.sum(-1) + confusion.sum(-2) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))


def per_class_dice(confusion: torch.Tensor) -> torch.Tensor:
    """Dice (= pixel F1) per class; NaN where the class is absent from target and prediction."""
    confusion = confusion.double()
    tp = confusion.diagonal(dim1=-2, dim2=-1)
    denom = confusion.sum(-1) + confusion.sum(-2)
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.full_like(tp, math.nan))


def pixel_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    confusion = confusion.double()
    total = confusion.sum((-2, -1))
    correct = confusion.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.where(total > 0, correct / total.clamp(min=1), torch.ones_like(total))


def foreground_mean(per_class: torch.Tensor) -> torch.Tensor:
    """Mean over classes 1..C-1 ignoring NaN; 1 where every foreground class is absent."""
    fg = per_class[..., 1:]
    present = ~torch.isnan(fg)
    count = present.sum(-1)
    total = torch.where(present, fg, torch.zeros_like(fg)).sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.ones_like(total))


def _disk(radius: float, device: torch.device) -> torch.Tensor:
    """Pixels within Euclidean distance ``radius`` of the centre (a single pixel below 1)."""
    half = int(math.floor(radius))
    r = torch.arange(-half, half + 1, device=device, dtype=torch.float32)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2 + 1e-6).float()


TOLERANCE_UNITS = ("diagonal", "pixels")


def tolerance_pixels(tolerance: float, unit: str, height: int, width: int) -> float:
    """The boundary matching distance in pixels: a fraction of the diagonal, or pixels as given."""
    if unit not in TOLERANCE_UNITS:
        raise ValueError(f"metrics.boundary_tolerance_unit={unit!r} must be one of {TOLERANCE_UNITS}")
    if tolerance < 0 or (unit == "diagonal" and tolerance >= 1):
        raise ValueError(
            f"metrics.boundary_tolerance={tolerance} with unit {unit!r}: a fraction of the diagonal is in [0, 1) "
            "(0.0075 = 0.75 %); for pixels set metrics.boundary_tolerance_unit=pixels"
        )
    return tolerance * math.hypot(height, width) if unit == "diagonal" else float(tolerance)


def class_boundaries(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, C, H, W)`` bool: pixels of class c with a 4-neighbour of another label.

    The image border is not a boundary (pixels outside the image count as the same label).
    """
    padded = F.pad(labels[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0]
    centre = padded[:, 1:-1, 1:-1]
    differs = (
        (padded[:, :-2, 1:-1] != centre)
        | (padded[:, 2:, 1:-1] != centre)
        | (padded[:, 1:-1, :-2] != centre)
        | (padded[:, 1:-1, 2:] != centre)
    )
    classes = torch.arange(num_classes, device=labels.device)[None, :, None, None]
    return (labels[:, None] == classes) & differs[:, None]


def boundary_counts(
    preds: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    tolerance: float = 0.0075,
    ignore_index: int = IGNORE_INDEX,
    unit: str = "diagonal",
) -> torch.Tensor:
    """Per image and class: ``(B, 4, C)`` = matched predicted, predicted, matched true, true boundary pixels."""
    valid = target != ignore_index
    # Same ignore region in both maps, so neither side gains or loses boundaries there.
    preds = torch.where(valid, preds, torch.full_like(preds, ignore_index))
    pred_b = class_boundaries(preds, num_classes) & valid[:, None]
    true_b = class_boundaries(target, num_classes) & valid[:, None]
    radius = tolerance_pixels(tolerance, unit, *preds.shape[-2:])
    if radius >= 1:
        kernel = _disk(radius, preds.device)
        pad = kernel.shape[-1] // 2
        kernel = kernel[None, None].expand(num_classes, 1, -1, -1)

        def near(b: torch.Tensor) -> torch.Tensor:
            return F.conv2d(b.float(), kernel, padding=pad, groups=num_classes) > 0.5

        near_true, near_pred = near(true_b), near(pred_b)
    else:
        near_true, near_pred = true_b, pred_b
    return torch.stack(
        [
            (pred_b & near_true).sum((-2, -1)),
            pred_b.sum((-2, -1)),
            (true_b & near_pred).sum((-2, -1)),
            true_b.sum((-2, -1)),
        ],
        dim=1,
    )


def boundary_f1_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Per-class F1 from ``(..., 4, C)`` counts; NaN where neither side has a boundary of that class."""
    counts = counts.double()
    matched_pred, n_pred, matched_true, n_true = counts.unbind(-2)
    precision = matched_pred / n_pred.clamp(min=1)
    recall = matched_true / n_true.clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)
    f1 = torch.where((n_pred == 0) | (n_true == 0), torch.zeros_like(f1), f1)
    return torch.where((n_pred == 0) & (n_true == 0), torch.full_like(f1, math.nan), f1)


class BoundaryF1(Metric):
    """Dataset-level boundary F1: boundary counts summed over images, then F1 per class."""

    full_state_update = False

    def __init__(self, num_classes: int, tolerance: float = 0.0075, ignore_index: int = IGNORE_INDEX,
                 unit: str = "diagonal"):
        super().__init__()
        self.num_classes, self.tolerance, self.ignore_index, self.unit = num_classes, tolerance, ignore_index, unit
        self.add_state("counts", default=torch.zeros(4, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        counts = boundary_counts(preds, target, self.num_classes, self.tolerance, self.ignore_index, self.unit)
        self.counts += counts.sum(0)

    def compute(self) -> torch.Tensor:
        return boundary_f1_from_counts(self.counts)


class SegmentationMetrics(torch.nn.Module):
    """Accumulates one split's metrics; ``compute()`` gives the metric names without the split prefix."""

    def __init__(self, num_classes: int, class_names: list[str] | None = None, boundary_tolerance: float = 0.0075,
                 boundary_tolerance_unit: str = "diagonal"):
        super().__init__()
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
        self.confusion = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX)
        self.boundary = BoundaryF1(num_classes, boundary_tolerance, unit=boundary_tolerance_unit)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.confusion.update(preds, target)
        self.boundary.update(preds, target)

    def compute(self) -> dict[str, float]:
        cm = self.confusion.compute()
        iou, dice = per_class_iou(cm), per_class_dice(cm)
        bf1 = self.boundary.compute()
        out = {
            "iou": foreground_mean(iou).item(),
            "dice": foreground_mean(dice).item(),
            "pixel_acc": pixel_accuracy(cm).item(),
            "boundary_f1": foreground_mean(bf1).item(),
        }
        for c in range(1, self.num_classes):
            name = self.class_names[c]
            out[f"iou_{name}"] = iou[c].item()
            out[f"dice_{name}"] = dice[c].item()
        return out

    def reset(self) -> None:
        self.confusion.reset()
        self.boundary.reset()


def _confusions(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, C, C)`` per-image confusion matrices (rows = target), ignored pixels left out."""
    return torch.stack(
        [
            multiclass_confusion_matrix(p, t, num_classes, ignore_index=IGNORE_INDEX, validate_args=False)
            for p, t in zip(preds, target)
        ]
    )


def protocol_per_image(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``unet_crfrnn`` protocol per image from ``(B, C, C)`` confusion matrices: ``{iu, dsc, pa}``.

    Over all C classes including background: IoU_c = TP/(TP+FP+FN), Dice_c =
    (2TP+1)/(|pred_c|+|gt_c|+1), both 0 when class c is empty in the prediction or the
    ground truth; IU and DSC are their means over the C classes. PA is foreground recall
    sum_{c>0} TP_c / sum_{c>0} |gt_c| (0 when the image has no foreground pixel).
    """
    confusion = confusion.double()
    tp = confusion.diagonal(dim1=-2, dim2=-1)
    gt, pred = confusion.sum(-1), confusion.sum(-2)
    both = (gt > 0) & (pred > 0)
    iou = torch.where(both, tp / (gt + pred - tp).clamp(min=1), torch.zeros_like(tp))
    dice = torch.where(both, (2 * tp + 1) / (gt + pred + 1), torch.zeros_like(tp))
    fg_gt, fg_tp = gt[..., 1:].sum(-1), tp[..., 1:].sum(-1)
    return {
        "iu": iou.mean(-1),
        "dsc": dice.mean(-1),
        "pa": torch.where(fg_gt > 0, fg_tp / fg_gt.clamp(min=1), torch.zeros_like(fg_gt)),
    }


# -- the origin's binary foreground (metrics.merge_foreground) --------------------------------

# Recorded after the unet_crfrnn definition in results.json when metrics.merge_foreground is on.
MERGED_FOREGROUND = (
    "Foreground merged (metrics.merge_foreground=true): every class > 0 counts as the one foreground class, "
    "so C = 2 (background, foreground) as on the origin's binary masks; ignored (255) pixels stay ignored."
)


def merge_foreground(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Label maps with every class > 0 as class 1 (the origin's binary foreground); ``ignore_index`` kept."""
    labels = labels.long()
    return torch.where(labels == ignore_index, labels, (labels > 0).long())


def merged_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """``(..., 2, 2)`` confusion of background and the merged foreground from ``(..., C, C)`` ones
    (rows = target): the block sums over classes 0 and 1..C-1, exactly the confusion of the
    ``merge_foreground`` label maps (the same pixels are ignored: only the target's ignore label)."""
    rows = torch.stack([confusion[..., 0, :], confusion[..., 1:, :].sum(-2)], -2)
    return torch.stack([rows[..., 0], rows[..., 1:].sum(-1)], -1)


def unet_crfrnn_per_image(preds: torch.Tensor, target: torch.Tensor, num_classes: int,
                          merge: bool = False) -> dict[str, torch.Tensor]:
    """The ``unet_crfrnn`` protocol per image of ``(B, H, W)`` label maps, over the C classes or,
    with ``merge``, over background and the merged foreground (``merged_confusion``)."""
    confusion = _confusions(preds, target, num_classes)
    return protocol_per_image(merged_confusion(confusion) if merge else confusion)


def protocol_metrics(
    preds: torch.Tensor, masks: torch.Tensor, num_classes: int, protocol: str = "unet_crfrnn",
    merge_foreground: bool = False,
) -> dict[str, float]:
    """A split's metrics under a protocol, for scripts and notebooks.

    ``preds``/``masks``: ``(N, H, W)`` integer label maps, 255 ignored. ``unet_crfrnn`` gives
    ``{"iu", "dsc", "pa"}`` averaged over images (values in [0, 1]); with ``merge_foreground``
    every label > 0 is the single foreground class first, as the origin scored its binary
    masks. ``standard`` gives the pooled ``{"iou", "dice", "pixel_acc", "boundary_f1"}``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} must be one of {tuple(PROTOCOLS)}")
    if preds.shape != masks.shape or preds.dim() != 3:
        raise ValueError(f"preds {tuple(preds.shape)} and masks {tuple(masks.shape)} must both be (N, H, W)")
    preds, masks = preds.long(), masks.long()
    if protocol == "standard":
        if merge_foreground:
            raise ValueError("merge_foreground=True is part of the unet_crfrnn protocol; the standard protocol "
                             "scores the classes as they are (use protocol='unet_crfrnn')")
        metrics = SegmentationMetrics(num_classes)
        metrics.update(preds, masks)
        return {k: v for k, v in metrics.compute().items() if k in METRIC_NAMES}
    values = unet_crfrnn_per_image(preds, masks, num_classes, merge=merge_foreground)
    return {k: v.mean().item() for k, v in values.items()}


def per_image_metrics(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int, boundary_tolerance: float = 0.0075,
    boundary_tolerance_unit: str = "diagonal", merge_foreground: bool = False,
) -> dict[str, torch.Tensor]:
    """Each metric of every protocol for each image of a batch: ``{name: (B,) float64}``.

    Standard metrics under their own names, the ``unet_crfrnn`` ones as ``unet_crfrnn/iu`` etc.
    (over background and the merged foreground with ``merge_foreground``; the standard ones
    never merge).
    """
    confusion = _confusions(preds, target, num_classes)
    counts = boundary_counts(preds, target, num_classes, boundary_tolerance, unit=boundary_tolerance_unit)
    rows = {
        "iou": foreground_mean(per_class_iou(confusion)),
        "dice": foreground_mean(per_class_dice(confusion)),
        "pixel_acc": pixel_accuracy(confusion),
        "boundary_f1": foreground_mean(boundary_f1_from_counts(counts)),
    }
    origin = protocol_per_image(merged_confusion(confusion) if merge_foreground else confusion)
    rows.update({f"unet_crfrnn/{k}": v for k, v in origin.items()})
    return rows


# -- volumes -------------------------------------------------------------------------
# Per-subject scores of a whole label volume (issue: volumetric data is scored per volume, as
# the Medical Segmentation Decathlon ranked it), distances in millimetres.

VOLUME_METRIC_NAMES = ("dice", "iou", "nsd", "hd95")
VOLUME_DEFINITIONS = (
    "per subject volume (slices restacked, padding removed), per foreground class: Dice and IoU over voxels; "
    "surface = voxels of a class mask not in its 6-connected erosion (voxels on the volume's faces are surface); "
    "distances exact Euclidean in mm with the voxel spacing; NSD (surface Dice) = surface voxels of either mask "
    "within metrics.nsd_tolerance_mm of the other's surface / all surface voxels of both; HD95 = max of the two "
    "directed 95th percentiles (linear interpolation) of surface-to-surface distances, mm. A class in only one of "
    "prediction and truth: Dice/IoU/NSD 0, HD95 inf (null in results.json, its key listed in the row's "
    "'infinite'); in neither: NaN (null), left out of means. The subject's value is the mean over its foreground classes; test/volume/* the mean over subjects. "
    "Ignored (255) target voxels count as no class in both maps."
)


def _surface(mask):
    """Voxels of a boolean ``(D, H, W)`` mask not in its 6-connected erosion (outside the volume
    counts as background, so a mask touching a face of the volume has a surface there)."""
    from scipy import ndimage

    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    return mask & ~eroded


def _as_numpy(x):
    """A tensor's values as a CPU numpy array; an array or array-like as ``np.asarray`` gives it."""
    import numpy as np

    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def volume_metrics(pred, target, spacing, num_classes: int, nsd_tolerance_mm: float = 1.0,
                   ignore_index: int = IGNORE_INDEX) -> dict[str, "np.ndarray"]:
    """Dice, IoU, NSD and HD95 (mm) per foreground class of one ``(D, H, W)`` label volume.

    ``spacing`` is ``(sz, sy, sx)``, the voxel size in mm along D, H and W. Returns
    ``{"dice", "iou", "nsd", "hd95"}``, each a float64 array of length ``num_classes - 1``
    (classes 1..C-1); definitions in :data:`VOLUME_DEFINITIONS`. Distances are exact
    (scipy's Euclidean distance transform with the spacing as sampling).
    """
    import numpy as np
    from scipy import ndimage

    pred, target = _as_numpy(pred), _as_numpy(target)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must both be (D, H, W) label volumes")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive voxel sizes (sz, sy, sx) in mm, got {spacing}")
    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise ValueError(f"metrics.nsd_tolerance_mm={nsd_tolerance_mm} must be a distance >= 0 in mm")
    out = {name: np.full(num_classes - 1, np.nan) for name in VOLUME_METRIC_NAMES}
    for c, p, t, overlap in _class_overlaps(pred, target, num_classes, ignore_index):
        n_p, n_t = int(p.sum()), int(t.sum())
        out["dice"][c - 1] = 2 * overlap / (n_p + n_t)
        out["iou"][c - 1] = overlap / (n_p + n_t - overlap)
        if n_p == 0 or n_t == 0:  # a missed or hallucinated class: no distance can look good
            out["nsd"][c - 1], out["hd95"][c - 1] = 0.0, math.inf
            continue
        surface_p, surface_t = _surface(p), _surface(t)
        to_t = ndimage.distance_transform_edt(~surface_t, sampling=spacing)[surface_p]
        to_p = ndimage.distance_transform_edt(~surface_p, sampling=spacing)[surface_t]
        within = int((to_t <= nsd_tolerance_mm).sum() + (to_p <= nsd_tolerance_mm).sum())
        out["nsd"][c - 1] = within / (to_t.size + to_p.size)
        out["hd95"][c - 1] = max(float(np.percentile(to_t, 95)), float(np.percentile(to_p, 95)))
    return out


def _class_overlaps(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX):
    """``(c, predicted mask, true mask, overlap voxels)`` of every foreground class present in
    the prediction or the truth of two label arrays (ignored voxels left out); an absent class
    is skipped, its scores stay NaN."""
    valid = target != ignore_index
    for c in range(1, num_classes):
        p, t = (pred == c) & valid, (target == c) & valid
        if p.any() or t.any():
            yield c, p, t, int((p & t).sum())


def volume_dice(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX) -> float:
    """A subject's volume Dice, as ``volume_metrics`` and ``volume_row`` give it (the mean over
    the foreground classes present in prediction or truth; NaN if none is), without the
    surface distances: what a tuning on validation subjects maximises (``segrefine.tuning``)."""
    pred, target = _as_numpy(pred), _as_numpy(target)
    return _class_mean([2 * overlap / (int(p.sum()) + int(t.sum()))
                        for _, p, t, overlap in _class_overlaps(pred, target, num_classes, ignore_index)])


def _class_mean(values) -> float:
    """Mean over classes leaving NaN (absent) out; NaN when every class is absent; inf stays inf."""
    finite_or_inf = [float(v) for v in values if not math.isnan(float(v))]
    return sum(finite_or_inf) / len(finite_or_inf) if finite_or_inf else math.nan


def volume_row(subject: str, n_slices: int, values: dict, class_names: list[str]) -> dict:
    """One ``per_volume`` row of results.json: ``{subject, n_slices, dice, iou, nsd, hd95}``
    (the means over foreground classes) and ``<metric>/<class name>`` per class."""
    row: dict = {"subject": subject, "n_slices": int(n_slices)}
    for name in VOLUME_METRIC_NAMES:
        row[name] = _class_mean(values[name])
    for name in VOLUME_METRIC_NAMES:
        for c, value in enumerate(values[name], start=1):
            row[f"{name}/{class_names[c]}"] = float(value)
    # results.json stores inf and NaN alike as null: name the infinite ones (a class missed or
    # hallucinated), which a reader must not drop as missing
    row["infinite"] = [key for key, value in row.items() if isinstance(value, float) and value == math.inf]
    return row


def volume_means(rows: list[dict]) -> dict[str, float]:
    """``volume/<key>`` = the mean over subjects of every metric key of the rows (NaN left out;
    one infinite HD95 makes the mean infinite: a missed class is never averaged away), and
    ``volume/subjects_hd95_infinite``: how many subjects have an infinite HD95."""
    keys = [k for k, v in (rows[0] if rows else {}).items()
            if k not in ("subject", "n_slices") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    means = {f"volume/{key}": _class_mean([row[key] for row in rows]) for key in keys}
    if rows and "hd95" in rows[0]:
        means["volume/subjects_hd95_infinite"] = float(sum(row["hd95"] == math.inf for row in rows))
    return means
