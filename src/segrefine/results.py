"""results.json, as train and evaluate call it: a thin layer over ``segrefine.record`` (the
typed ``RunRecord``; its fields are listed in the README, "Where outputs go")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segrefine.record import FILENAME, PREDICTIONS_FILE, SCHEMA, RunRecord, read_document

__all__ = ["FILENAME", "PREDICTIONS_FILE", "SCHEMA", "read_results", "write_results"]


def write_results(output_dir: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``output_dir/results.json`` atomically (temp file + rename) as a ``RunRecord``."""
    return RunRecord.from_dict({"schema": SCHEMA, "status": "complete", **payload}).write(Path(output_dir) / FILENAME)


def read_results(path: str | Path) -> dict[str, Any]:
    return read_document(path)
