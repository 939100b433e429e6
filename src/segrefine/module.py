"""One LightningModule for every backbone x head: loss, metrics, logging, timing.

Anything that differs between heads lives in the head (``forward`` and ``losses``).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from segrefine.distributed import gather_objects
from segrefine.heads.base import auxiliary_losses
from segrefine.metrics import SegmentationMetrics, per_image_metrics
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
        boundary_tolerance: int = 2,
        config: dict[str, Any] | None = None,
    ):
        super().__init__()
        # The resolved run config travels in every checkpoint so `evaluate` can rebuild the model.
        self.save_hyperparameters({"config": config or {}, "num_classes": num_classes, "class_names": list(class_names)})
        self.backbone, self.head = backbone, head
        self.num_classes, self.class_names = num_classes, list(class_names)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.boundary_tolerance = boundary_tolerance
        self.val_metrics = SegmentationMetrics(num_classes, class_names, boundary_tolerance)
        self.test_metrics = SegmentationMetrics(num_classes, class_names, boundary_tolerance)
        self.test_rows: list[dict[str, Any]] = []
        # Metric prefix of test(): "test", or "val" when evaluate runs on the validation split.
        self.eval_prefix = "test"
        self._test_seconds, self._test_images = 0.0, 0

    # -- the model -----------------------------------------------------------------
    def _pad(self, image: torch.Tensor, mask: torch.Tensor | None = None):
        """Pad bottom/right to the backbone's required multiple; padded mask pixels are ignored."""
        divisor = getattr(self.backbone, "required_divisor", 1)
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
        if getattr(self.scheduler_factory, "keywords", {}).get("total_iters", 0) is None:
            kwargs["total_iters"] = int(self.trainer.estimated_stepping_batches)
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
        self.test_metrics.reset()

    def _synchronise(self, tensor: torch.Tensor) -> None:
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)

    def test_step(self, batch: dict, batch_idx: int) -> None:
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
        rows = per_image_metrics(preds, mask, self.num_classes, self.boundary_tolerance)
        for i, sample_id in enumerate(batch["id"]):
            self.test_rows.append({"id": sample_id, **{k: float(v[i]) for k, v in rows.items()}})

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()  # torchmetrics syncs the counts across ranks
        world_size = self.trainer.world_size if self._trainer is not None else 1
        parts = gather_objects((self.test_rows, self._test_seconds, self._test_images), world_size)
        if len(parts) > 1:
            # The distributed sampler repeats images to even out the ranks: keep each id once.
            rows = {row["id"]: row for part in parts for row in part[0]}
            self.test_rows = [rows[key] for key in sorted(rows)]
        seconds, images = sum(p[1] for p in parts), sum(p[2] for p in parts)
        values["ms_per_image"] = 1000.0 * seconds / max(images, 1)
        self.test_results = {f"{self.eval_prefix}/{k}": v for k, v in values.items()}
        self.log_dict(self.test_results, rank_zero_only=True)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.backbone.parameters()) + sum(p.numel() for p in self.head.parameters())
