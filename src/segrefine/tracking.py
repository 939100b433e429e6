"""Experiment tracking: segrefine's wandb logger (Lightning's, with its offline and resume
rules), the run's summary, validation overlays and the per-image test table for wandb.

Loggers are plain Lightning logger configs (``conf/logger/``); what segrefine knows about a
run reaches them by interpolation of the ``run`` node (``RunInfo``)."""

from __future__ import annotations

import logging
import os
import re
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger as LightningWandbLogger

from segrefine.validation import ConfigValueError

log = logging.getLogger(__name__)


@dataclass
class RunInfo:
    """How trackers file a run; logger configs read it as ``${run.name}``, ``${run.group}``,
    ``${run.job_type}``, ``${run.tags}`` and ``${run.resume}`` (``segrefine.build.build_loggers``)."""

    output_dir: str
    experiment: str
    job_type: str  # "train" | "eval" | "tune"
    label: str  # the row in words (segrefine.labels)
    run_name: str  # "<label> s<seed>"
    group: str  # one per exact configuration (segrefine.runconfig.config_group)
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # what every logger gets as hyperparameters
    resume: bool = False  # continuing an interrupted run in the same output dir

    def interpolated(self) -> dict[str, Any]:
        """The ``run`` node of the config that logger configs interpolate."""
        return {"name": self.run_name, "group": self.group, "job_type": self.job_type, "tags": list(self.tags),
                "resume": self.resume}


def previous_wandb_id(save_dir: str | Path) -> str | None:
    """The id of the newest wandb run already under ``save_dir/wandb`` (to continue it on resume)."""
    runs = sorted(Path(save_dir, "wandb").glob("*run-*-*"))
    match = re.match(r".*run-\d{8}_\d{6}-(\w+)$", runs[-1].name) if runs else None
    return match.group(1) if match else None


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger, writing into the job's output dir; offline unless ``mode=online``.

    Differs from Lightning's in three rules: ``mode`` instead of Lightning's ``offline=True``
    (which rewrites ``WANDB_MODE`` for every later job of the process); ``resume_run``
    continues the wandb run already in ``save_dir`` (an interrupted job); and no
    ``anonymous`` setting reaches ``wandb.init`` (Lightning always passes one, and wandb
    >= 0.19 warns on every run that it has no effect).

    ``log_model``: True logs the checkpoints as a ``model`` artifact when training ends,
    "all" as each is written (offline too: ``wandb sync`` uploads them)."""

    def __init__(self, *, save_dir: str = ".", mode: str = "offline", resume_run: bool = False,
                 id: str | None = None, **kwargs: Any):
        mode = {"dryrun": "offline"}.get(mode, mode)  # old wandb spelling, still set by some tools
        if mode not in ("offline", "online", "disabled"):
            raise ConfigValueError(f"logger.wandb.mode={mode!r} must be one of offline, online, disabled")
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        if mode == "online":  # wandb may wait silently for its server (90 s by default): say what it is doing
            print("segrefine: wandb online: contacting the server (logger.wandb.mode=offline or WANDB_MODE=offline "
                  "logs without it)", file=sys.stderr, flush=True)
        if resume_run and id is None:
            id = previous_wandb_id(save_dir)
        super().__init__(save_dir=str(save_dir), mode=mode, id=id, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # Lightning's own dict of wandb.init arguments
            self._wandb_init.pop("anonymous", None)


def wandb_logger(loggers: Any) -> LightningWandbLogger | None:
    """The wandb logger among a run's loggers (a list, one logger, or False), if any."""
    if isinstance(loggers, LightningWandbLogger):
        return loggers
    return next((lg for lg in (loggers or ()) if isinstance(lg, LightningWandbLogger)), None) \
        if isinstance(loggers, (list, tuple)) else None


def require_wandb_credentials() -> None:
    """Stop with one line when wandb has no credentials (``wandb login`` or ``WANDB_API_KEY``),
    instead of wandb's UsageError traceback from deep inside its API. Checks what wandb
    reads (the environment, then the netrc entry of ``WANDB_BASE_URL``'s host) without
    contacting the server: a key that is present but wrong still fails there, with wandb's message."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        if netrc.netrc(path).authenticators(host):
            return
    except FileNotFoundError:
        pass
    except (OSError, netrc.NetrcParseError) as e:
        raise SystemExit(f"segrefine: wandb credentials in {path} are unreadable ({e}): run `wandb login` again, "
                         "or set WANDB_API_KEY") from None
    raise SystemExit(f"segrefine: reading runs from wandb needs credentials for {host}: run `wandb login` once, "
                     "or set WANDB_API_KEY")


def wandb_run_info(loggers: Any) -> dict[str, str] | None:
    """``{"id", "name", "group", "dir", "mode"}`` of the run's wandb run, for results.json."""
    logger = wandb_logger(loggers)
    if logger is None:
        return None
    run = logger.experiment
    mode = run.settings.mode  # public; "dryrun" is the old spelling of offline, "run"/"shared" are online
    mode = mode if mode in ("disabled", "offline") else "offline" if mode == "dryrun" else "online"
    return {"id": run.id, "name": run.name, "group": run.group, "dir": os.path.relpath(run.dir, logger.save_dir),
            "mode": mode}


def log_summary(loggers: Any, values: dict[str, Any]) -> None:
    """Values that describe the whole run (parameter counts, fit time, steps, best epoch)
    into the wandb run's summary, so they are columns of the runs table (no-op for other
    loggers; results.json records them either way). None values are left out."""
    logger = wandb_logger(loggers)
    if logger is None:
        return
    logger.experiment.summary.update({k: v for k, v in values.items() if v is not None})


def finish_wandb(error: BaseException | None = None) -> None:
    """End the active wandb run, if any, so the next multirun job starts its own. A run that
    failed (``error``) ends with exit code 1 and the error in its summary, so it does not
    sync as finished."""
    import wandb

    if wandb.run is None:
        return
    if error is None:
        wandb.finish()
        return
    try:
        wandb.run.summary["error"] = " ".join(f"{type(error).__name__}: {error}".split())[:1000]
    finally:
        wandb.finish(exit_code=1)


def wandb_log_records(path: str | Path):
    """The protobuf records of a local wandb run log (``run-<id>.wandb``: a ``:W&B`` header,
    then LevelDB-style 32 KiB blocks of length-prefixed record fragments). ValueError if the
    file is not one or ends inside a record (a write that failed half-way)."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb run log")
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the rest of a block is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length:
            raise ValueError(f"{path}: ends inside a record")
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(pending)
            except DecodeError as e:
                raise ValueError(f"{path}: a damaged record ({e})") from e
            yield record


def wandb_log_problem(info: dict[str, str], save_dir: str | Path, wait: float = 10.0) -> str | None:
    """Why the local log of a finished wandb run is incomplete (it will not sync whole), or None.

    wandb's writer process may still be flushing the last records when ``finish`` returns:
    the exit record is awaited up to ``wait`` seconds."""
    path = Path(save_dir, info["dir"]).parent / f"run-{info['id']}.wandb"
    deadline = time.monotonic() + wait
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in wandb_log_records(path)):
                return None
            problem = f"{path} has no exit record (wandb could not write all of it; see debug-internal.log beside it)"
        except (OSError, ValueError) as e:
            problem = f"{path} is unreadable or truncated ({e})"
        if time.monotonic() > deadline:
            return problem
        time.sleep(0.1)


def close_wandb(loggers: Any) -> dict[str, str] | None:
    """Finish the run's wandb run and check that its local log was written whole; a
    failure is logged on the console and returned as the record's ``error``."""
    logger = wandb_logger(loggers)
    info = wandb_run_info(logger)
    finish_wandb()
    if info is not None and info.get("mode") != "disabled":
        problem = wandb_log_problem(info, logger.save_dir)
        if problem:
            log.error("wandb log incomplete: %s", problem)
            print(f"segrefine: wandb log incomplete: {problem}", file=sys.stderr)
            info["error"] = problem
    return info


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(K,H,W) float -> (H,W) or (H,W,3) uint8, min-max scaled per image for display."""
    img = image.detach().float().cpu()
    img = img[0] if img.shape[0] != 3 else img.permute(1, 2, 0)
    lo, hi = img.min(), img.max()
    return ((img - lo) / (hi - lo + 1e-8) * 255).round().to(torch.uint8).numpy()


class WandbValidationImages(pl.Callback):
    """Logs ``val/overlays``: the first validation images with ground-truth and predicted masks."""

    def __init__(self, num_images: int = 4):
        self.num_images = num_images

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or self.num_images <= 0 or trainer.sanity_checking:
            return
        logger = wandb_logger(trainer.loggers)
        if logger is None or outputs is None:
            return
        import wandb

        labels = dict(enumerate(pl_module.class_names))
        images = []
        for i in range(min(self.num_images, len(batch["id"]))):
            masks = {
                "ground_truth": {"mask_data": batch["mask"][i].cpu().numpy().astype(np.uint8), "class_labels": labels},
                "prediction": {"mask_data": outputs["preds"][i].cpu().numpy().astype(np.uint8), "class_labels": labels},
            }
            images.append(wandb.Image(_to_uint8(batch["image"][i]), masks=masks, caption=batch["id"][i]))
        logger.experiment.log({"val/overlays": images, "trainer/global_step": trainer.global_step})


def log_per_image_table(loggers: Any, rows: list[dict], key: str = "test/per_image") -> None:
    """The per-image metrics as a ``wandb.Table`` (no-op for other loggers)."""
    logger = wandb_logger(loggers)
    if logger is None or not rows:
        return
    import wandb

    columns = list(rows[0])
    def cell(value):  # a list (a volume's spacing) as text: table cells are scalars
        return str(value) if isinstance(value, (list, tuple)) else value

    logger.experiment.log({key: wandb.Table(columns=columns, data=[[cell(r.get(c)) for c in columns] for r in rows])})


class BestValue(pl.Callback):
    """The best value of a validation metric and its epoch, for the run's summary beside the
    last value (``<monitor>_best``, ``<monitor>_best_epoch``). Its state travels in the
    checkpoints, so a resumed run still knows the epochs before the interruption."""

    def __init__(self, monitor: str = "val/iou", mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode={mode!r} must be max or min")
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.epoch: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def on_validation_end(self, trainer, pl_module) -> None:
        # validation_end, not validation_epoch_end: Lightning calls callbacks' epoch-end hooks
        # before the module's, which logs the epoch's metrics.
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        value = float(value)
        if value != value:  # NaN is never the best
            return
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best, self.epoch = value, int(trainer.current_epoch)

    def values(self) -> dict[str, Any]:
        return {f"{self.monitor}_best": self.best, f"{self.monitor}_best_epoch": self.epoch}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.epoch = state_dict.get("best"), state_dict.get("epoch")
