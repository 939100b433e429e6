"""``RunRecord``: the typed form of results.json, the one file a run leaves for the report.

Every field results.json holds today is a field here; keys this version does not know (from a
newer writer, or a hand-added note) are kept in ``extra`` and written back unchanged, so
``load(path).to_dict()`` is the document that was read, key for key and in the same order.
Torch-free: the report and notebooks load records without the training stack.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from segrefine.atomic import atomic_open

SCHEMA = 1  # the layout below; a later layout adds a step to MIGRATIONS
FILENAME = "results.json"
# Test images, masks and predictions saved for the report's qualitative figure.
PREDICTIONS_FILE = "predictions.npz"
STATUSES = ("complete", "interrupted")
# RunRecord fields that are not results.json keys (a document key of that name is kept in extra).
NOT_IN_DOCUMENT = frozenset({"extra", "_keys", "location"})


@dataclass
class RunRecord:
    """One job's results.json. ``status`` is ``complete`` or ``interrupted`` (then ``signal``
    names the signal, and only the identifying fields and the checkpoint are set).

    ``location`` is the one field that is not part of results.json: where a reader found the
    record (its run folder; ``ENTITY/PROJECT/RUN_ID`` for a run read from wandb), so the report
    can name it and find its saved predictions. ``to_dict`` and ``write`` leave it out and
    ``==`` ignores it: a record written back is the document that was read."""

    schema: int = SCHEMA
    status: str = "complete"
    signal: str | None = None
    job_type: str | None = None  # train | eval
    experiment: str | None = None
    data: str | None = None
    backbone: str | None = None
    head: str | None = None
    seed: int | None = None
    label: str | None = None
    split: str | None = None  # eval jobs: the split scored
    config: dict[str, Any] | None = None  # the resolved config, as run
    run_config: dict[str, Any] | None = None  # the curated config the wandb run shows
    provenance: dict[str, Any] | None = None  # the code: version, git commit, dirty
    metrics: dict[str, Any] | None = None
    per_image: list[dict[str, Any]] | None = None
    per_volume: list[dict[str, Any]] | None = None  # volumetric sources: one row per subject
    checkpoint: str | None = None  # relative to the run folder
    head_weights: str | None = None  # eval jobs: where the head's parameters came from
    source: dict[str, Any] | None = None  # eval jobs: the training run (checkpoint, lineage, run_config, wandb_id)
    metrics_protocol: str | None = None
    metric_definitions: dict[str, Any] | None = None
    boundary_tolerance_px: Any = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    predictions: str | None = None  # PREDICTIONS_FILE, relative to the run folder
    timing: dict[str, Any] | None = None
    wandb: dict[str, Any] | None = None  # {id, name, group, dir, mode[, error]}
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know
    # The keys of the document it was read from, in order: written back as they were read.
    _keys: tuple[str, ...] = field(default=(), repr=False, compare=False)
    location: str | None = field(default=None, repr=False, compare=False)  # not written: see the docstring

    @classmethod
    def new(cls, **values: Any) -> RunRecord:
        """The record a job writes: ``values`` by field name (an unknown name is refused, so a
        typo cannot slip into results.json). results.json holds ``schema``, ``status`` and then
        exactly the fields given, in that order; a field given as None is written as null."""
        known = {f.name for f in fields(cls)} - NOT_IN_DOCUMENT
        if unknown := sorted(set(values) - known):
            raise TypeError(f"RunRecord has no field {', '.join(map(repr, unknown))}")
        return cls.from_dict({"schema": SCHEMA, "status": "complete", **values})

    @classmethod
    def from_dict(cls, document: dict[str, Any], location: str | None = None) -> RunRecord:
        """The record of a results.json document (already in today's schema: see ``migrate``)."""
        if not isinstance(document, dict):
            raise TypeError(f"a run record is a JSON object, not a {type(document).__name__}")
        known = {f.name for f in fields(cls)} - NOT_IN_DOCUMENT
        values = {k: v for k, v in document.items() if k in known}
        extra = {k: v for k, v in document.items() if k not in known}
        return cls(**values, extra=extra, _keys=tuple(document), location=location)

    def to_dict(self) -> dict[str, Any]:
        """The results.json document: the keys it was read with (in their order), then every
        other field that is set, then ``extra``."""
        document: dict[str, Any] = {}
        for key in self._keys:
            document[key] = self.extra[key] if key in self.extra else getattr(self, key)
        for f in fields(self):
            if f.name not in NOT_IN_DOCUMENT and f.name not in document and getattr(self, f.name) is not None:
                document[f.name] = getattr(self, f.name)
        for key, value in self.extra.items():
            document.setdefault(key, value)
        return document

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def write(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename): a reader sees the old file or the new one.
        ``path`` may be the run folder. Undefined numbers (NaN, ±inf) are stored as null."""
        if self.status not in STATUSES:
            raise ValueError(f"RunRecord.status={self.status!r} must be one of {STATUSES}")
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path = path / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "w") as f:
            json.dump(_clean(self.to_dict()), f, indent=2, allow_nan=False)
        return path


def _clean(value: Any) -> Any:
    """JSON has no NaN: store undefined numbers as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _from_schema_0(document: dict[str, Any]) -> dict[str, Any]:
    """Before the schema key: the same layout as schema 1."""
    return {"schema": 1, **document}


# Configs written before components declared their run-only keys in their own config
# (``run_only``, read by segrefine.runconfig): results.json files and checkpoints of earlier
# versions. The keys that were run-only then, by component class; frozen, as old files are.
UNDECLARED_RUN_ONLY = {"segrefine.heads.densecrf.DenseCRFHead": ("num_workers",)}

# schema read -> the step that turns it into the next one; load applies them up to SCHEMA.
MIGRATIONS = {0: _from_schema_0}


def migrate(document: dict[str, Any]) -> dict[str, Any]:
    """A results.json document of any earlier schema, in today's layout."""
    version = document.get("schema", 0)
    if not isinstance(version, int) or version > SCHEMA:
        raise ValueError(f"results.json schema {version!r} is newer than this segrefine reads ({SCHEMA}): "
                         "upgrade segrefine to read it")
    while version < SCHEMA:
        document = MIGRATIONS[version](document)
        version = document["schema"]
    return document


def read_document(path: str | Path) -> Any:
    """The parsed JSON of a results.json (or of ``path/results.json``), unvalidated."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    with open(path) as f:
        return json.load(f)


def load(path: str | Path) -> RunRecord:
    """A results.json (or a run folder holding one) as a ``RunRecord``, migrated from any
    earlier schema; its ``location`` is the run folder."""
    document = read_document(path)
    if not isinstance(document, dict):
        raise ValueError(f"{path} holds a JSON {type(document).__name__}, not a run record")
    path = Path(path)
    return RunRecord.from_dict(migrate(document), location=str(path if path.is_dir() else path.parent))
