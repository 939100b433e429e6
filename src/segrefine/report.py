"""Rebuild the results table from runs: ``segrefine-report DIR [DIR ...] [--metrics P] [--out DIR]``.

Reads every ``results.json`` under the given folders (or, with ``--wandb ENTITY/PROJECT``,
the runs of one experiment of an online wandb project: ``--experiment``, ``--group``,
``--job-type``, ``--tag`` select them). One row per exact configuration: the resolved config
without the seed and run-only keys (``segrefine.runconfig.comparable_config``), labelled by
what differs between rows; the seeds of a row are its replicates. Each head is paired with
the ``none`` row whose config differs only in the head, seed with seed and image with
image: per seed the mean per-image difference (the aggregation of the column beside it),
across seeds its mean. The inference follows the design (``paired_stats``): with two or more
seeds a t-interval and an exact sign-flip p on the per-seed Δ; with one seed on the same
weights a test conditional on that model over its images (or subjects, when rows name them),
marked †; with one retrained model per side no test. Holm's correction runs within the
across-seed and the conditional family separately. ``benchmarks/calibration.py`` shows by
simulation that the stars and intervals hold their nominal rates.
Runs that did not complete, duplicates and non-test evaluations are listed, never averaged.
Writes Markdown, CSV, LaTeX and figures (from saved predictions; nothing is re-run) and
prints the Markdown.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from segrefine.results import FILENAME
from segrefine.runconfig import comparable_config, config_differences

BASELINE_HEAD = "none"
HEAD_ORDER = ("none", "densecrf", "crfrnn", "pointrend")
BOOTSTRAP_SAMPLES = 10_000
EXACT_PERMUTATION_MAX = 16  # exact sign-flip enumeration up to 2**16 patterns
MONTE_CARLO_RESAMPLES = 9_999  # beyond: Monte Carlo sign flips, p >= 1 / 10 000
ALPHA = 0.05


@dataclass(frozen=True)
class Column:
    """A table column: results.json metric key, title, per-image row key (paired columns)."""

    key: str
    title: str
    per_image: str | None = None
    scale: float = 100.0
    per_volume: str | None = None  # per-volume row key: paired subject by subject


# Pooled columns are shown as they are; paired columns are image means, each with a Δ beside it.
PROTOCOLS = {
    "standard": {
        "pooled": (
            Column("test/iou", "IoU % (pooled)"),
            Column("test/dice", "Dice % (pooled)"),
            Column("test/pixel_acc", "PA % (pooled)"),
            Column("test/boundary_f1", "BF1 % (pooled)"),
        ),
        "paired": (
            Column("test/iou_image", "IoU % (img mean)", "iou"),
            Column("test/boundary_f1_image", "BF1 % (img mean)", "boundary_f1"),
        ),
    },
    "unet_crfrnn": {
        "pooled": (),
        "paired": (
            Column("test/unet_crfrnn/iu", "IU %", "unet_crfrnn/iu"),
            Column("test/unet_crfrnn/dsc", "DSC %", "unet_crfrnn/dsc"),
            Column("test/unet_crfrnn/pa", "PA (fg recall) %", "unet_crfrnn/pa"),
        ),
    },
}
COST = Column("test/ms_per_image", "ms/img", scale=1.0)
BASE_PROTOCOLS = tuple(PROTOCOLS)
# Volumetric runs (results.json with per_volume rows: one per subject's restacked volume) are
# compared per volume first: the subject is the unit, distances in mm.
VOLUME_COLUMNS = (
    Column("test/volume/dice", "Dice % (vol mean)", per_volume="dice"),
    Column("test/volume/nsd", "NSD % (vol mean)", per_volume="nsd"),
    Column("test/volume/hd95", "HD95 mm (vol mean)", scale=1.0, per_volume="hd95"),
)
VOLUME = "/volume"
for _name in BASE_PROTOCOLS:
    PROTOCOLS[_name + VOLUME] = {"pooled": PROTOCOLS[_name]["pooled"],
                                 "paired": (*VOLUME_COLUMNS, *PROTOCOLS[_name]["paired"])}
PROTOCOL_NOTES = {
    "standard": "standard protocol: IoU/Dice over foreground classes; *pooled* = over the split's confusion "
                "matrix; *img mean* = per-image values averaged over images (the aggregation the Δ uses).",
    "unet_crfrnn": "unet_crfrnn protocol (the origin study's evaluation, C classes): per image IU and DSC over all "
                   "classes including background, or over background and one merged foreground in runs with "
                   "metrics.merge_foreground=true (0 for a class empty in prediction or truth; DSC +1 smoothed), "
                   "PA = foreground recall (not pixel accuracy), each averaged over images.",
}
VOLUME_NOTE = ("Volumes: each subject's slices restacked (padding removed) and scored as one volume: Dice, NSD "
               "(surface Dice at the recorded tolerance) and HD95 in mm (lower is better; infinite where a class is "
               "missed or hallucinated, and then no Δ is computed) per foreground class, averaged; every volume Δ "
               "pairs subject with subject, and slice metrics are clustered by subject: the subject is the unit.")
for _name in BASE_PROTOCOLS:
    PROTOCOL_NOTES[_name + VOLUME] = PROTOCOL_NOTES[_name] + " " + VOLUME_NOTE


@dataclass
class Study:
    runs: list[dict[str, Any]] = field(default_factory=list)
    incomplete: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # complete, but not table material


# -- loading ---------------------------------------------------------------------------


# Metric values a results.json may hold: fractions in [0, 1], times, distances and counts >= 0.
# Keys are matched by their last path part (``test/unet_crfrnn/iu`` -> ``iu``), which may carry
# a suffix (``iou_image``, ``dice_<class>``); keys not listed are not checked.
FRACTION_METRICS = ("iou", "dice", "pixel_acc", "boundary_f1", "iu", "dsc", "pa", "nsd")
NON_NEGATIVE_METRICS = ("ms_per_image", "fit_seconds", "hd95", "params", "trainable", "steps")


def metric_range(key: str) -> tuple[float, float] | None:
    """The values ``key`` can take, or None when segrefine defines no range for it."""
    leaf = key.rsplit("/", 1)[-1]
    matches = lambda names: any(leaf == n or leaf.startswith(n + "_") for n in names)  # noqa: E731
    if matches(FRACTION_METRICS):
        return (0.0, 1.0)
    if matches(NON_NEGATIVE_METRICS):
        return (0.0, math.inf)
    return None


def out_of_range(run: dict[str, Any]) -> list[str]:
    """``key=value`` for every metric (and per-image value) outside the range it can take."""
    found = []
    for key, value in run.get("metrics", {}).items():
        bounds = metric_range(key)
        if bounds and isinstance(value, (int, float)) and math.isfinite(value) and not bounds[0] <= value <= bounds[1]:
            found.append(f"{key}={value:g}")
    for row in [*(run.get("per_image") or ()), *(run.get("per_volume") or ())]:
        for key, value in row.items():
            bounds = None if key in ("id", "subject", "n_slices", "spacing", "infinite") else metric_range(key)
            if bounds and isinstance(value, (int, float)) and math.isfinite(value) and not bounds[0] <= value <= bounds[1]:
                found.append(f"{'per_image' if 'id' in row else 'per_volume'}[{row.get('id', row.get('subject'))}]"
                             f".{key}={value:g}")
    return found



def check_run(run: Any) -> str | None:
    """Why a parsed results.json cannot go into the table (None if it can)."""
    if not isinstance(run, dict):
        return f"{FILENAME} holds a JSON {type(run).__name__}, not a run record"
    if run.get("status") == "interrupted":
        return f"interrupted by {run.get('signal') or 'a signal'}: not finished (its command resumes it)"
    if run.get("status") != "complete":
        return f"status {run.get('status')!r}"
    if not isinstance(run.get("config"), dict) or not run["config"]:
        return "no config recorded: its configuration cannot be told"
    if not isinstance(run.get("metrics"), dict):
        return "no metrics recorded"
    per_image = run.get("per_image", [])
    if not isinstance(per_image, list) or not all(isinstance(r, dict) and "id" in r for r in per_image):
        return "per_image is not a list of rows with ids"
    bad = out_of_range(run)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        return f"metrics outside the range they can take ({shown}): fractions lie in [0, 1], times and counts >= 0"
    return None


def _error_reason(job: Path) -> str:
    error = job / "error.txt"
    if not error.exists():
        return f"no {FILENAME} (failed or still running)"
    try:
        lines = error.read_text(errors="replace").strip().splitlines()
    except OSError as e:
        return f"failed (error.txt unreadable: {e})"
    return f"failed: {lines[0]}" if lines else "failed (error.txt is empty)"


def load_study(paths: Iterable[str | Path]) -> Study:
    """Complete test runs (each with ``_path``), other complete runs (skipped) and broken run folders."""
    study = Study()
    seen: set[Path] = set()  # run folders by resolved path: overlapping arguments list each run once
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"report: {root} does not exist")
        for result in sorted(root.rglob(FILENAME)):
            if result.parent.resolve() in seen:
                continue
            seen.add(result.parent.resolve())
            where = str(result.parent)
            try:
                run = json.loads(result.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                study.incomplete.append((where, f"unreadable {FILENAME}: {e}"))
                continue
            reason = check_run(run)
            if reason:
                study.incomplete.append((where, reason))
                continue
            split = run.get("split", "test")
            if split != "test":
                study.skipped.append((where, f"split {split!r} (tuning evaluation), not a test result"))
                continue
            run["_path"] = where
            study.runs.append(run)
        # A Hydra job folder without results.json: started but never finished.
        for hydra_dir in sorted(root.rglob(".hydra")):
            job = hydra_dir.parent
            if job.resolve() in seen:
                continue
            seen.add(job.resolve())
            if not (job / FILENAME).exists() and (hydra_dir / "config.yaml").exists():
                study.incomplete.append((str(job), _error_reason(job)))
    return study


WANDB_EXTRA_KEYS = ("experiment", "provenance", "split", "source")  # beside the curated config in a wandb run's config
_NON_FINITE = {"nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}


def wandb_filters(group: str | None = None, job_type: str | None = None, experiment: str | None = None,
                  tags: Iterable[str] = ()) -> dict[str, Any] | None:
    """The server-side query (MongoDB-style, as ``wandb.Api().runs(filters=...)`` takes it);
    None when nothing is asked. Runs from before the ``experiment`` config key name their
    experiment by their group, so ``experiment`` matches either."""
    conditions: list[dict[str, Any]] = []
    if group is not None:
        conditions.append({"group": group})
    if job_type is not None:
        conditions.append({"jobType": job_type})
    if experiment is not None:
        conditions.append({"$or": [{"config.experiment": experiment},
                                   {"$and": [{"config.experiment": {"$exists": False}}, {"group": experiment}]}]})
    conditions += [{"tags": {"$in": [tag]}} for tag in tags]  # one condition per tag: all must be present
    if not conditions:
        return None
    return conditions[0] if len(conditions) == 1 else {"$and": conditions}


def _undefined_as_none(value: Any) -> Any:
    """What results.json stores for a number that is not one (NaN, ±inf): null. wandb keeps
    them as floats or as the strings ``NaN``/``Infinity``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str) and value.strip().lower() in _NON_FINITE:
        return None
    return value


def _summary_number(value: Any) -> tuple[bool, Any]:
    """(is a metric, its value): numbers, and NaN/inf however wandb wrote them, as None."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number or (isinstance(value, str) and _undefined_as_none(value) is None):
        return True, _undefined_as_none(value)
    return False, None


def load_wandb_study(project: str, api: Any = None, *, group: str | None = None, job_type: str | None = None,
                     experiment: str | None = None, tags: Iterable[str] = ()) -> Study:
    """Runs of an online wandb project (``ENTITY/PROJECT``) as results.json-like dicts.

    Filters (``group``, ``job_type``, ``experiment`` = the config's ``experiment``, or the
    group of runs from before that key; ``tags``: all must be present) are sent to the server
    and checked again here. Runs of more than one experiment are refused unless
    ``experiment`` chooses one: different studies must not average together, nor pair a
    head with another study's baseline. The config is the run's curated config without the
    keys logged beside it (``WANDB_EXTRA_KEYS``); per-image rows come from each run's
    ``test/per_image`` table, NaN as null (as in results.json). Tuning evaluations
    (``split`` val) are listed as skipped.
    """
    tags = tuple(tags)
    if api is None:
        import wandb

        api = wandb.Api()
    filters = wandb_filters(group, job_type, experiment, tags)
    study = Study()
    experiments: dict[str, int] = {}
    for run in api.runs(project, filters=filters):
        config = dict(run.config)
        extras = {key: config.pop(key) for key in WANDB_EXTRA_KEYS if key in config}
        run_experiment = extras.get("experiment") if "experiment" in extras else run.group
        if not _wandb_run_matches(run, run_experiment, group, job_type, experiment, tags):
            continue  # the server's filter let it through; the selection is what was asked for
        experiments[str(run_experiment)] = experiments.get(str(run_experiment), 0) + 1
        name = f"{project}/{run.id}"
        split = extras.get("split") or "test"
        if run.state != "finished":
            study.incomplete.append((name, f"wandb state {run.state!r}"))
            continue
        if split != "test":
            study.skipped.append((name, f"split {split!r} (tuning evaluation), not a test result"))
            continue
        if "test/iou" not in run.summary:
            study.incomplete.append((name, "finished without test metrics (no test/iou in its summary)"))
            continue
        metrics = {}
        for key, value in dict(run.summary).items():
            is_metric, number = _summary_number(value)
            if is_metric:
                metrics[key] = number
        record = {
            "status": "complete",
            "job_type": run.job_type,
            "experiment": run_experiment,
            "seed": config.get("seed"),
            "split": split,
            "config": config,  # the curated config (older runs: the resolved one); rows compare it as for folders
            "metrics": metrics,
            "per_image": _wandb_per_image(run),
            "wandb": {"id": run.id},
            "_path": name,
        }
        # Curated configs drop metrics.protocol (a run-only key): read it where a run recorded it.
        metrics_cfg = run.config.get("metrics")
        protocol = run.summary.get("metrics_protocol") or (metrics_cfg.get("protocol") if isinstance(metrics_cfg, dict)
                                                            else None)
        if isinstance(protocol, str):
            record["metrics_protocol"] = protocol
        if isinstance(extras.get("source"), dict):
            record["source"] = extras["source"]
        reason = check_run(record)
        if reason:
            study.incomplete.append((name, reason))
        else:
            study.runs.append(record)
    if experiment is None and len(experiments) > 1:
        listed = ", ".join(f"{e} ({n} run{'s' if n != 1 else ''})" for e, n in sorted(experiments.items()))
        raise ValueError(
            f"{project} holds runs of {len(experiments)} experiments: {listed}. Different studies must not "
            "average together nor share baselines; choose one with --experiment NAME (experiment= in Python)"
        )
    return study


def _wandb_run_matches(run: Any, run_experiment: Any, group: str | None, job_type: str | None,
                       experiment: str | None, tags: tuple[str, ...]) -> bool:
    return ((group is None or run.group == group)
            and (job_type is None or run.job_type == job_type)
            and (experiment is None or run_experiment == experiment)
            and set(tags) <= set(run.tags or ()))


def _wandb_per_image(run: Any) -> list[dict[str, Any]]:
    entry = run.summary.get("test/per_image")
    if not entry or "path" not in entry:
        return []
    root = Path.home() / ".cache" / "segrefine" / "wandb" / str(run.id)
    with run.file(entry["path"]).download(replace=True, root=str(root)) as f:
        table = json.load(f)  # Python's json reads a bare NaN as float nan
    return [{c: (v if c == "id" else _undefined_as_none(v)) for c, v in zip(table["columns"], row)}
            for row in table["data"]]


def study_protocol(runs: list[dict[str, Any]], requested: str | None) -> str:
    """``requested``, or the protocol every run recorded (``metrics=...``); refuses a mix. When
    every run has per-volume rows, the protocol's ``/volume`` form: volume columns first."""
    volumetric = bool(runs) and all(run.get("per_volume") for run in runs)
    if requested is not None:
        base = requested.removesuffix(VOLUME)
        if base not in BASE_PROTOCOLS:
            raise ValueError(f"--metrics {requested!r}: choose one of {', '.join(BASE_PROTOCOLS)}")
        return base + VOLUME if volumetric else base
    recorded = {run.get("metrics_protocol") or "standard" for run in runs}
    if len(recorded) > 1:
        raise ValueError(
            f"the runs were made with different metric protocols ({', '.join(sorted(recorded))}); "
            f"choose the table's with --metrics {'|'.join(BASE_PROTOCOLS)}"
        )
    base = recorded.pop() if recorded else "standard"
    return base + VOLUME if volumetric else base


# -- rows: one per exact configuration --------------------------------------------------------


def head_name(run: dict[str, Any]) -> str:
    return str((run["config"].get("head") or {}).get("name", run.get("head")))


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


BACKBONE_WORDS = {"fcn": "FCN", "unet": "U-Net", "pspnet": "PSPNet", "segnet": "SegNet"}
HEAD_WORDS = {"none": "none", "densecrf": "DenseCRF", "densecrf_tuned": "DenseCRF, tuned", "crfrnn": "CRF-RNN",
              "pointrend": "PointRend"}
LABEL_MAX = 60


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

    def usual(key: str, f: dict[str, Any]) -> Any:
        scope = [g for g in flat if not key.startswith("backbone.") or g.get("backbone.name") == f.get("backbone.name")]
        values = [json.dumps(g.get(key), sort_keys=True, default=str) for g in scope]
        return json.loads(max(values, key=values.count))  # ties: the first seen

    def label(f: dict[str, Any], level: int) -> str:
        """level 0: usual values left out; 1: only "off" values left out; 2: every differing key."""
        variants = {g.get("backbone.variant") for g in flat if g.get("backbone.name") == f.get("backbone.name")}
        parts = [_backbone_words(f, len(variants) > 1)]
        for key in keys:
            value = f.get(key)
            if level == 0 and same(value, usual(key, f)) and not (key == "trainer.max_epochs" and f.get("init_from")):
                continue
            phrase = _phrase(key, value, f) if level < 2 else f"{key.rsplit('.', 1)[-1]} {_value_words(value)}"
            if phrase and phrase not in parts:
                parts.append(phrase)
        text = ", ".join(p for p in parts if p) or "all runs"
        return text if len(text) <= LABEL_MAX else text[:LABEL_MAX - 1] + "…"

    def without_head(f: dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in f.items() if k.split(".")[0] != "head"}, sort_keys=True, default=str)

    levels = [0] * len(flat)
    labels = [label(f, 0) for f in flat]
    for level in (1, 2):  # configurations that differ outside the head never share a label
        for i, f in enumerate(flat):
            if any(labels[j] == labels[i] and without_head(g) != without_head(f) for j, g in enumerate(flat)):
                levels[i] = level
        labels = [label(f, lv) for f, lv in zip(flat, levels)]
    return labels


def given_label(runs: Iterable[dict[str, Any]]) -> str | None:
    """The label a user or study gave every run of a row (config ``label``), if they agree."""
    labels = {str((run.get("config") or {}).get("label") or "") for run in runs}
    return labels.pop() or None if len(labels) == 1 else None


@dataclass
class Row:
    config: dict[str, Any]  # comparable config without the seed
    runs: dict[Any, dict[str, Any]]  # seed -> run
    label: str = ""
    head: str = ""
    baseline: "Row | None" = None
    pairing: str = ""  # same weights | retrained | mixed
    notes: list[str] = field(default_factory=list)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # per paired column key
    same_as: "Row | None" = None  # an earlier row with the same per-image values and baseline: not tested again
    plain: "Row | None" = None  # the backbone's own `none` when the baseline is a matched control (PointRend's)
    plain_stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # Δ against ``plain``

    @staticmethod
    def value(run: dict[str, Any], column: Column) -> float | None:
        return run_value(run, column)

    @property
    def seeds(self) -> list[Any]:
        return sorted(self.runs, key=str)


def group_rows(runs: list[dict[str, Any]]) -> tuple[list[Row], list[tuple[str, str]]]:
    """Rows of exact configurations, and duplicates (same config and seed: listed, not used)."""
    groups: dict[str, tuple[dict, dict[Any, list[dict]]]] = {}
    for run in runs:
        config = comparable_config(run["config"], drop=("seed",))
        key = json.dumps(config, sort_keys=True, default=str)
        groups.setdefault(key, (config, {}))[1].setdefault(run["config"].get("seed", run.get("seed")), []).append(run)
    rows, duplicates = [], []
    for config, by_seed in groups.values():
        kept = {}
        for seed, members in by_seed.items():
            if len(members) == 1:
                kept[seed] = members[0]
                continue
            where = ", ".join(m["_path"] for m in members)
            for m in members:
                duplicates.append((m["_path"], f"duplicate: same config and seed {seed} as {where}; not averaged, "
                                               "remove all but one"))
        if kept:
            rows.append(Row(config=config, runs=kept, head=head_name(next(iter(kept.values())))))
    for row, label in zip(rows, config_labels([r.config for r in rows])):
        row.label = given_label(row.runs.values()) or label
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
        flat = [_flatten(r.config.get("head") or {}, "head.") for r in same]
        keys = sorted({k for f in flat[1:] for k in config_differences(flat[0], f)})
        for row, f in zip(same, flat):
            row.label = ", ".join([row.label, *(f"head {k.rsplit('.', 1)[-1]} {_value_words(f.get(k, '–'))}"
                                                for k in keys)])


def _pairing_kind(run: dict[str, Any], base: dict[str, Any]) -> str:
    """*same weights* when ``run`` evaluated the baseline's own checkpoint under another head."""
    source = run.get("source") if run.get("job_type") == "eval" else None
    if not isinstance(source, dict):
        return "retrained"
    if isinstance(source.get("run_config"), dict):
        # Compared without the seed on both sides, the seed separately, so either form of the record works.
        same = (comparable_config(source["run_config"], drop=("seed",)) == comparable_config(base["config"], drop=("seed",))
                and source.get("seed", source["run_config"].get("seed")) == base["config"].get("seed"))
    elif source.get("run_id") and (base.get("wandb") or {}).get("id"):  # read from wandb: the training run's id
        same = source["run_id"] == base["wandb"]["id"]
    else:  # evaluations recorded before the source's config was stored
        same = source.get("head") == head_name(base) and base.get("job_type", "train") == "train"
    return "same weights" if same else "retrained"


# -- statistics --------------------------------------------------------------------------


def run_value(run: dict[str, Any], column: Column) -> float | None:
    """A run's number for a column: its metric, else (paired columns) the mean of its per-image rows."""
    value = run["metrics"].get(column.key)
    if value is None and column.per_image and run.get("per_image"):
        values = [r.get(column.per_image) for r in run["per_image"]]
        if all(isinstance(v, (int, float)) for v in values):
            value = float(np.mean(values))
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def mean_spread(values: list[float | None]) -> tuple[float, float | None, int]:
    """(mean, sample std or None when n = 1, n); NaN mean when any value is missing."""
    if not values or any(v is None for v in values):
        return math.nan, None, len(values)
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None), len(values)


@dataclass
class ImageDifferences:
    """Per-image ``run - base`` of one seed: ``values`` over the finite pairs, sorted by id;
    ``subjects`` (the cluster of each value) when every image row names its subject."""

    values: np.ndarray
    subjects: np.ndarray | None = None
    dropped: int = 0  # pairs with a non-finite (or null) value on either side
    unit: str = "images"  # what one value is: an image, or (per-volume metrics) a subject


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def image_differences(run: dict[str, Any], base: dict[str, Any], key: str) -> tuple[ImageDifferences | None, str]:
    """Per-image ``run - base`` on ``key``, images matched by id; (None, why) if they do not pair.

    A null/NaN/inf value is missing data: its pair is dropped and counted (never a number in
    the Δ); when no pair is left the Δ is not computed."""
    ours = {r["id"]: r for r in run.get("per_image", [])}
    theirs = {r["id"]: r for r in base.get("per_image", [])}
    if not ours or not theirs:
        return None, "no per-image rows"
    if set(ours) != set(theirs):
        return None, f"test images differ ({len(set(ours) ^ set(theirs))} ids in one run only)"
    ids = sorted(ours)
    if any(key not in ours[i] or key not in theirs[i] for i in ids):
        return None, f"per-image {key} not recorded"
    kept = [i for i in ids if _finite(ours[i][key]) and _finite(theirs[i][key])]
    if not kept:
        return None, f"every per-image {key} pair has a non-finite value"
    values = np.array([ours[i][key] - theirs[i][key] for i in kept], dtype=np.float64)
    subjects = None
    named = [ours[i].get("subject", theirs[i].get("subject")) for i in kept]  # older runs may not record it
    if all(name is not None for name in named):
        if any(None not in (ours[i].get("subject"), theirs[i].get("subject"))
               and ours[i]["subject"] != theirs[i]["subject"] for i in kept):
            return None, "the runs assign the same image ids to different subjects"
        subjects = np.array([str(name) for name in named])
    return ImageDifferences(values, subjects, len(ids) - len(kept)), ""


def volume_differences(run: dict[str, Any], base: dict[str, Any], key: str) -> tuple[ImageDifferences | None, str]:
    """Per-subject ``run - base`` of a per-volume metric, subjects matched by name; (None, why)
    when they do not pair or a value is infinite (a missed class: no finite Δ exists)."""
    ours = {str(r.get("subject")): r for r in run.get("per_volume") or []}
    theirs = {str(r.get("subject")): r for r in base.get("per_volume") or []}
    if not ours or not theirs:
        return None, "no per-volume rows"
    if set(ours) != set(theirs):
        return None, f"test subjects differ ({len(set(ours) ^ set(theirs))} in one run only)"
    subjects = sorted(ours)
    infinite = [s for s in subjects if key in (ours[s].get("infinite") or ()) or key in (theirs[s].get("infinite") or ())]
    if infinite:
        return None, (f"per-volume {key} is infinite for {len(infinite)} subject(s) (a class missed or hallucinated): "
                      "no finite Δ")
    kept = [s for s in subjects if _finite(ours[s].get(key)) and _finite(theirs[s].get(key))]
    if not kept:
        return None, f"every per-volume {key} pair has a missing value"
    values = np.array([ours[s][key] - theirs[s][key] for s in kept], dtype=np.float64)
    return ImageDifferences(values, None, len(subjects) - len(kept), unit="subjects"), ""


def cluster_totals(values: np.ndarray, clusters: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(sum of the values, number of values) per cluster; each value its own cluster when None."""
    if clusters is None:
        return values.astype(np.float64), np.ones(len(values))
    names, index = np.unique(clusters, return_inverse=True)
    return np.bincount(index, weights=values, minlength=len(names)), np.bincount(index, minlength=len(names)).astype(float)


def t_quantile(df: float, confidence: float = 0.95) -> float:
    from scipy.special import stdtrit  # scipy.special loads in ~0.1 s; scipy.stats takes 1.5 s

    return float(stdtrit(df, 0.5 + confidence / 2))


def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of independent values (n - 1 degrees of freedom)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    half = t_quantile(n - 1, confidence) * values.std(ddof=1) / math.sqrt(n)
    return float(values.mean() - half), float(values.mean() + half)


def clustered_t_interval(values: np.ndarray, clusters: np.ndarray | None, confidence: float = 0.95) -> tuple[float, float]:
    """Interval of the mean of ``values`` whose clusters (subjects) are the independent units:
    the cluster-robust standard error (CR1) with k - 1 degrees of freedom for k clusters. With
    one value per cluster, or clusters of equal size, it is the t-interval of the cluster means."""
    totals, sizes = cluster_totals(values, clusters)
    k, mean = len(totals), float(values.mean())
    variance = k / (k - 1) * float(np.sum((totals - sizes * mean) ** 2)) / float(sizes.sum()) ** 2
    half = t_quantile(k - 1, confidence) * math.sqrt(variance)
    return mean - half, mean + half


def hierarchical_bootstrap(per_seed: list[np.ndarray], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> np.ndarray:
    """Bootstrap means of the mean Δ: resample seeds, then images within each drawn seed.

    Not what the table's intervals use: with few seeds its percentile interval is far too
    narrow (benchmarks/calibration.py measures its coverage beside the t-interval's)."""
    rng = np.random.default_rng(seed)
    n = len(per_seed)
    pick = rng.integers(0, n, (samples, n))
    values = np.empty((samples, n))
    for s, diffs in enumerate(per_seed):
        where = np.nonzero(pick == s)
        count, m = len(where[0]), len(diffs)
        means = np.empty(count)
        chunk = max(1, 2_000_000 // max(m, 1))  # bounded memory for large test sets
        for start in range(0, count, chunk):
            stop = min(count, start + chunk)
            means[start:stop] = diffs[rng.integers(0, m, (stop - start, m))].mean(1)
        values[where] = means
    return values.mean(1)


def sign_flip_p(values: np.ndarray, seed: int = 0, resamples: int = MONTE_CARLO_RESAMPLES) -> float:
    """Two-sided paired sign-flip permutation p-value of the mean: the share of sign patterns
    whose |mean| reaches the observed one. Exact (every pattern) up to 2**16 patterns, else
    Monte Carlo with the observed pattern counted, ``(hits + 1) / (resamples + 1)``; never 0.

    Written with numpy rather than ``scipy.stats.permutation_test`` (the tests check it
    against that and against enumeration): importing scipy.stats alone costs about 1.5 s,
    a third of the report's time budget.
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if not np.all(np.isfinite(values)):
        raise ValueError("sign_flip_p: non-finite values (drop them first: they are missing data)")
    if n == 0 or np.all(values == 0):
        return 1.0
    observed = abs(values.mean())
    tolerance = 1e-12 * max(1.0, observed)  # patterns equal to the observed up to rounding count as extreme
    if n <= EXACT_PERMUTATION_MAX:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(signs @ values) / n >= observed - tolerance))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, 1000):
        signs = rng.choice((-1.0, 1.0), size=(min(1000, resamples - start), n))
        hits += int(np.sum(np.abs(signs @ values) / n >= observed - tolerance))
    return (hits + 1) / (resamples + 1)


def smallest_sign_flip_p(n: int) -> float:
    """The smallest p ``sign_flip_p`` can return for n values: every sign the same."""
    return 2.0 / 2**n if n <= EXACT_PERMUTATION_MAX else 1.0 / (MONTE_CARLO_RESAMPLES + 1)


# Which test a Δ gets, by design (``paired_stats``): across seeds, conditional on one model, or none.
ACROSS_SEEDS, CONDITIONAL, NO_TEST = "seeds", "images", "none"


def paired_stats(per_seed: list[ImageDifferences], pairing: str) -> dict[str, Any]:
    """The Δ of one column: its mean over seeds (each seed's mean per-image difference) and
    the inference its design allows (``level``):

    - two or more seeds (``seeds``): on the per-seed Δ, the trained model being the unit; a
      t-interval with n - 1 degrees of freedom and the exact sign-flip p;
    - one seed, same weights (``images``): conditional on that one trained model, over its test
      images, or over subjects when the rows name them (``unit``): the cluster-robust
      t-interval and a sign-flip p on the subjects' summed differences;
    - one seed, retrained (``none``): no test. The difference of two independently trained
      models includes their training variation, which one model per side cannot measure.
    """
    deltas = np.array([d.values.mean() for d in per_seed])
    n = len(deltas)
    out: dict[str, Any] = {"mean": float(deltas.mean()), "per_seed": deltas.tolist(), "n": n,
                           "std": float(deltas.std(ddof=1)) if n > 1 else None,
                           "dropped": int(sum(d.dropped for d in per_seed)),
                           "ci_low": None, "ci_high": None, "p": None, "unit": None}
    if n > 1:
        out.update(level=ACROSS_SEEDS, unit="seeds", p=sign_flip_p(deltas))
        out["ci_low"], out["ci_high"] = t_interval(deltas)
        return out
    diffs = per_seed[0]
    totals, _ = cluster_totals(diffs.values, diffs.subjects)
    if pairing != "same weights" or len(totals) < 2:
        out.update(level=NO_TEST)
        return out
    out.update(level=CONDITIONAL, unit="subjects" if diffs.subjects is not None else diffs.unit, p=sign_flip_p(totals),
               units=len(totals))
    out["ci_low"], out["ci_high"] = clustered_t_interval(diffs.values, diffs.subjects)
    return out


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given)."""
    order = np.argsort(p_values, kind="stable")
    m = len(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()


def _pairs(row: Row, base: Row) -> tuple[list[Any], list[Any]]:
    """(seeds the row shares with ``base``, seeds only the row has)."""
    return [s for s in row.seeds if s in base.runs], [s for s in row.seeds if s not in base.runs]


def _column_stats(row: Row, base: Row, seeds: list[Any], column: Column, pairing: str) -> tuple[dict | None, str]:
    diffs, reasons = [], []
    for s in seeds:
        d, why = (volume_differences(row.runs[s], base.runs[s], column.per_volume) if column.per_volume else
                  image_differences(row.runs[s], base.runs[s], column.per_image))
        (diffs.append(d) if d is not None else reasons.append(f"seed {s}: {why}"))
    if reasons or not diffs:
        return None, "; ".join(reasons)
    return paired_stats(diffs, pairing), ""


def _same_values(a: Row, b: Row, columns: tuple[Column, ...]) -> bool:
    """Whether two rows hold the same per-image values of every paired column, seed for seed."""
    columns = tuple(c for c in columns if c.per_image)  # equal images mean equal volumes
    if a.seeds != b.seeds:
        return False
    for s in a.seeds:
        ours = {r["id"]: [r.get(c.per_image) for c in columns] for r in a.runs[s].get("per_image", [])}
        theirs = {r["id"]: [r.get(c.per_image) for c in columns] for r in b.runs[s].get("per_image", [])}
        if not ours or ours != theirs:
            return False
    return True


def summarise(runs: list[dict[str, Any]], protocol: str = "standard") -> tuple[list[Row], list[tuple[str, str]]]:
    """Rows with their metric summaries and paired tests.

    Holm's correction runs within two families: the across-seed tests and the conditional (†)
    ones, never mixed. A row whose per-image values equal an earlier row's against the same
    baseline (a tuning that kept the defaults) is not tested again: ``same_as`` names that row."""
    rows, duplicates = group_rows(runs)
    columns = PROTOCOLS[protocol]["paired"]
    for row in rows:
        if row.baseline is None:
            continue
        seeds, missing = _pairs(row, row.baseline)
        if missing:
            row.notes.append(f"seeds {', '.join(map(str, missing))} have no `none` run: not in the Δ")
        kinds = {_pairing_kind(row.runs[s], row.baseline.runs[s]) for s in seeds}
        row.pairing = kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "")
        row.same_as = next((r for r in rows if r is not row and r.baseline is row.baseline and r.stats
                            and r.same_as is None and _same_values(row, r, columns)), None)
        for column in columns:
            test, why = _column_stats(row, row.baseline, seeds, column, row.pairing)
            if test is None:
                row.notes.append(f"Δ {column.title} not computed: {why}")
                continue
            row.stats[column.key] = test
            if test["dropped"]:
                row.notes.append(f"Δ {column.title}: {test['dropped']} image pairs with a non-finite value left out")
        if row.plain is not None:
            plain_seeds, _ = _pairs(row, row.plain)
            for column in columns:
                test, _ = _column_stats(row, row.plain, plain_seeds, column, "retrained")
                if test is not None:
                    row.plain_stats[column.key] = test
    for level in (ACROSS_SEEDS, CONDITIONAL):
        tests = [t for row in rows if row.same_as is None for t in (*row.stats.values(), *row.plain_stats.values())
                 if t["level"] == level]
        for test, adjusted in zip(tests, holm([t["p"] for t in tests])):
            test["p_holm"] = adjusted
    for row in rows:
        if row.same_as is not None:
            for key, test in row.stats.items():
                test.update(same_as=f"{row.same_as.label} {row.same_as.head}", p_holm=row.same_as.stats.get(key, {}).get("p_holm"))
    return rows, duplicates


def holm_families(rows: list[Row]) -> dict[str, list[dict[str, Any]]]:
    """The tests of each Holm family (rows marked ``same_as`` are not tested again)."""
    return {level: [t for r in rows if r.same_as is None for t in (*r.stats.values(), *r.plain_stats.values())
                    if t["level"] == level] for level in (ACROSS_SEEDS, CONDITIONAL)}


def reachability(rows: list[Row]) -> list[str]:
    """Per Holm family: the smallest Holm-adjusted p it can reach, and (across seeds) how many
    seeds a star would need with this many tests."""
    lines = []
    for level, tests in holm_families(rows).items():
        if not tests:
            continue
        m = len(tests)
        sizes = [t["n"] if level == ACROSS_SEEDS else t.get("units", 0) for t in tests]
        best = min(1.0, m * min(smallest_sign_flip_p(k) for k in sizes))
        needed = next((k for k in range(2, 64) if m * smallest_sign_flip_p(k) < ALPHA), None)
        if level == ACROSS_SEEDS:
            star = "a star is reachable" if best < ALPHA else "no star is reachable"
            need = (f"with {m} tests a star needs at least {needed} seeds (every seed agreeing in sign)" if needed
                    else f"with {m} tests no seed count makes a star reachable")
            lines.append(f"Across-seed family: {m} tests with {_span(sizes)} paired seeds; the smallest Holm-adjusted p "
                         f"this table can reach is {best:.2g} ({star}); {need}.")
        else:
            lines.append(f"Conditional (†) family: {m} tests over {_span(sizes)} {tests[0]['unit']}; "
                         f"the smallest Holm-adjusted p this table can reach is {best:.2g}.")
    untested = [t for r in rows if r.same_as is None for t in (*r.stats.values(), *r.plain_stats.values())
                if t["level"] == NO_TEST]
    if untested:
        m = len(untested) + len(holm_families(rows)[ACROSS_SEEDS])
        needed = next((k for k in range(2, 64) if m * smallest_sign_flip_p(k) < ALPHA), None)
        if needed:
            lines.append(f"No test: {len(untested)} Δs of one retrained model per side. Tested across seeds, with "
                         f"{m} tests in that family a star would need at least {needed} seeds per configuration.")
    return lines


def _span(values: list[int]) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


# -- tables ------------------------------------------------------------------------------


def _stars(p: float | None) -> str:
    return "" if p is None else "**" if p < 0.01 else "*" if p < ALPHA else ""


def _metric_cell(row: Row, column: Column) -> str:
    mean, std, _ = mean_spread([run_value(r, column) for r in row.runs.values()])
    if math.isnan(mean):
        return "–"
    if std is None:  # one seed: no spread to show
        return f"{mean * column.scale:.2f}"
    return f"{mean * column.scale:.2f} ± {std * column.scale:.2f}"


def _delta_text(test: dict[str, Any], column: Column, seeds_in_row: int) -> str:
    """``+1.00 [-0.99, +2.99] p=0.25 (Holm 1) n=3``; † marks a test conditional on one model;
    a one-seed retrained pair has no test."""
    s = column.scale
    n = f"n={test['n']}" + (f" of {seeds_in_row}" if seeds_in_row > test["n"] else "")
    dropped = f", {test['dropped']} non-finite pairs left out" if test.get("dropped") else ""
    if test["level"] == NO_TEST:
        return f"{test['mean'] * s:+.2f} (1 seed: no test{dropped})"
    mark = "†" if test["level"] == CONDITIONAL else ""
    holm_p = test.get("p_holm")
    holm_text = f" (Holm {holm_p:.2g})" if holm_p is not None else ""
    return (f"{test['mean'] * s:+.2f} [{test['ci_low'] * s:+.2f}, {test['ci_high'] * s:+.2f}]{mark} "
            f"p={test['p']:.2g}{holm_text}{_stars(holm_p)} {n}{dropped}")


def _delta_cell(row: Row, column: Column) -> str:
    test = row.stats.get(column.key)
    if test is None:
        return "–"
    if row.same_as is not None:
        return f"= {test['same_as']} (same per-image values)"
    text = _delta_text(test, column, len(row.runs))
    plain = row.plain_stats.get(column.key)
    if plain is not None:
        text += f"; vs plain {row.plain.label} none: {_delta_text(plain, column, len(row.runs))}"
    return text


def header(protocol: str) -> list[str]:
    spec = PROTOCOLS[protocol]
    paired = [t for c in spec["paired"] for t in (c.title, f"Δ {c.title}")]
    return ["configuration", "head", "pairing", "seeds", *[c.title for c in spec["pooled"]], *paired, COST.title, "params"]


def head_cell(row: Row, rows: list[Row]) -> str:
    outcome = tuning_outcome(row, rows)
    return f"{row.head} ({outcome})" if outcome else row.head


def tuning_outcome(row: Row, rows: list[Row]) -> str:
    """For a tuned head: whether the tuning kept the untuned head's parameters, chose no CRF
    (zero kernel weights) or a new point, per seed where the seeds differ ('' otherwise)."""
    outcomes = {}
    for seed, run in row.runs.items():
        head = (run.get("config") or {}).get("head") or {}
        tuned = head.get("tuned")
        if not isinstance(tuned, dict) or not tuned.get("keys"):
            return ""
        keys, by = list(tuned["keys"]), tuned.get("by")
        if not row.head.startswith(str(by)):  # e.g. CRF-RNN initialised from a tuned DenseCRF, then trained
            return ""
        untuned = next((r.runs.get(seed) for r in rows if r.head == by and r.baseline is row.baseline
                        and r is not row and seed in r.runs), None)
        values = [head.get(k) for k in keys]
        if all(head.get(k) == 0 for k in keys if k.endswith("_compat")) and any(k.endswith("_compat") for k in keys):
            outcomes[seed] = "no CRF won"
        elif untuned is not None and values == [(untuned["config"].get("head") or {}).get(k) for k in keys]:
            outcomes[seed] = "tuning kept the defaults"
        else:
            outcomes[seed] = "tuning chose new parameters"
    if len(set(outcomes.values())) == 1:
        return next(iter(outcomes.values()))
    return "; ".join(f"seed {s}: {o}" for s, o in sorted(outcomes.items(), key=lambda x: str(x[0])))


def cells(row: Row, protocol: str, rows: list[Row] = ()) -> list[str]:
    spec = PROTOCOLS[protocol]
    params = next(iter(row.runs.values()))["metrics"].get("params")
    out = [row.label, head_cell(row, list(rows)), row.pairing or ("baseline" if row.head == BASELINE_HEAD else "–"),
           str(len(row.runs))]
    out += [_metric_cell(row, c) for c in spec["pooled"]]
    for c in spec["paired"]:
        out += [_metric_cell(row, c), _delta_cell(row, c)]
    out += [_metric_cell(row, COST), f"{params / 1e6:.2f}M" if params else "–"]
    return out


def footnotes(rows: list[Row], protocol: str) -> list[str]:
    lines = [
        PROTOCOL_NOTES[protocol],
        "Cells: mean ± sample std over seeds (the trained model is the unit of replication; one seed: the value). "
        "Δ: the row minus its `none` baseline (the `none` row whose config differs only in the head), per seed the "
        "mean per-image difference, then the mean over seeds; n = paired seeds (\"n=2 of 3\": the row's cells "
        "average 3 seeds, its Δ pairs 2).",
        "Inference follows the design. With n ≥ 2 seeds: a 95 % t-interval (n − 1 degrees of freedom) and an exact "
        "sign-flip p on the per-seed Δ (the smallest possible p with n seeds is 2/2^n). † = one seed, same weights: "
        "the interval and p are over that single model's test " + _image_unit(rows) + ", so they say whether this "
        "model's Δ is real, not whether retraining would reproduce it. \"1 seed: no test\" = one independently trained "
        "model per side: its Δ includes training variation that one model per side cannot measure, so it is "
        "shown without interval, p or star. Holm's correction runs within each family; * / ** = Holm-adjusted "
        "p < 0.05 / 0.01.",
        *reachability(rows),
        "Pairing: *same weights* = the baseline's own checkpoint evaluated under a post-hoc head; *retrained* = "
        "an independently trained model per seed, so the Δ includes training variation.",
    ]
    if any(r.same_as is not None for r in rows):
        lines.append("\"= <row>\": the same per-image values as that row against the same baseline (e.g. a tuning "
                     "that kept the defaults); tested once.")
    if any(r.plain_stats for r in rows):
        lines.append("\"vs plain\": a row whose baseline is a matched control (its backbone stopped at a coarser "
                     "output stride) is also compared with the plain backbone's `none`.")
    bf1 = boundary_tolerance_note(rows) if protocol.removesuffix(VOLUME) == "standard" else ""
    if bf1:
        lines.append(bf1)
    lines.append(timing_note(rows))
    return lines


def _image_unit(rows: list[Row]) -> str:
    units = {t.get("unit") for r in rows for t in r.stats.values() if t["level"] == CONDITIONAL}
    return "subjects (the images of one subject are not independent: each subject's summed Δ is one unit)" \
        if "subjects" in units else "images"


def _size_text(size: Any) -> str | None:
    if isinstance(size, int):
        return f"{size}×{size}"
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return f"{size[0]}×{size[1]}"
    return None


def boundary_tolerance_note(rows: list[Row]) -> str:
    """Boundary F1's matching distance in pixels at each image size of the table: the
    recorded one (``boundary_tolerance_px``), else computed from the config."""
    sizes: dict[str, float] = {}
    rules = set()
    for row in rows:
        for run in row.runs.values():
            metrics_cfg = run["config"].get("metrics") or {}
            tolerance, unit = metrics_cfg.get("boundary_tolerance", 0.0075), metrics_cfg.get("boundary_tolerance_unit",
                                                                                             "diagonal")
            rules.add(f"{tolerance * 100:g} % of the image diagonal" if unit == "diagonal" else f"{tolerance:g} px")
            recorded = run.get("boundary_tolerance_px")
            if isinstance(recorded, dict) and recorded:
                sizes.update({k: float(v) for k, v in recorded.items() if isinstance(v, (int, float))})
                continue
            data = run["config"].get("data") or {}
            size = _size_text(data.get("pad_to")) or _size_text(data.get("image_size"))
            if size is None:
                sizes.setdefault("sizes not recorded", math.nan)
            elif unit == "diagonal":
                h, w = (int(v) for v in size.split("×"))
                sizes[size] = tolerance * math.hypot(h, w)
            else:
                sizes[size] = float(tolerance)
    if not sizes:
        return ""
    shown = ", ".join(k if math.isnan(v) else f"{v:.2f} px at {k}" + (" (under 1 px: exact matching)" if v < 1 else "")
                      for k, v in sorted(sizes.items()))
    return f"Boundary F1 tolerance: {' / '.join(sorted(rules))} = {shown}."


def timing_note(rows: list[Row]) -> str:
    """Where ms/img was measured; a table mixing machines or thread counts says so."""
    setups = {}
    for row in rows:
        for run in row.runs.values():
            timing = run.get("timing") or {}
            if not timing:
                setups.setdefault("not recorded (runs from before timing records)", []).append(row.label)
                continue
            where = f"GPU {timing['gpu']}" if timing.get("gpu") else f"CPU {timing.get('cpu')}"
            setups.setdefault(f"{where}, {timing.get('usable_cpus')} usable CPUs, {timing.get('torch_threads')} "
                              f"torch threads, torch {timing.get('torch')}", []).append(row.label)
    if len(setups) <= 1:
        return f"ms/img: backbone + head forward per test image, warm, on {next(iter(setups), 'no runs')}."
    return ("ms/img was measured on different setups, so it is not comparable across them: "
            + "; ".join(f"{setup} ({len(labels)} runs)" for setup, labels in setups.items()) + ".")


def pair_lines(rows: list[Row], protocol: str) -> list[str]:
    """Per pair: baseline, pairing, seeds and the per-seed Δ of each paired column; row notes."""
    lines = []
    for row in rows:
        if row.stats:
            per_seed = "; ".join(
                f"Δ {c.title}: " + ", ".join(f"{v * c.scale:+.2f}" for v in row.stats[c.key]["per_seed"])
                for c in PROTOCOLS[protocol]["paired"] if c.key in row.stats
            )
            seeds = [s for s in row.seeds if row.baseline and s in row.baseline.runs]
            lines.append(f"- {row.label} {row.head} vs {row.baseline.label} none ({row.pairing}; seeds "
                         f"{', '.join(map(str, seeds))}): per seed {per_seed}")
        if row.plain_stats:
            per_seed = "; ".join(
                f"Δ {c.title}: " + ", ".join(f"{v * c.scale:+.2f}" for v in row.plain_stats[c.key]["per_seed"])
                for c in PROTOCOLS[protocol]["paired"] if c.key in row.plain_stats
            )
            lines.append(f"- {row.label} {row.head} vs plain {row.plain.label} none (retrained): per seed {per_seed}")
        lines += [f"- {row.label} {row.head}: {note}" for note in row.notes]
    return lines


def compact_header(protocol: str) -> list[str]:
    """The main table: at most 10 columns (the full one is ``full_header``)."""
    headline, *others = PROTOCOLS[protocol]["paired"]
    if protocol.endswith(VOLUME):  # volume metrics first; the slice-level ones are in table_full.md
        others = [c for c in others if c.per_volume]

    def short(column: Column) -> str:
        return column.title.replace(" (img mean)", "").replace(" (vol mean)", "")

    return ["configuration", "head", "paired n", headline.title, f"Δ {short(headline)} [95 % CI]", "p (Holm)",
            *(f"Δ {short(c)}" for c in others), COST.title, "params"]


def _paired_n(row: Row) -> str:
    test = next(iter(row.stats.values()), None)
    if test is None:
        return "–"
    return f"{test['n']}" + (f" of {len(row.runs)}" if len(row.runs) > test["n"] else "")


def _interval_text(test: dict[str, Any], column: Column) -> str:
    s = column.scale
    if test["level"] == NO_TEST:
        return f"{test['mean'] * s:+.2f} (no test)"
    mark = "†" if test["level"] == CONDITIONAL else ""
    return f"{test['mean'] * s:+.2f} [{test['ci_low'] * s:+.2f}, {test['ci_high'] * s:+.2f}]{mark}"


def _compact_delta(row: Row, column: Column, rows: list[Row]) -> str:
    test = row.stats.get(column.key)
    if test is None:
        return "–"
    if row.same_as is not None:
        return f"= {head_words(row.same_as.head)}" + ("" if row.same_as.label == row.label else f" of {row.same_as.label}")
    text = _interval_text(test, column)
    plain = row.plain_stats.get(column.key)
    if plain is not None:
        text += f"; vs plain {row.plain.label}: {plain['mean'] * column.scale:+.2f}"
    if test.get("dropped"):
        text += f" ({test['dropped']} non-finite left out)"
    return text


def _compact_p(row: Row, column: Column) -> str:
    test = row.stats.get(column.key)
    if test is None or row.same_as is not None or test["p"] is None:
        return "–"
    return f"{test['p']:.2g} ({test['p_holm']:.2g}){_stars(test['p_holm'])}"


def _delta_only(row: Row, column: Column) -> str:
    test = row.stats.get(column.key)
    if test is None:
        return "–"
    if row.same_as is not None:
        return "="
    mark = "†" if test["level"] == CONDITIONAL else ""
    return f"{test['mean'] * column.scale:+.2f}{mark}{_stars(test.get('p_holm'))}"


def compact_cells(row: Row, protocol: str, rows: list[Row]) -> list[str]:
    headline, *others = PROTOCOLS[protocol]["paired"]
    if protocol.endswith(VOLUME):
        others = [c for c in others if c.per_volume]
    params = next(iter(row.runs.values()))["metrics"].get("params")
    outcome = tuning_outcome(row, rows)
    head = head_words(row.head) + (f" ({outcome})" if outcome else "")
    return [row.label, head, _paired_n(row), _metric_cell(row, headline), _compact_delta(row, headline, rows),
            _compact_p(row, headline), *(_delta_only(row, c) for c in others), _cost_cell(row),
            f"{params / 1e6:.2f}M" if params else "–"]


def _cost_cell(row: Row) -> str:
    mean, std, _ = mean_spread([run_value(r, COST) for r in row.runs.values()])
    return "–" if math.isnan(mean) else f"{mean:.1f}"


def compact_footnotes(rows: list[Row], protocol: str) -> list[str]:
    headline = PROTOCOLS[protocol]["paired"][0]
    lines = [
        f"Δ = the row minus its `none` baseline (the same configuration but the head; seed with seed, image with "
        f"image), in points of {headline.title}; paired n = seeds in the Δ (\"2 of 3\": the cells average 3). "
        "Cells with several seeds: mean ± sample std over seeds.",
        "Inference by design: several seeds: 95 % t-interval and exact sign-flip p across seeds. † one seed, same "
        "weights: the interval and p are over that one model's test " + _image_unit(rows) + " (is this model's Δ "
        "real?), not a claim about retraining. (no test): one retrained model per side, whose Δ includes training "
        "variation one model cannot measure. p (Holm): raw p, Holm-adjusted within its family in brackets; "
        "* / ** = Holm-adjusted p < 0.05 / 0.01.",
        *reachability(rows),
    ]
    if any(r.same_as is not None for r in rows):
        lines.append("\"= <row>\": the same per-image values as that row against the same baseline; tested once.")
    if any(r.plain_stats for r in rows):
        lines.append("\"vs plain\": the Δ against the plain backbone's `none` (this row's baseline is a matched "
                     "control with a coarser output stride).")
    lines.append(PROTOCOL_NOTES[protocol])
    bf1 = boundary_tolerance_note(rows) if protocol.removesuffix(VOLUME) == "standard" else ""
    if bf1:
        lines.append(bf1)
    lines.append(timing_note(rows))
    lines.append("Every column, spread and per-seed value: table_full.md and table.csv.")
    return lines


def escape_markdown(text: Any) -> str:
    """A Markdown table cell that stays one cell: ``\\``, ``|`` and backticks escaped (a
    backtick could open a code span), line breaks as spaces."""
    return re.sub(r"([\\|`])", r"\\\1", " ".join(str(text).splitlines()))


def to_markdown(rows: list[Row], protocol: str = "standard") -> str:
    """The main table (at most 10 columns, grouped by backbone, each baseline first) and its notes."""
    head = compact_header(protocol)
    lines = ["| " + " | ".join(map(escape_markdown, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(escape_markdown, compact_cells(row, protocol, rows))) + " |" for row in rows]
    lines += ["", *compact_footnotes(rows, protocol)]
    return "\n".join(lines)


def to_markdown_full(rows: list[Row], protocol: str = "standard") -> str:
    """Every column: pooled and per-image metrics with their spread, each Δ with interval, p,
    Holm p and n, and the per-seed Δ of every pair."""
    head = header(protocol)
    lines = ["| " + " | ".join(map(escape_markdown, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(escape_markdown, cells(row, protocol, rows))) + " |" for row in rows]
    lines += ["", *footnotes(rows, protocol)]
    pairs = pair_lines(rows, protocol)
    if pairs:
        lines += ["", "Paired comparisons:", *pairs]
    return "\n".join(lines)


# LaTeX's ten special characters, then the table's own symbols, each in one pass (a
# replacement is never escaped again).
_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
          "±": r"$\pm$", "Δ": r"$\Delta$", "†": r"$^\dagger$", "–": "--", "\n": " ", "\r": " "}
_LATEX_PATTERN = re.compile("|".join(map(re.escape, _LATEX)))


def escape_latex(text: Any) -> str:
    """Text for a LaTeX table cell: every special character escaped, line breaks as spaces."""
    return _LATEX_PATTERN.sub(lambda m: _LATEX[m.group(0)], str(text))


def to_latex(rows: list[Row], protocol: str = "standard") -> str:
    """The main table (``to_markdown``'s columns) as a LaTeX tabular."""
    head = compact_header(protocol)
    lines = [r"\begin{tabular}{" + "l" * 3 + "r" * (len(head) - 3) + "}", r"\toprule"]
    lines.append(" & ".join(map(escape_latex, head)) + r" \\")
    lines.append(r"\midrule")
    lines += [" & ".join(map(escape_latex, compact_cells(row, protocol, rows))) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


DELTA_STATS = ("mean", "std", "ci_low", "ci_high", "p", "p_holm", "n", "level", "unit", "dropped", "same_as", "per_seed")


TEXT_FIELDS = ("configuration", "head", "pairing", "baseline", "plain_baseline", "tuning")
TEXT_DELTA_STATS = ("level", "unit", "same_as")


def numeric_record(row: Row, protocol: str, rows: Iterable[Row] = ()) -> dict[str, Any]:
    """One row as plain numbers (unscaled; None where a value does not apply). ``rows`` (the
    whole table) lets a tuned head say what its tuning chose."""
    spec = PROTOCOLS[protocol]
    record: dict[str, Any] = {
        "configuration": row.label, "head": row.head, "pairing": row.pairing,
        "baseline": row.baseline.label if row.baseline else None,
        "plain_baseline": row.plain.label if row.plain_stats else None,
        "tuning": tuning_outcome(row, list(rows)) or None,
        "n": len(row.runs), "seeds": " ".join(map(str, row.seeds)),
        "params": next(iter(row.runs.values()))["metrics"].get("params"),
    }
    for column in (*spec["pooled"], *spec["paired"], COST):
        mean, std, _ = mean_spread([run_value(r, column) for r in row.runs.values()])
        record[f"{column.key}_mean"] = None if math.isnan(mean) else mean
        record[f"{column.key}_std"] = std
    for column in spec["paired"]:
        test = row.stats.get(column.key, {})
        for stat in DELTA_STATS:
            value = test.get(stat)
            record[f"delta_{column.per_image}_{stat}"] = " ".join(map(repr, value)) if stat == "per_seed" and value else value
    for column in spec["paired"]:
        test = row.plain_stats.get(column.key, {})
        for stat in ("mean", "ci_low", "ci_high", "p", "p_holm", "n", "level"):
            record[f"delta_vs_plain_{column.per_image}_{stat}"] = test.get(stat)
    return record


def to_csv(rows: list[Row], protocol: str = "standard") -> str:
    """Unscaled numbers, one row per configuration; empty cells where a value does not apply."""
    records = [numeric_record(r, protocol, rows) for r in rows]
    out = io.StringIO()
    columns = list(numeric_record(Row(config={}, runs={0: {"metrics": {}}}), protocol))
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in record.items()})
    return out.getvalue()


def frame_records(rows: list[Row], protocol: str = "standard") -> list[dict[str, Any]]:
    """One dict per row for a data frame: label, backbone, head, protocol, pairing and
    baseline as text, ``n_seeds`` as an int, every other value a float (unscaled; NaN where
    it does not apply). The same numbers as the CSV, without the per-seed lists."""
    records = []
    for row in rows:
        numbers = numeric_record(row, protocol, rows)
        record: dict[str, Any] = {
            "configuration": numbers.pop("configuration"),
            "backbone": str((row.config.get("backbone") or {}).get("name", "")),
            "head": numbers.pop("head"),
            "protocol": protocol,
            "pairing": numbers.pop("pairing") or ("baseline" if row.head == BASELINE_HEAD else ""),
            "baseline": numbers.pop("baseline") or "",
            "plain_baseline": numbers.pop("plain_baseline") or "",
            "tuning": numbers.pop("tuning") or "",
            "n_seeds": numbers.pop("n"),
        }
        del numbers["seeds"]
        for key, value in numbers.items():
            if key.endswith("_per_seed"):
                continue
            if key.rsplit("_", 1)[-1] in TEXT_DELTA_STATS or key.endswith("_same_as"):  # level, unit, same_as
                record[key] = value or ""
            else:
                record[key] = math.nan if value is None else float(value)
        records.append(record)
    return records


def to_dataframe(source: "Study | Report | list[Row]", protocol: str | None = None):
    """The table as a ``pandas.DataFrame``, one row per exact configuration (see ``frame_records``).

    ``source``: a ``Study`` (summarised here, under ``protocol`` or the one its runs were
    made with), a ``Report`` (its rows and protocol) or rows from ``summarise``.
    """
    try:
        import pandas as pd  # only notebooks need it: the report itself does not
    except ImportError as e:
        raise ImportError("segrefine.report.to_dataframe needs pandas: pip install pandas") from e
    if isinstance(source, Report):
        if protocol not in (None, source.protocol):
            raise ValueError(f"protocol={protocol!r}, but the report was made with {source.protocol!r}: "
                             "write the report again with that protocol")
        rows, protocol = source.rows, source.protocol
    elif isinstance(source, Study):
        protocol = study_protocol(source.runs, protocol)
        rows, _ = summarise(source.runs, protocol)
    else:
        rows, protocol = list(source), protocol or "standard"
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol={protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    columns = list(frame_records([Row(config={}, runs={0: {"metrics": {}}})], protocol)[0])  # also for no rows
    return pd.DataFrame.from_records(frame_records(rows, protocol), columns=columns)


# -- writing -----------------------------------------------------------------------------


@dataclass
class Report:
    rows: list[Row]
    protocol: str
    paths: dict[str, Path]
    problems: list[tuple[str, str]]  # (where, reason): every run folder left out, and why


def write_report(study: Study, out_dir: str | Path, figures: bool = True, protocol: str | None = None) -> Report:
    """Write table.md, table.csv, table.tex (and figures) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    protocol = study_protocol(study.runs, protocol)
    rows, duplicates = summarise(study.runs, protocol)
    # Every output is made in a staging folder and moved into out_dir only once all are done,
    # so a failure or a kill never leaves new figures beside an old table (or half a file).
    stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=".report-"))
    try:
        paths, problems = _write_outputs(study, rows, duplicates, protocol, stage, figures)
        final = {name: out_dir / path.name for name, path in paths.items()}
        for stale in REPORT_OUTPUTS - {path.name for path in final.values()}:
            (out_dir / stale).unlink(missing_ok=True)  # e.g. an older qualitative.png this report does not draw
        for name, path in sorted(paths.items(), key=lambda item: item[0] == "markdown"):  # table.md last
            os.replace(path, final[name])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return Report(rows, protocol, final, problems)


# Every file write_report may leave in its folder.
REPORT_OUTPUTS = frozenset({"table.md", "table_full.md", "table.csv", "table.tex", "forest.png", "metrics.png",
                            "cost.png", "qualitative.png"})


def _write_outputs(study: Study, rows: list[Row], duplicates: list[tuple[str, str]], protocol: str, stage: Path,
                   figures: bool) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """The tables (and figures) of ``write_report``, written into ``stage``; their paths and
    the report's problems (every run folder left out, and why)."""
    paths = {"markdown": stage / "table.md", "full_markdown": stage / "table_full.md", "csv": stage / "table.csv",
             "latex": stage / "table.tex"}
    figure_notes: list[tuple[str, str]] = []
    if figures:
        from segrefine import figures as figs

        figure_notes = figs.draw_all(rows, PROTOCOLS[protocol]["paired"], COST, stage, paths)
    problems = ""
    if duplicates:
        problems += "\n\nDuplicate runs (not averaged):\n" + "\n".join(f"- {w}: {r}" for w, r in duplicates)
    if study.incomplete:
        problems += ("\n\nRuns left out (incomplete, unreadable or out of range; not averaged):\n"
                     + "\n".join(f"- {w}: {r}" for w, r in study.incomplete))
    if study.skipped:
        problems += "\n\nSkipped (not test results):\n" + "\n".join(f"- {w}: {r}" for w, r in study.skipped)
    if figure_notes:
        problems += "\n\nFigures:\n" + "\n".join(f"- {w}: {r}" for w, r in figure_notes)
    paths["markdown"].write_text(to_markdown(rows, protocol) + problems + "\n")
    paths["full_markdown"].write_text(to_markdown_full(rows, protocol) + problems + "\n")
    paths["csv"].write_text(to_csv(rows, protocol))
    paths["latex"].write_text(to_latex(rows, protocol) + "\n")
    return paths, [*duplicates, *study.incomplete, *figure_notes]


def main_records(rows: list[Row], protocol: str) -> list[dict[str, Any]]:
    """The main table's rows as numbers (unscaled; None where a value does not apply): what
    ``--log-wandb`` logs as its table."""
    headline, *others = PROTOCOLS[protocol]["paired"]
    records = []
    for row in rows:
        test = row.stats.get(headline.key) or {}
        mean, std, _ = mean_spread([run_value(r, headline) for r in row.runs.values()])
        cost, _, _ = mean_spread([run_value(r, COST) for r in row.runs.values()])
        record = {"configuration": row.label, "head": row.head, "tuning": tuning_outcome(row, rows) or None,
                  "seeds": len(row.runs), "paired_n": test.get("n"), f"{headline.per_image}_mean": _number(mean),
                  f"{headline.per_image}_std": std, "delta": test.get("mean"), "ci_low": test.get("ci_low"),
                  "ci_high": test.get("ci_high"), "p": test.get("p"), "p_holm": test.get("p_holm"),
                  "test": test.get("level"), "same_as": test.get("same_as")}
        for column in others:
            record[f"delta_{column.per_image}"] = (row.stats.get(column.key) or {}).get("mean")
        record["ms_per_image"] = _number(cost)
        record["params"] = next(iter(row.runs.values()))["metrics"].get("params")
        records.append(record)
    return records


def _number(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def report_experiment(report: Report) -> str:
    """The experiment the report's runs belong to (the most common ``experiment``)."""
    names = [str(run.get("experiment") or "") for row in report.rows for run in row.runs.values()]
    names = [n for n in names if n] or ["runs"]
    return max(dict.fromkeys(names), key=names.count)


def _source_name(source: str) -> str:
    """A source as the wandb run shows it: a project as given, a folder by its name only (no machine path)."""
    path = Path(source)
    return source if not path.exists() else (path.resolve().name or str(source))


def log_to_wandb(report: Report, project: str = "segrefine", mode: str = "offline", entity: str | None = None,
                 save_dir: str | Path = ".", group: str | None = None, sources: Iterable[str] = ()) -> str:
    """The report as a wandb run named ``report-<experiment>`` (job_type ``report``, its own
    group unless ``group`` is given, tags report / experiment / protocol): the main table and the
    full one as ``wandb.Table``s (numbers unscaled), the figures as ``wandb.Image``s and each
    row's headline Δ in the summary. Sources are named without machine paths. Returns the run id."""
    import wandb

    experiment = report_experiment(report)
    name = f"report-{experiment}"
    run = wandb.init(project=project, entity=entity, name=name, group=group or name, job_type="report",
                     tags=["report", experiment, report.protocol], mode=mode, dir=str(save_dir),
                     config={"metrics_protocol": report.protocol, "experiment": experiment, "rows": len(report.rows),
                             "sources": [_source_name(s) for s in sources]})
    try:
        def table(records: list[dict[str, Any]]) -> Any:
            columns = list(records[0]) if records else []
            return wandb.Table(columns=columns, data=[[rec[c] for c in columns] for rec in records])

        payload: dict[str, Any] = {
            "report/table": table(main_records(report.rows, report.protocol)),
            "report/table_full": table([numeric_record(r, report.protocol, report.rows) for r in report.rows]),
        }
        for key, path in report.paths.items():
            if path.suffix == ".png":
                payload[f"report/{key.removesuffix('_figure')}"] = wandb.Image(str(path))
        run.log(payload)
        headline = PROTOCOLS[report.protocol]["paired"][0]
        run.summary.update({f"delta {headline.per_image}/{row.label} · {row.head}": row.stats[headline.key]["mean"]
                            for row in report.rows if headline.key in row.stats})
        return run.id
    finally:
        wandb.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segrefine-report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="*", help="run or sweep folders to read results.json from")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from an online wandb project instead")
    parser.add_argument("--metrics", choices=list(BASE_PROTOCOLS), default=None,
                        help="metric protocol of the columns (default: the one the runs were made with)")
    parser.add_argument("--out", help="folder for table.md/.csv/.tex and figures (default: the first folder's report/)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--log-wandb", action="store_true", help="also log the table and figures as a wandb run")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"])
    parser.add_argument("--wandb-project", default="segrefine")
    parser.add_argument("--wandb-entity", default=None)
    parser.add_argument("--wandb-group", default=None,
                        help="wandb group of the --log-wandb run (default: its own, report-<experiment>)")
    selection = parser.add_argument_group("selecting runs of --wandb ENTITY/PROJECT (server-side, checked again here)")
    selection.add_argument("--group", help="only runs of this wandb group (backbone-head-data)")
    selection.add_argument("--job-type", choices=["train", "eval"], help="only training or only evaluation runs")
    selection.add_argument("--experiment", help="only runs of this experiment (config `experiment`; older runs: "
                                                "their group); needed when the project holds several")
    selection.add_argument("--tag", action="append", default=[],
                           help="only runs with this tag (repeatable: all must match)")
    args = parser.parse_args(argv)
    if not args.dirs and not args.wandb:
        parser.error("give run folders or --wandb ENTITY/PROJECT")
    filters = {"group": args.group, "job_type": args.job_type, "experiment": args.experiment, "tags": args.tag}
    if not args.wandb and any(filters.values()):
        given = [option for option, key in (("--group", "group"), ("--job-type", "job_type"),
                                            ("--experiment", "experiment"), ("--tag", "tags")) if filters[key]]
        parser.error(f"{', '.join(given)} select runs of a wandb project: add --wandb ENTITY/PROJECT "
                     "(run folders are selected by naming them)")
    if args.wandb:  # one line naming `wandb login` / WANDB_API_KEY, not wandb's traceback
        from segrefine.tracking import require_wandb_credentials

        require_wandb_credentials()
    try:
        study = load_wandb_study(args.wandb, **filters) if args.wandb else load_study(args.dirs)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    except ValueError as e:  # runs of several experiments
        print(f"report: {e}", file=sys.stderr)
        return 2
    if not study.runs:
        print(f"report: no complete test runs under {', '.join(args.dirs or [args.wandb])}", file=sys.stderr)
        for where, reason in [*study.incomplete, *study.skipped]:
            print(f"- {where}: {reason}", file=sys.stderr)
        return 1
    out_dir = Path(args.out) if args.out else Path(args.dirs[0] if args.dirs else ".") / "report"
    try:
        report = write_report(study, out_dir, figures=not args.no_figures, protocol=args.metrics)
    except ValueError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    print(report.paths["markdown"].read_text(), end="")
    print(f"\n(written to {out_dir}: {', '.join(p.name for p in report.paths.values())})")
    if args.log_wandb:
        run_id = log_to_wandb(report, project=args.wandb_project, mode=args.wandb_mode, entity=args.wandb_entity,
                              group=args.wandb_group, save_dir=out_dir,
                              sources=[args.wandb] if args.wandb else args.dirs)
        print(f"wandb run: {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
