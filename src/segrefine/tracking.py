"""Experiment tracking: logger factories (one signature for all, built with Hydra
``_target_``), validation overlays and the per-image test table for wandb."""

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
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from segrefine.validation import ConfigValueError

log = logging.getLogger(__name__)


@dataclass
class RunInfo:
    """What every logger factory gets besides its own config."""

    output_dir: str
    experiment: str
    job_type: str  # "train" | "eval"
    run_name: str
    group: str  # the wandb group: runs that form one row of the results table
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    resume: bool = False  # continuing an interrupted run in the same output dir


def previous_wandb_id(save_dir: str | Path) -> str | None:
    """The id of the newest wandb run already under ``save_dir/wandb`` (to continue it on resume)."""
    runs = sorted(Path(save_dir, "wandb").glob("*run-*-*"))
    match = re.match(r".*run-\d{8}_\d{6}-(\w+)$", runs[-1].name) if runs else None
    return match.group(1) if match else None


def make_wandb_logger(
    run: RunInfo,
    project: str = "segrefine",
    entity: str | None = None,
    mode: str = "offline",
    log_model: bool | str = False,
) -> WandbLogger:
    """Lightning's WandbLogger, writing into the job's output dir; offline unless ``mode=online``.

    ``log_model``: True logs the checkpoints as a ``model`` artifact when training ends,
    "all" as each is written (offline too: ``wandb sync`` uploads them)."""
    mode = {"dryrun": "offline"}.get(mode, mode)  # old wandb spelling, still set by some tools
    if mode not in ("offline", "online", "disabled"):
        raise ConfigValueError(f"logger.mode={mode!r} must be one of offline, online, disabled")
    Path(run.output_dir).mkdir(parents=True, exist_ok=True)
    if mode == "online":  # wandb may wait silently for its server (90 s by default): say what it is doing
        print("segrefine: wandb online: contacting the server (logger.mode=offline or WANDB_MODE=offline logs "
              "without it)", file=sys.stderr, flush=True)
    return WandbLogger(
        name=run.run_name,
        save_dir=run.output_dir,
        id=previous_wandb_id(run.output_dir) if run.resume else None,
        project=project,
        entity=entity,
        mode=mode,  # not Lightning's `offline=True`: that rewrites WANDB_MODE for later jobs
        group=run.group,
        job_type=run.job_type,
        tags=run.tags,
        config=run.config,
        log_model=log_model,
    )


def make_csv_logger(run: RunInfo, name: str = "csv") -> CSVLogger:
    return CSVLogger(save_dir=run.output_dir, name=name, version="")


def wandb_run_info(logger: Any) -> dict[str, str] | None:
    """``{"id", "dir", "mode"}`` of the logger's wandb run, for results.json."""
    if not isinstance(logger, WandbLogger):
        return None
    run = logger.experiment
    mode = run.settings.mode  # public; "dryrun" is the old spelling of offline, "run"/"shared" are online
    mode = mode if mode in ("disabled", "offline") else "offline" if mode == "dryrun" else "online"
    return {"id": run.id, "dir": os.path.relpath(run.dir, logger.save_dir), "mode": mode}


def log_summary(logger: Any, values: dict[str, Any]) -> None:
    """Values that describe the whole run (parameter counts, fit time, steps, best epoch)
    into the wandb run's summary, so they are columns of the runs table (no-op for other
    loggers; results.json records them either way). None values are left out."""
    if not isinstance(logger, WandbLogger):
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


def close_wandb(logger: Any) -> dict[str, str] | None:
    """Finish the logger's wandb run and check that its local log was written whole; a
    failure is logged on the console and returned as the record's ``error``."""
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
        logger = trainer.logger
        if not isinstance(logger, WandbLogger) or outputs is None:
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


def log_per_image_table(logger: Any, rows: list[dict], key: str = "test/per_image") -> None:
    """The per-image metrics as a ``wandb.Table`` (no-op for other loggers)."""
    if not isinstance(logger, WandbLogger) or not rows:
        return
    import wandb

    columns = list(rows[0])
    def cell(value):  # a list (a volume's spacing) as text: table cells are scalars
        return str(value) if isinstance(value, (list, tuple)) else value

    logger.experiment.log({key: wandb.Table(columns=columns, data=[[cell(r.get(c)) for c in columns] for r in rows])})
