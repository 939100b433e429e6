"""results.json: the one file a run leaves for the report (its fields are listed in the README, "Where outputs go")."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from segrefine.atomic import atomic_open

SCHEMA = 1
FILENAME = "results.json"
# Test images, masks and predictions saved for the report's qualitative figure.
PREDICTIONS_FILE = "predictions.npz"


def _clean(value: Any) -> Any:
    """JSON has no NaN: store undefined numbers as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_results(output_dir: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``output_dir/results.json`` atomically (temp file + rename)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    document = {"schema": SCHEMA, "status": "complete", **payload}
    with atomic_open(output_dir / FILENAME, "w") as f:
        json.dump(_clean(document), f, indent=2, allow_nan=False)
    return output_dir / FILENAME


def read_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    with open(path) as f:
        return json.load(f)
