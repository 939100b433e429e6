"""Runs into table rows: one row per exact configuration (``group_rows``), labelled by what differs
between rows, each head paired with its baseline (the ``none`` row differing only in the head)
and the kind of pairing (same weights, retrained, seed by seed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from segrefine.analysis.sources import as_records
from segrefine.labels import BACKBONE_WORDS
from segrefine.labels import MAX_LENGTH as LABEL_MAX
from segrefine.record.protocols import Column
from segrefine.record.run_record import RunRecord
from segrefine.runconfig import comparable_config, config_differences


BASELINE_HEAD = "none"
HEAD_ORDER = ("none", "densecrf", "densecrf_tuned", "densecrf_3d", "densecrf_3d_tuned", "crfrnn", "pointrend")


def head_name(run: RunRecord) -> str:
    return str((run.config.get("head") or {}).get("name", run.head))


HEAD_WORDS = {"none": "none", "densecrf": "DenseCRF", "densecrf_tuned": "DenseCRF, tuned", "crfrnn": "CRF-RNN",
              "pointrend": "PointRend"}


def head_words(head: str) -> str:
    return HEAD_WORDS.get(head, head)


def _encoder_words(name: Any) -> str:
    text = str(name)
    if text.startswith("resnet") and text[len("resnet"):].isdigit():
        return f"ResNet-{text[len('resnet'):]}"
    if text.startswith("vgg") and text[len("vgg"):].isdigit():
        return f"VGG-{text[len('vgg'):]}"
    return text


def _value_words(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(_value_words, value))
    return str(value)


def _phrase(key: str, value: Any, flat: dict[str, Any]) -> str | None:
    """``key: value`` in words for a label; None for a value that says "off" (None, False)."""
    if value is None or value is False:
        return None
    leaf = key.rsplit(".", 1)[-1]
    if key == "init_from":
        epochs = flat.get("trainer.max_epochs")
        return f"+{epochs} ep from a trained run" if epochs is not None else "from a trained run"
    if key == "trainer.max_epochs":
        return None if flat.get("init_from") else f"{value} epochs"  # said by the init_from phrase
    if key == "backbone.fine_skip":
        return "stride-4 skip"
    if key == "backbone.output_stride":
        return None if value == 1 else f"output stride {value}"  # 1: full resolution, nothing to say
    if key == "backbone.encoder_name":
        return _encoder_words(value)
    if key == "data.image_size":
        return f"{_value_words(value)} px"
    if key.startswith("callbacks.") and isinstance(value, dict):
        return leaf.replace("_", " ")
    if leaf == "name":
        return str(value)
    if value is True:
        return leaf.replace("_", " ")
    return f"{leaf.replace('_', ' ')} {_value_words(value)}"


def _flatten_for_labels(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys; a callback stays one value, so adding one reads as one phrase."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and not (prefix == "callbacks." and "_target_" in value):
            out.update(_flatten_for_labels(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _backbone_words(flat: dict[str, Any], variants_differ: bool) -> str:
    name = flat.get("backbone.name")
    words = BACKBONE_WORDS.get(str(name), str(name)) if name is not None else ""
    variant = flat.get("backbone.variant")
    if name == "fcn" and variant:  # FCN-8s: the variant is the model's name
        return f"FCN-{variant}"
    if variant and variants_differ:
        return f"{words} ({variant})"
    return words


def config_labels(configs: list[dict[str, Any]]) -> list[str]:
    """A short label in words per config (the head aside): the backbone, then what differs
    between the configs, leaving out values that say "off" (None, False) and each key's most
    common value (within the backbone for ``backbone.*`` keys), e.g. ``FCN-8s, stride-4 skip``,
    ``U-Net, +4 ep from a trained run``, ``FCN-8s, ResNet-34, 320 px``. At most 60 characters."""
    flat = [_flatten_for_labels(c) for c in configs]
    differing = sorted({k for f in flat[1:] for k in config_differences(flat[0], f)}) if len(flat) > 1 else []
    keys = [k for k in differing if k.split(".")[0] != "head" and not k.endswith("_target_")
            and k not in ("backbone.name", "backbone.variant")]

    def same(a: Any, b: Any) -> bool:
        return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)

    usual_values: dict[tuple[str, str], Any] = {}  # (key, its scope's backbone) -> the most common value

    def usual(key: str, f: dict[str, Any]) -> Any:
        backbone = repr(f.get("backbone.name")) if key.startswith("backbone.") else ""
        if (key, backbone) not in usual_values:
            scope = [g for g in flat if not backbone or g.get("backbone.name") == f.get("backbone.name")]
            values = [json.dumps(g.get(key), sort_keys=True, default=str) for g in scope]
            usual_values[key, backbone] = json.loads(max(values, key=values.count))  # ties: the first seen
        return usual_values[key, backbone]

    variants: dict[Any, set] = {}  # backbone name -> its variants
    for g in flat:
        variants.setdefault(g.get("backbone.name"), set()).add(g.get("backbone.variant"))

    def label(f: dict[str, Any], level: int) -> str:
        """level 0: usual values left out; 1: only "off" values left out; 2: every differing key."""
        parts = [_backbone_words(f, len(variants[f.get("backbone.name")]) > 1)]
        for key in keys:
            value = f.get(key)
            if level == 0 and same(value, usual(key, f)) and not (key == "trainer.max_epochs" and f.get("init_from")):
                continue
            phrase = _phrase(key, value, f) if level < 2 else f"{key.rsplit('.', 1)[-1]} {_value_words(value)}"
            if phrase and phrase not in parts:
                parts.append(phrase)
        text = ", ".join(p for p in parts if p) or "all runs"
        return text if len(text) <= LABEL_MAX else text[:LABEL_MAX - 1] + "…"

    without_head = [json.dumps({k: v for k, v in f.items() if k.split(".")[0] != "head"}, sort_keys=True, default=str)
                    for f in flat]
    levels = [0] * len(flat)
    labels = [label(f, 0) for f in flat]
    for level in (1, 2):  # configurations that differ outside the head never share a label
        for i in range(len(flat)):
            if any(labels[j] == labels[i] and without_head[j] != without_head[i] for j in range(len(flat))):
                levels[i] = level
        labels = [label(f, lv) for f, lv in zip(flat, levels)]
    return labels


def given_label(runs: Iterable[RunRecord]) -> str | None:
    """The label a user or study gave every run of a row (config ``label``), if they agree."""
    labels = {str((run.config or {}).get("label") or "") for run in runs}
    return labels.pop() or None if len(labels) == 1 else None


@dataclass
class Row:
    config: dict[str, Any]  # comparable config without the seed
    runs: dict[Any, RunRecord]  # seed -> run
    label: str = ""
    head: str = ""
    baseline: "Row | None" = None
    pairing: str = ""  # same weights | retrained | mixed
    notes: list[str] = field(default_factory=list)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # per paired column key
    same_as: "Row | None" = None  # an earlier row with the same per-image values and baseline: not tested again
    plain: "Row | None" = None  # the backbone's own `none` when the baseline is a matched control (PointRend's)
    plain_stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # Δ against ``plain``

    @property
    def seeds(self) -> list[Any]:
        return sorted(self.runs, key=str)


def group_rows(runs: Iterable[RunRecord | dict[str, Any]]) -> tuple[list[Row], list[tuple[str, str]]]:
    """Rows of exact configurations, and duplicates (same config and seed: listed, not used).
    ``runs``: records (``load_study``'s), or results.json dicts, read as records."""
    groups: dict[str, tuple[dict, dict[Any, list[RunRecord]]]] = {}
    for run in as_records(runs):
        config = comparable_config(run.config, drop=("seed",))
        key = json.dumps(config, sort_keys=True, default=str)
        groups.setdefault(key, (config, {}))[1].setdefault(run.config.get("seed", run.seed), []).append(run)
    rows, duplicates = [], []
    for config, by_seed in groups.values():
        kept = {}
        for seed, members in by_seed.items():
            if len(members) == 1:
                kept[seed] = members[0]
                continue
            where = ", ".join(str(m.location) for m in members)
            for m in members:
                duplicates.append((str(m.location), f"duplicate: same config and seed {seed} as {where}; "
                                                    "not averaged, remove all but one"))
        if kept:
            rows.append(Row(config=config, runs=kept, head=head_name(next(iter(kept.values())))))
    generated = config_labels([r.config for r in rows])
    for row, label in zip(rows, generated):
        row.label = given_label(row.runs.values()) or label
    # A given label is a name, not a description: two configurations of one head carrying the
    # same one (a user who labelled a whole sweep alike) fall back to the labels in words.
    clashing = {(r.label, r.head) for r in rows if sum((o.label, o.head) == (r.label, r.head) for o in rows) > 1}
    for row, label in zip(rows, generated):
        if (row.label, row.head) in clashing:
            row.label = label
    _label_head_variants(rows)
    _find_baselines(rows)
    _find_plain_baselines(rows)
    rows.sort(key=_table_order)
    return rows, duplicates


def _table_order(row: Row) -> tuple:
    """Grouped by backbone; within it each baseline first, then the heads paired with it."""
    order = {h: i for i, h in enumerate(HEAD_ORDER)}
    base = row if row.head == BASELINE_HEAD else row.baseline
    backbone = str((row.config.get("backbone") or {}).get("name", ""))
    anchor = base.label if base is not None else row.label
    return (backbone, base is None, len(anchor), anchor, row is not base, order.get(row.head, len(order)), row.head,
            row.label, json.dumps(row.config, sort_keys=True, default=str))


def _find_baselines(rows: list[Row]) -> None:
    """Each head's baseline: the ``none`` row whose config differs only in ``head``."""
    bases = [r for r in rows if r.head == BASELINE_HEAD]
    for row in rows:
        if row.head == BASELINE_HEAD:
            continue
        matches = [b for b in bases if all(k.startswith("head.") for k in config_differences(row.config, b.config))]
        if len(matches) == 1:
            row.baseline = matches[0]
        elif not matches:
            row.notes.append("unpaired: no `none` row whose config differs only in the head")
        else:
            row.notes.append(f"unpaired: {len(matches)} `none` rows differ only in the head")


def _output_stride(row: Row) -> Any:
    return (row.config.get("backbone") or {}).get("output_stride")


def _find_plain_baselines(rows: list[Row]) -> None:
    """A row whose baseline is a matched control (the backbone stopped at a coarser output
    stride, as PointRend's U-Net) also gets the plain backbone's ``none``: the row that differs
    from the baseline only in ``backbone.output_stride``, at a finer one."""
    bases = [r for r in rows if r.head == BASELINE_HEAD]
    for row in rows:
        if row.baseline is None or not isinstance(_output_stride(row.baseline), (int, float)):
            continue
        matches = [b for b in bases if b is not row.baseline
                   and config_differences(row.baseline.config, b.config) == ["backbone.output_stride"]
                   and isinstance(_output_stride(b), (int, float)) and _output_stride(b) < _output_stride(row.baseline)]
        if matches:
            row.plain = min(matches, key=_output_stride)


def _label_head_variants(rows: list[Row]) -> None:
    """Rows that share label and head name differ in head settings: name those in the label."""
    clashes: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        clashes.setdefault((row.label, row.head), []).append(row)
    for same in clashes.values():
        if len(same) < 2:
            continue
        flat = [_flatten_for_labels(r.config.get("head") or {}, "head.") for r in same]
        keys = sorted({k for f in flat[1:] for k in config_differences(flat[0], f)})
        for row, f in zip(same, flat):
            row.label = ", ".join([row.label, *(f"head {k.rsplit('.', 1)[-1]} {_value_words(f.get(k, '–'))}"
                                                for k in keys)])


def pairing_kind(run: RunRecord, base: RunRecord) -> str:
    """*same weights* when ``run`` evaluated the baseline's own checkpoint under another head."""
    source = run.source if run.job_type == "eval" else None
    if not isinstance(source, dict):
        return "retrained"
    if isinstance(source.get("run_config"), dict):
        # Compared without the seed on both sides, the seed separately, so either form of the record works.
        same = (comparable_config(source["run_config"], drop=("seed",)) == comparable_config(base.config, drop=("seed",))
                and source.get("seed", source["run_config"].get("seed")) == base.config.get("seed"))
    elif source.get("run_id") and (base.wandb or {}).get("id"):  # read from wandb: the training run's id
        same = source["run_id"] == base.wandb["id"]
    else:  # evaluations recorded before the source's config was stored (no job_type: a training run)
        same = source.get("head") == head_name(base) and base.job_type in (None, "train")
    return "same weights" if same else "retrained"


# -- statistics --------------------------------------------------------------------------


def run_value(run: RunRecord, column: Column) -> float | None:
    """A run's number for a column: its metric, else (paired columns) the mean of its per-image rows."""
    value = run.metrics.get(column.key)
    if value is None and column.per_image and run.per_image:
        values = [r.get(column.per_image) for r in run.per_image]
        if all(isinstance(v, (int, float)) for v in values):
            value = float(np.mean(values))
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def mean_spread(values: list[float | None]) -> tuple[float, float | None, int]:
    """(mean, sample std or None when n = 1, n); NaN mean when any value is missing."""
    if not values or any(v is None for v in values):
        return math.nan, None, len(values)
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None), len(values)


