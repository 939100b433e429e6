"""Segmentation metrics: IoU, Dice, pixel accuracy (from torchmetrics' confusion
matrix) and boundary F1 (not in torchmetrics, implemented here).

Conventions, shared by the dataset-level metrics and the per-image rows:
- IoU and Dice are averaged over the foreground classes 1..C-1 (class 0 is background).
  A class that appears neither in the target nor in the prediction is left out of the
  mean; if every class is left out (nothing to find, nothing predicted) the score is 1.
- Pixels whose target is ``ignore_index`` are never scored.
- Boundary F1 (Csurka et al. 2013, "BF score"): per class, the boundary pixels of the
  predicted and true class masks; a predicted boundary pixel is correct if a true one
  lies within ``tolerance`` pixels (Euclidean), and vice versa for recall. Predicted
  boundary pixels on ignored target pixels are not scored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.functional.classification import multiclass_confusion_matrix

from segrefine.types import IGNORE_INDEX

METRIC_NAMES = ("iou", "dice", "pixel_acc", "boundary_f1")


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


def _disk(radius: int, device: torch.device) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2 + 1e-6).float()


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
    tolerance: int = 2,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per image and class: ``(B, 4, C)`` = matched predicted, predicted, matched true, true boundary pixels."""
    valid = target != ignore_index
    pred_b = class_boundaries(preds, num_classes) & valid[:, None]
    true_b = class_boundaries(target, num_classes)
    if tolerance > 0:
        kernel = _disk(tolerance, preds.device)[None, None].expand(num_classes, 1, -1, -1)

        def near(b: torch.Tensor) -> torch.Tensor:
            return F.conv2d(b.float(), kernel, padding=tolerance, groups=num_classes) > 0.5

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

    def __init__(self, num_classes: int, tolerance: int = 2, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.num_classes, self.tolerance, self.ignore_index = num_classes, tolerance, ignore_index
        self.add_state("counts", default=torch.zeros(4, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.counts += boundary_counts(preds, target, self.num_classes, self.tolerance, self.ignore_index).sum(0)

    def compute(self) -> torch.Tensor:
        return boundary_f1_from_counts(self.counts)


class SegmentationMetrics(torch.nn.Module):
    """Accumulates one split's metrics; ``compute()`` gives the design.md names without prefix."""

    def __init__(self, num_classes: int, class_names: list[str] | None = None, boundary_tolerance: int = 2):
        super().__init__()
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
        self.confusion = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX)
        self.boundary = BoundaryF1(num_classes, boundary_tolerance)

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


def per_image_metrics(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int, boundary_tolerance: int = 2
) -> dict[str, torch.Tensor]:
    """Each metric for each image of a batch: ``{name: (B,) float64}``."""
    confusion = torch.stack(
        [
            multiclass_confusion_matrix(p, t, num_classes, ignore_index=IGNORE_INDEX, validate_args=False)
            for p, t in zip(preds, target)
        ]
    )
    counts = boundary_counts(preds, target, num_classes, boundary_tolerance)
    return {
        "iou": foreground_mean(per_class_iou(confusion)),
        "dice": foreground_mean(per_class_dice(confusion)),
        "pixel_acc": pixel_accuracy(confusion),
        "boundary_f1": foreground_mean(boundary_f1_from_counts(counts)),
    }
