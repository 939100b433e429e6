"""One LightningModule for every backbone x head: loss, metrics, logging, timing.

Anything that differs between heads lives in the head (``forward`` and ``losses``).
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any, Callable

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from segrefine.distributed import gather_objects
from segrefine.heads.base import auxiliary_losses
from segrefine.metrics import (SegmentationMetrics, per_image_metrics, tolerance_pixels, volume_means, volume_metrics,
                               volume_row)
from segrefine.types import IGNORE_INDEX


class SegmentationModule(pl.LightningModule):
    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        num_classes: int,
        class_names: list[str],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        boundary_tolerance: float = 0.0075,
        config: dict[str, Any] | None = None,
        boundary_tolerance_unit: str = "diagonal",
        save_predictions: int = 0,
        nsd_tolerance_mm: float = 1.0,
        merge_foreground: bool = False,
    ):
        super().__init__()
        # The resolved run config travels in every checkpoint so `evaluate` can rebuild the model.
        # Not sent to the logger: the run's tracker config is the curated one (build.run_info),
        # and logging this too would show every key twice, run-only keys and paths included.
        self.save_hyperparameters({"config": config or {}, "num_classes": num_classes, "class_names": list(class_names)},
                                  logger=False)
        self.backbone, self.head = backbone, head
        self.num_classes, self.class_names = num_classes, list(class_names)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.boundary_tolerance, self.boundary_tolerance_unit = boundary_tolerance, boundary_tolerance_unit
        # The unet_crfrnn numbers over background and the merged foreground (metrics.merge_foreground).
        self.merge_foreground = bool(merge_foreground)
        self.val_metrics = SegmentationMetrics(num_classes, class_names, boundary_tolerance, boundary_tolerance_unit)
        self.test_metrics = SegmentationMetrics(num_classes, class_names, boundary_tolerance, boundary_tolerance_unit)
        self.test_rows: list[dict[str, Any]] = []
        # Volumetric sources: one row per subject volume (segrefine.metrics.volume_row).
        self.nsd_tolerance_mm = float(nsd_tolerance_mm)
        self.volume_rows: list[dict[str, Any]] = []
        # Test images kept for the report's qualitative figure (see prediction_key).
        self.save_predictions = int(save_predictions)
        self.saved_predictions: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]] = []
        # Metric prefix of test(): "test", or "val" when evaluate runs on the validation split.
        self.eval_prefix = "test"
        self._test_seconds, self._test_images = 0.0, 0

    # -- the model -----------------------------------------------------------------
    def _pad(self, image: torch.Tensor, mask: torch.Tensor | None = None):
        """Pad bottom/right to the backbone's required multiple; padded mask pixels are ignored."""
        divisor = self.backbone.required_divisor  # declared by every Backbone (segrefine.models.base)
        pad_h, pad_w = -image.shape[-2] % divisor, -image.shape[-1] % divisor
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
            if mask is not None:
                mask = F.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        return image, mask

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Full-resolution logits (or log-probabilities) ``(B, C, H, W)`` of backbone + head."""
        height, width = image.shape[-2:]
        padded, _ = self._pad(image)
        logits = self.head(self.backbone(padded), padded)
        return logits[..., :height, :width]

    # -- training ------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image, mask = self._pad(batch["image"], batch["mask"])
        out = self.backbone(image)
        losses = self.head.losses(out, image, mask)
        auxiliary = auxiliary_losses(out, mask)  # the backbone's deep supervision, if it has any
        if auxiliary:
            losses = {**losses, **auxiliary, "loss": losses["loss"] + sum(auxiliary.values())}
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, prog_bar=name == "loss", batch_size=len(image))
        return losses["loss"]

    def on_train_epoch_end(self) -> None:
        extra = self.head.extra_metrics()
        if extra:
            self.log_dict({f"head/{k}": float(v) for k, v in extra.items()})

    def configure_optimizers(self):
        make_optimizer = self.optimizer_factory or (lambda params: torch.optim.Adam(params, lr=1e-3))
        optimizer = make_optimizer(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        keywords = getattr(self.scheduler_factory, "keywords", {})
        if keywords.get("total_iters", 0) is None:
            kwargs["total_iters"] = int(self.trainer.estimated_stepping_batches)
        if keywords.get("step_size", 0) is None:
            kwargs["step_size"] = steps_per_epoch(self.trainer)
        scheduler = self.scheduler_factory(optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation ----------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["mask"], ignore_index=IGNORE_INDEX)
        preds = logits.argmax(1)
        self.val_metrics.update(preds, batch["mask"])
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(preds))
        return {"preds": preds}

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        for name, value in values.items():
            self.log(f"val/{name}", value, prog_bar=name == "iou")

    # -- test ----------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self.test_rows, self._test_seconds, self._test_images = [], 0.0, 0
        self.test_sizes: set[tuple[int, int]] = set()  # (H, W) the boundary tolerance was computed at
        self.volume_rows = []
        self.saved_predictions = []
        self.test_metrics.reset()

    def _synchronise(self, tensor: torch.Tensor) -> None:
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if "scored" in batch:  # a whole subject volume (segrefine.data.msd.VolumeDataset)
            return self._test_volume(batch, batch_idx)
        image, mask = batch["image"], batch["mask"]
        if batch_idx == 0:
            self(image)  # warm-up: first-call allocations and lazy inits are not timed
        self._synchronise(image)
        start = time.perf_counter()
        logits = self(image)
        self._synchronise(logits)
        self._test_seconds += time.perf_counter() - start
        self._test_images += len(image)
        preds = logits.argmax(1)
        self.test_metrics.update(preds, mask)
        rows = per_image_metrics(preds, mask, self.num_classes, self.boundary_tolerance, self.boundary_tolerance_unit,
                                 merge_foreground=self.merge_foreground)
        self.test_sizes.add((int(preds.shape[-2]), int(preds.shape[-1])))
        for i, sample_id in enumerate(batch["id"]):
            self.test_rows.append({"id": sample_id, **{k: float(v[i]) for k, v in rows.items()}})
            self._keep_prediction(str(sample_id), image[i], mask[i], preds[i])

    def volume_logits(self, batch: dict, refine: bool = True) -> torch.Tensor:
        """Logits (or log-probabilities) ``(S, C, H, W)`` of a subject volume's slices, run
        ``batch["batch_size"]`` slices at a time; a volume head (``head.volume``) then refines
        the restacked softmax of the whole volume (padding removed) at once, unless ``refine``
        is False (the tuner caches the unrefined logits)."""
        logits = torch.cat([self.head.slice_logits(out, padded)[..., :h, :w]
                            for padded, out, h, w in self.volume_chunks(batch)])
        if self.head.volume and refine:
            logits = self.head.refine_volume(logits, batch["image"], batch["spacing"], batch["height"], batch["width"])
        return logits

    def volume_chunks(self, batch: dict):
        """``(padded slices, backbone output, height, width)`` per ``batch["batch_size"]`` slices
        of a subject volume: the backbone's part of ``volume_logits`` (the tuner caches it)."""
        image = batch["image"]
        for part in image.split(int(batch.get("batch_size") or len(image))):
            padded, _ = self._pad(part)
            yield padded, self.backbone(padded), *part.shape[-2:]

    def _test_volume(self, batch: dict, batch_idx: int) -> None:
        """One subject: every slice predicted (and timed, per slice), the split's slices scored
        per image as usual, the restacked volume without padding scored per volume."""
        image, mask, scored = batch["image"], batch["mask"], batch["scored"].bool()
        if batch_idx == 0:  # warm-up, untimed (a volume head refines whole volumes only: the backbone alone)
            first = image[: int(batch.get("batch_size") or len(image))]
            self.backbone(self._pad(first)[0]) if self.head.volume else self(first)
        self._synchronise(image)
        start = time.perf_counter()
        logits = self.volume_logits(batch)
        self._synchronise(logits)
        self._test_seconds += time.perf_counter() - start
        self._test_images += len(image)
        preds = logits.argmax(1)
        chosen = torch.nonzero(scored.to(preds.device)).flatten()
        if len(chosen):
            self.test_metrics.update(preds[chosen], mask[chosen])
            rows = per_image_metrics(preds[chosen], mask[chosen], self.num_classes, self.boundary_tolerance,
                                     self.boundary_tolerance_unit, merge_foreground=self.merge_foreground)
            self.test_sizes.add((int(preds.shape[-2]), int(preds.shape[-1])))
            for j, i in enumerate(chosen.tolist()):
                sample_id = str(batch["id"][i])
                self.test_rows.append({"id": sample_id, "subject": batch["subject"],
                                       **{k: float(v[j]) for k, v in rows.items()}})
                self._keep_prediction(*self._split_size(batch, sample_id, image[i], mask[i], preds[i]))
        height, width = batch["height"], batch["width"]
        values = volume_metrics(preds[:, :height, :width], mask[:, :height, :width], batch["spacing"],
                                self.num_classes, self.nsd_tolerance_mm)
        self.volume_rows.append({**volume_row(batch["subject"], len(image), values, self.class_names),
                                 "spacing": [float(v) for v in batch["spacing"]]})

    @staticmethod
    def _split_size(batch: dict, sample_id: str, image, mask, pred):
        """A volume's slice at the split's common size (the slice loader's centre crop where the
        volume is larger than ``data.pad_to``), so the kept predictions stack into one array."""
        size = batch.get("size")
        if size is None or tuple(mask.shape[-2:]) == tuple(size):
            return sample_id, image, mask, pred
        from segrefine.data.transforms import fit_to

        _, pred = fit_to(image, pred, size)
        image, mask = fit_to(image, mask, size)
        return sample_id, image, mask, pred

    def _keep_prediction(self, sample_id: str, image: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor) -> None:
        """Keep the ``save_predictions`` images with the smallest id hash: the same ids in
        every run of the same data, whatever the batch order, in bounded memory."""
        if self.save_predictions <= 0:
            return
        key = prediction_key(sample_id)
        if len(self.saved_predictions) >= self.save_predictions and key >= self.saved_predictions[0][0]:
            return
        item = (key, sample_id, image_to_uint8(image), mask.cpu().numpy().astype(np.uint8),
                pred.cpu().numpy().astype(np.uint8))
        # Max-heap on the key through negation is awkward for strings: keep a sorted list, descending.
        self.saved_predictions.append(item)
        self.saved_predictions.sort(key=lambda entry: entry[0], reverse=True)
        del self.saved_predictions[: max(0, len(self.saved_predictions) - self.save_predictions)]

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()  # torchmetrics syncs the counts across ranks
        world_size = self.trainer.world_size if self._trainer is not None else 1
        parts = gather_objects((self.test_rows, self._test_seconds, self._test_images, self.saved_predictions,
                                self.volume_rows), world_size)
        if len(parts) > 1:
            volumes = {row["subject"]: row for part in parts for row in part[4]}
            self.volume_rows = [volumes[key] for key in sorted(volumes)]
            # The distributed sampler repeats images to even out the ranks: keep each id once.
            rows = {row["id"]: row for part in parts for row in part[0]}
            self.test_rows = [rows[key] for key in sorted(rows)]
            saved = {entry[1]: entry for part in parts for entry in part[3]}
            self.saved_predictions = sorted(saved.values(), key=lambda e: e[0])[: self.save_predictions]
        seconds, images = sum(p[1] for p in parts), sum(p[2] for p in parts)
        values["ms_per_image"] = 1000.0 * seconds / max(images, 1)
        # Per-image values averaged over images: the aggregation the report's paired deltas use.
        for key in self.test_rows[0] if self.test_rows else ():
            if key in ("id", "subject"):
                continue
            scores = [row[key] for row in self.test_rows if row[key] == row[key]]  # NaN left out
            name = key if key.startswith("unet_crfrnn/") else f"{key}_image"
            values[name] = float(np.mean(scores)) if scores else float("nan")
        if self.volume_rows:  # means over subjects: volume/dice, volume/hd95, volume/dice/<class>, ...
            values.update(volume_means(self.volume_rows))
        self.test_results = {f"{self.eval_prefix}/{k}": v for k, v in values.items()}
        self.log_dict(self.test_results, rank_zero_only=True)

    def prediction_arrays(self) -> dict[str, np.ndarray]:
        """The kept test predictions as arrays for ``predictions.npz`` (sorted by id)."""
        kept = sorted(self.saved_predictions, key=lambda e: e[1])
        if not kept:
            return {}
        return {
            "ids": np.array([e[1] for e in kept]),
            "images": np.stack([e[2] for e in kept]),
            "masks": np.stack([e[3] for e in kept]),
            "predictions": np.stack([e[4] for e in kept]),
        }

    def boundary_tolerance_px(self) -> dict[str, float]:
        """Boundary F1's matching distance in pixels at each test image size this rank saw
        (``"HxW"``: the size the tolerance is computed at, padding included)."""
        return {f"{h}×{w}": tolerance_pixels(self.boundary_tolerance, self.boundary_tolerance_unit, h, w)
                for h, w in sorted(getattr(self, "test_sizes", ()))}

    def parameter_counts(self) -> dict[str, int]:
        """``params`` (backbone + head: the report's column) and ``params/trainable``."""
        parameters = [*self.backbone.parameters(), *self.head.parameters()]
        return {"params": sum(p.numel() for p in parameters),
                "params/trainable": sum(p.numel() for p in parameters if p.requires_grad)}


def steps_per_epoch(trainer) -> int:
    """Optimiser steps in one training epoch (``optim.scheduler.step_size: null`` means one epoch)."""
    epochs, total = trainer.max_epochs, trainer.estimated_stepping_batches
    if not epochs or epochs < 1 or not math.isfinite(total) or total % epochs:
        raise ValueError(
            f"optim.scheduler.step_size=null means one epoch's optimiser steps, which trainer.max_epochs={epochs} and "
            f"{total} steps in all do not give; set optim.scheduler.step_size=<steps per decay>"
        )
    return int(total // epochs)


def prediction_key(sample_id: str) -> str:
    """Order in which test images are chosen for saving: a hash of the id, so the choice is
    spread over the split yet identical for every run of the same data."""
    return hashlib.sha1(sample_id.encode()).hexdigest()


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3)`` uint8 for display: RGB when 3 channels, else the first
    channel; min-max normalised per image (stored intensities are normalised anyway)."""
    shown = image[:3].permute(1, 2, 0) if image.shape[0] == 3 else image[0]
    shown = shown.detach().float().cpu()
    low, high = shown.min(), shown.max()
    scaled = (shown - low) / (high - low) if high > low else torch.zeros_like(shown)
    return (scaled * 255).round().to(torch.uint8).numpy()
