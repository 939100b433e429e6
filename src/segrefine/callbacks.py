"""Lightning callbacks of our own (the rest come from Lightning)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch


class NonFiniteLossError(RuntimeError):
    pass


class FiniteLossCheck(pl.Callback):
    """Stops the run on a NaN/inf training loss, before it reaches the weights."""

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}); the run is stopped. Lower optim.optimizer.lr or check the data."
            )
