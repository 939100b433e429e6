"""A quiet console at the entry points: what a job did and where its outputs are, progress
bars, and real warnings, without the banners third-party libraries print on every run.

Applied by ``segrefine-train``, ``segrefine-eval`` and the study scripts (never on import of
the library, so notebooks and tests see everything). ``verbose=true`` (or
``hydra.verbose=...``, or ``--verbose`` for the study scripts) brings everything back.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

# Messages (regular expressions, matched at the start) known to carry nothing for a segrefine
# user. Each names its source, so it can be dropped when that source changes.
KNOWN_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # Lightning's pytree helper on torch >= 2.5
    r"The number of training batches \(\d+\) is smaller than the logging interval",  # tiny presets
    r"The '\w+_dataloader' does not have many workers",  # the in-memory datasets need none
)
# Loggers whose INFO lines are banners (hardware probes, tips, seeds, checkpoint restores).
BANNER_LOGGERS = (
    "lightning_fabric.utilities.seed",
    "lightning.fabric.utilities.seed",
    "pytorch_lightning.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "pytorch_lightning.accelerators.cuda",
)
# Loggers whose WARNING lines are notices: Lightning's MLflow logger announces the MLflow
# experiment it creates in a new run folder's store.
NOTICE_LOGGERS = ("pytorch_lightning.loggers.mlflow", "lightning.pytorch.loggers.mlflow")

log = logging.getLogger("segrefine")


def quiet_console(verbose: bool = False) -> None:
    """Filter the known noise (see ``KNOWN_WARNINGS`` / ``BANNER_LOGGERS``) for this process,
    and let wandb speak only on errors (segrefine prints the run's folder itself)."""
    if verbose:
        return
    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in BANNER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in NOTICE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # its store's table-creation lines (logger=mlflow)


def is_verbose(cfg: Any) -> bool:
    """``verbose=true``, or Hydra's own ``hydra.verbose`` set to anything."""
    if cfg.get("verbose"):
        return True
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and bool(HydraConfig.get().verbose)


def job_line(output_dir: str | Path, metrics: dict[str, Any] | None, headline_key: str) -> str:
    """One line per finished job: its folder, its headline metric and its wandb run."""
    from segrefine.record import FILENAME
    from segrefine.record import read_document as read_results

    output_dir = Path(output_dir)
    parts = [f"segrefine: {output_dir}"]
    value = (metrics or {}).get(headline_key)
    if isinstance(value, (int, float)):
        parts.append(f"{headline_key} {value:.4f}")
    try:
        wandb = read_results(output_dir / FILENAME).get("wandb") or {}
    except (OSError, ValueError):
        wandb = {}
    if wandb.get("id"):
        where = output_dir / wandb["dir"] if wandb.get("dir") else output_dir / "wandb"
        if wandb.get("mode") == "offline":
            parts.append(f"wandb {wandb['id']} offline: wandb sync {where.parent if where.name == 'files' else where}")
        else:
            parts.append(f"wandb {wandb['id']} ({wandb.get('mode')})")
    return "; ".join(parts)
