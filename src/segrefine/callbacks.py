"""Lightning callbacks of our own (the rest come from Lightning)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn

from segrefine.jobs import check_interrupt, defer_interrupts, interruption


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


class StopOnSignal(pl.Callback):
    """Under ``segrefine.jobs.stop_on_signals``, a SIGTERM / SIGINT stops the loops at the end
    of the current batch (train, validation or test), not wherever the signal lands; a stopped
    fit first saves ``last_checkpoint`` (atomically, through the trainer's checkpoint writer),
    so a rerun continues from that batch."""

    def __init__(self, last_checkpoint: str | None = None):
        self.last_checkpoint = last_checkpoint
        self._deferred = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()
        self._deferred = defer_interrupts()
        self._deferred.__enter__()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    def _release(self) -> None:
        if self._deferred is not None:
            self._deferred.__exit__(None, None, None)
            self._deferred = None

    def on_train_batch_end(self, *args, **kwargs) -> None:
        check_interrupt()

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        check_interrupt()

    def on_test_batch_end(self, *args, **kwargs) -> None:
        check_interrupt()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()
        stop = interruption(exception)
        if stop is None or stop.forced or not self.last_checkpoint or trainer.state.fn != TrainerFn.FITTING:
            return
        trainer.save_checkpoint(self.last_checkpoint)
