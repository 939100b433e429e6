"""A study as data: the jobs it runs and the rows they pair with, then a runner for that plan.

A plan is a list of ``Job``s. ``train`` jobs train (``segrefine.train``), ``tune`` jobs choose
the DenseCRF parameters of a ``none`` checkpoint on the validation split
(``segrefine.tuning``), ``eval`` jobs evaluate a checkpoint under a post-hoc head
(``segrefine.evaluate``). A job that is compared with a ``none`` run names it in
``pairs_with``; the report pairs a head with the ``none`` run whose
``comparable_config(config, drop=("seed",))`` differs only in ``head`` (and has the same seed),
so every plan is checked against that rule by composing its configs, without training
(``check_pairings``). Used by experiments/paper_table/run.py and
experiments/unet_crfrnn_table/run.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import lru_cache
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import OmegaConf

KINDS = ("train", "tune", "eval")


@dataclass(frozen=True)
class Job:
    name: str                       # unique; the job's folder is <out>/<kind>/<name>
    kind: str                       # train | tune | eval
    overrides: tuple[str, ...]      # Hydra overrides (train config for train jobs, eval config for eval jobs)
    seed: int
    source: str | None = None       # train job: init_from; tune/eval job: the checkpoint
    tuned_from: str | None = None   # tune job whose parameters this job's head takes
    tuned_head: str | None = None   # head given those parameters (densecrf | densecrf_3d | crfrnn)
    pairs_with: str | None = None   # the none train job this job's Δ is against
    label: str = ""                 # what the row is, in words

    def folder(self, out: Path) -> Path:
        return Path(out) / self.kind / self.name


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)

    def add(self, job: Job) -> Job:
        if job.kind not in KINDS:
            raise ValueError(f"job {job.name}: kind {job.kind!r} is not one of {KINDS}")
        if any(j.name == job.name and j.kind == job.kind for j in self.jobs):
            raise ValueError(f"two {job.kind} jobs named {job.name}")
        for ref in (job.source, job.pairs_with):
            if ref is not None and self.get("train", ref) is None:
                raise ValueError(f"job {job.name} refers to train job {ref}, which is not (yet) in the plan")
        if job.tuned_from is not None and self.get("tune", job.tuned_from) is None:
            raise ValueError(f"job {job.name} refers to tune job {job.tuned_from}, which is not (yet) in the plan")
        if job.kind != "tune":
            from segrefine.labels import check_label

            if '"' in job.label or "\\" in job.label or "${" in job.label:
                raise ValueError(f"job {job.name}: its label {job.label!r} holds a quote, backslash or ${{")
            check_label(job.label or None)
        self.jobs.append(job)
        return job

    def get(self, kind: str, name: str) -> Job | None:
        return next((j for j in self.jobs if j.kind == kind and j.name == name), None)

    def of(self, kind: str) -> list[Job]:
        return [j for j in self.jobs if j.kind == kind]


# -- composing a job's config ---------------------------------------------------------------


def compose_train(overrides: Iterable[str]):
    from hydra import compose, initialize_config_dir

    from segrefine.configs import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def compose_eval(overrides: Iterable[str]):
    from hydra import compose, initialize_config_dir

    from segrefine.configs import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("eval", overrides=list(overrides))


def changed_backbone(base: list[str], with_head: list[str]) -> list[str]:
    """Overrides that give ``base`` the backbone ``with_head`` composes to (e.g. U-Net's
    ``output_stride=4`` under head=pointrend): the matched ``none`` baseline's backbone."""
    a, b = _backbone(tuple(base)), _backbone(tuple(with_head))
    return [f"backbone.{k}={_value(b[k])}" for k in sorted(b) if a.get(k) != b[k]]


@lru_cache(maxsize=None)
def _backbone(overrides: tuple[str, ...]) -> dict[str, Any]:
    return OmegaConf.to_container(compose_train(overrides).backbone, resolve=True)


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return "null" if value is None else str(value)


def runtime_overrides(job: Job, plan: Plan, out: Path, tuned_file: Callable[[Job], Path]) -> list[str]:
    """The job's overrides with what is known only when it runs: checkpoints of earlier jobs
    and tuned parameters (``tuned_file(tune_job)`` -> its densecrf_tuned.yaml)."""
    from segrefine.tuning import tuned_overrides

    overrides = list(job.overrides)
    if job.label and job.kind != "tune":  # the row in words: the run's label (run-only, no new row)
        overrides.append(f'label="{job.label}"')
    if job.source is not None and job.kind == "train":
        overrides.append(f"init_from={plan.get('train', job.source).folder(out).resolve()}")
    if job.tuned_from is not None:
        name = {"densecrf": "densecrf_tuned", "densecrf_3d": "densecrf_3d_tuned"}.get(job.tuned_head)
        overrides += tuned_overrides(tuned_file(plan.get("tune", job.tuned_from)), name=name)
    return overrides


def job_config(job: Job, plan: Plan, out: Path, tuned_file: Callable[[Job], Path]) -> dict[str, Any]:
    """The resolved config the job's results.json will hold (eval jobs: the source's training
    config with the evaluation's head, as segrefine-eval records it)."""
    overrides = runtime_overrides(job, plan, out, tuned_file)
    if job.kind == "train":
        return _resolved((*overrides, f"paths.output_dir={job.folder(out)}"))
    source_job = plan.get("train", job.source)
    source = (*runtime_overrides(source_job, plan, out, tuned_file), f"paths.output_dir={source_job.folder(out)}")
    is_head = ("head=", "head.", "+head.")
    head = tuple(o for o in source if not o.startswith(is_head)) + tuple(o for o in overrides if o.startswith(is_head))
    return {**_resolved(source), "head": _resolved(head)["head"]}


@lru_cache(maxsize=256)
def _resolved_cached(overrides: tuple[str, ...]) -> str:
    return json.dumps(OmegaConf.to_container(compose_train(overrides), resolve=True))


def _resolved(overrides: tuple[str, ...]) -> dict[str, Any]:
    """The resolved train config of these overrides (cached: a plan composes the same ones often)."""
    return json.loads(_resolved_cached(tuple(overrides)))


def pairings(configs: dict[tuple[str, str], dict[str, Any]]) -> dict[tuple[str, str], list[str]]:
    """For every non-``none`` job, the ``none`` train jobs of the same seed whose comparable
    config differs from it only in ``head``: the report's pairing rule."""
    from segrefine.runconfig import comparable_config, config_differences

    nones = {key: c for key, c in configs.items() if key[0] == "train" and c["head"]["name"] == "none"}
    out = {}
    for key, config in configs.items():
        if config["head"]["name"] == "none":
            continue
        mine = comparable_config(config, drop=("seed",))
        out[key] = sorted(
            name for (kind, name), none in nones.items()
            if none["seed"] == config["seed"]
            and all(d == "head" or d.startswith("head.") for d in config_differences(mine, comparable_config(none, drop=("seed",))))
        )
    return out


def check_pairings(plan: Plan, out: Path, tuned_file: Callable[[Job], Path]) -> dict[tuple[str, str], list[str]]:
    """Compose every train/eval job and refuse a plan whose report pairing is not the intended
    one (a head paired with another baseline, or with none, or with two)."""
    configs = {}
    for job in plan.jobs:
        if job.kind != "tune":
            try:
                configs[(job.kind, job.name)] = job_config(job, plan, out, tuned_file)
            except Exception as e:  # Hydra's composition errors name the key; add the job
                raise ValueError(f"{job.kind} job {job.name} does not compose: {e}") from e
    found = pairings(configs)
    wrong = []
    for (kind, name), nones in found.items():
        intended = plan.get(kind, name).pairs_with
        if nones != ([intended] if intended else []):
            wrong.append(f"{kind} {name}: pairs with {nones or 'nothing'}, intended {intended or 'nothing'}")
    if wrong:
        raise ValueError("the study's pairing is not the intended one:\n  " + "\n  ".join(wrong))
    return found


# -- running a plan -------------------------------------------------------------------------------


def run_plan(plan: Plan, out: Path, *, tune_trials: int, eval_overrides: Iterable[str] = (),
             log: Callable[[str], None] = print) -> dict[str, float]:
    """Run every job in plan order, in this process; a job whose folder already holds a
    complete result is skipped (as segrefine-train does). Returns seconds per job kind."""
    from segrefine.evaluate import evaluate
    from segrefine.results import FILENAME, read_results
    from segrefine.runs import run_recording_failure
    from segrefine.train import train
    from segrefine.tuning import TUNED_FILE, tune_densecrf

    out = Path(out)
    eval_overrides = list(eval_overrides)

    def tuned_file(job: Job) -> Path:
        return job.folder(out) / TUNED_FILE

    seconds = {kind: 0.0 for kind in KINDS}
    for i, job in enumerate(plan.jobs, 1):
        folder = job.folder(out)
        start = time.perf_counter()
        log(f"[study] {i}/{len(plan.jobs)} {job.kind} {job.name}" + (f" ({job.label})" if job.label else ""))
        if job.kind == "tune":
            if not tuned_file(job).is_file():
                source = plan.get("train", job.source).folder(out)
                summary = tune_densecrf(source, folder, trials=tune_trials, overrides=[*job.overrides, *eval_overrides])
                log(f"[study]   {summary['metric']} {summary['best_value']:.4f} tuned ({summary['outcome']} won), "
                    f"{summary['none_value']:.4f} without CRF")
        elif job.kind == "train":
            overrides = runtime_overrides(job, plan, out, tuned_file)
            cfg = compose_train([*overrides, f"paths.output_dir={folder}"])
            run_recording_failure(train, cfg)
        else:
            done = folder / FILENAME
            if not (done.is_file() and read_results(done).get("status") == "complete"):
                source = plan.get("train", job.source).folder(out)
                overrides = runtime_overrides(job, plan, out, tuned_file)
                cfg = compose_eval([f"ckpt_path={source}", *overrides, *eval_overrides, f"paths.output_dir={folder}"])
                run_recording_failure(evaluate, cfg, "eval")
        seconds[job.kind] += time.perf_counter() - start
    return seconds


def describe(plan: Plan) -> str:
    """The plan as a markdown table: job, kind, seed, row, baseline."""
    lines = ["| job | kind | seed | row | Δ against |", "|---|---|---|---|---|"]
    for job in plan.jobs:
        lines.append(f"| {job.name} | {job.kind} | {job.seed} | {job.label} | {job.pairs_with or '–'} |")
    return "\n".join(lines)


def is_volumetric(overrides: Iterable[str]) -> bool:
    """Whether the composed data source is scored per subject volume (has ``volume_dataloader``,
    e.g. msd): the studies then add the 3-D CRF rows."""
    from hydra.utils import get_class

    return hasattr(get_class(compose_train(list(overrides)).data._target_), "volume_dataloader")


# -- the study scripts' shared command line ---------------------------------------------------

# Per preset: Optuna trials of the DenseCRF tuning, and CRF-RNN fine-tuning epochs.
TUNE_TRIALS = {"smoke": 8, "full": 40}
FINETUNE_EPOCHS = {"smoke": 4, "full": 40}
# Run-level override keys that also reach the evaluations and the tuning.
EVAL_KEYS = {"trainer", "logger", "paths", "metrics", "save_predictions"}


def study_args(description: str) -> argparse.ArgumentParser:
    """The options both study scripts share."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="smoke", choices=["smoke", "full"])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--crfrnn-protocol", default="finetune", choices=CRFRNN_PROTOCOLS,
                        help="finetune: from the trained none checkpoint, against a none continuation (Zheng et al.); "
                             "scratch: trained jointly from the start, against the none run")
    parser.add_argument("--finetune-epochs", type=int, help="CRF-RNN fine-tuning epochs (default: 4 smoke, 40 full)")
    parser.add_argument("--tune-trials", type=int, help="DenseCRF tuning trials on val (default: 8 smoke, 40 full; 0 = no tuning)")
    parser.add_argument("--plan-only", action="store_true", help="print the jobs and their pairings, run nothing")
    parser.add_argument("--verbose", action="store_true", help="every library's console output (Lightning banners, wandb, ...)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report of an existing --out study")
    parser.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                        help="Hydra override for the evaluations and tuning only (repeatable), e.g. head.num_workers=1")
    return parser


def preset_defaults(args) -> None:
    """Fill the per-preset defaults of --tune-trials and --finetune-epochs."""
    if args.tune_trials is None:
        args.tune_trials = TUNE_TRIALS[args.preset]
    if args.finetune_epochs is None:
        args.finetune_epochs = FINETUNE_EPOCHS[args.preset]


def run_study(args, plan, out: Path, overrides: list[str], log=print) -> float:
    """Check the plan's pairings, run it, record the command; returns the seconds it took."""
    eval_overrides = [o for o in overrides if o.split("=", 1)[0].split(".")[0].lstrip("+~") in EVAL_KEYS]
    eval_overrides += args.eval_override
    print(describe(plan))
    example = example_tuned_file(out / "plan")
    try:
        check_pairings(plan, out, tuned_file=lambda job: example)
    except ValueError as e:
        raise SystemExit(f"study plan refused, nothing was run: {e}") from None
    if args.plan_only:
        return 0.0
    from segrefine.console import quiet_console

    quiet_console(getattr(args, "verbose", False))
    start = time.perf_counter()
    seconds = run_plan(plan, out, tune_trials=args.tune_trials, eval_overrides=eval_overrides, log=log)
    total = time.perf_counter() - start
    command = " ".join(["python", *sys.argv])
    record_time(out / "study.json", command, total, seconds)
    print(f"study ran in {total / 60:.1f} min ({', '.join(f'{k} {v / 60:.1f}' for k, v in seconds.items())} min)")
    return total


def record_time(path: Path, command: str, seconds: float, by_kind: dict[str, float]) -> dict:
    """Add one run of a study to its ``study.json``: ``command`` stays the first run's, and
    ``seconds``/``by_kind`` are summed over all runs (listed under ``runs``). A rerun that finds
    every job done adds its few seconds instead of replacing the study's time with them."""
    from segrefine.atomic import atomic_write_text

    record = {"command": command, "seconds": 0.0, "by_kind": {}, "runs": []}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            record = {"command": old["command"], "seconds": float(old["seconds"]), "by_kind": dict(old["by_kind"]),
                      "runs": old.get("runs") or [{"command": old["command"], "seconds": float(old["seconds"])}]}
        except (ValueError, KeyError, TypeError) as e:
            print(f"{path}: unreadable ({e}); its earlier runs' time is lost, this run's is recorded")
    record["seconds"] += seconds
    for kind, value in by_kind.items():
        record["by_kind"][kind] = record["by_kind"].get(kind, 0.0) + value
    record["runs"].append({"command": command, "seconds": seconds})
    atomic_write_text(path, json.dumps(record, indent=2))
    return record


def example_tuned_file(folder: Path) -> Path:
    """A stand-in tuned head for checking pairings before any tuning ran (values do not matter:
    tuned parameters compare as "<tuned>")."""
    from omegaconf import OmegaConf

    from segrefine.configs import CONFIG_DIR
    from segrefine.tuning import ENQUEUED, tuned_record

    path = Path(folder) / "densecrf_tuned.example.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    head = OmegaConf.load(Path(CONFIG_DIR, "head", "densecrf.yaml"))
    for key, value in ENQUEUED["pydensecrf"].items():
        head[key] = value
    head.tuned = tuned_record(1, ENQUEUED["pydensecrf"])
    path.write_text(OmegaConf.to_yaml(head))
    return path


# -- the studies' plans -----------------------------------------------------------------------

CRFRNN_PROTOCOLS = ("finetune", "scratch")


def study_plan(
    *,
    experiment: str,
    preset: str,
    seeds: Iterable[int],
    backbones: dict[str, tuple[str, ...]],
    heads: dict[str, tuple[str, ...]],
    densecrf: Iterable[str] = (),
    densecrf_3d: Iterable[str] = (),
    tune: bool = True,
    crfrnn_protocol: str = "finetune",
    finetune_epochs: int | None = None,
    fine_skip_controls: Iterable[str] = (),
    overrides: Iterable[str] = (),
) -> Plan:
    """The jobs of a backbone x head x seed study.

    ``backbones``: job-name prefix -> backbone overrides (e.g. ``{"fcn": ("backbone=fcn",)}``);
    ``heads``: prefix -> trained heads besides ``none``; ``densecrf``: prefixes whose ``none``
    checkpoints get the offline DenseCRF (defaults, and tuned on validation when ``tune``);
    ``densecrf_3d``: prefixes whose ``none`` checkpoints get the 3-D CRF per subject volume
    (``head.volume=true``, rows ``densecrf_3d`` and ``densecrf_3d_tuned``; volumetric data only);
    ``fine_skip_controls``: prefixes trained with ``none`` on ``backbone.fine_skip=true`` beside
    their PointRend (the same stride-4 features fused densely).

    Pairing: a head whose config changes the backbone (U-Net under PointRend stops at stride 4)
    gets a ``none`` run on exactly that backbone; CRF-RNN fine-tuned from the ``none`` checkpoint
    (``crfrnn_protocol=finetune``, Zheng et al.) pairs with a ``none`` continuation given the
    same ``finetune_epochs`` from the same checkpoint; ``scratch`` trains it jointly from the
    start and pairs it with the ``none`` run.
    """
    if crfrnn_protocol not in CRFRNN_PROTOCOLS:
        raise ValueError(f"crfrnn protocol {crfrnn_protocol!r} must be one of {CRFRNN_PROTOCOLS}")
    if crfrnn_protocol == "finetune" and any("crfrnn" in h for h in heads.values()) and not finetune_epochs:
        raise ValueError("the finetune CRF-RNN protocol needs finetune_epochs > 0")
    densecrf, densecrf_3d, controls = set(densecrf), set(densecrf_3d), set(fine_skip_controls)
    unknown = (densecrf | densecrf_3d | controls | set(heads)) - set(backbones)
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not backbones of this study ({sorted(backbones)})")
    from segrefine.labels import HEAD_WORDS, backbone_words

    plan = Plan()
    base = (f"experiment={experiment}", f"preset={preset}", *overrides)
    # Labels name rows, not jobs: the same for every seed, at most 60 characters.
    words = {prefix: backbone_words(_backbone((*base, *backbone, "head=none")), "none")
             for prefix, backbone in backbones.items()}
    for seed in seeds:
        for prefix, backbone in backbones.items():
            common = (*base, *backbone, f"seed={seed}")
            name = words[prefix]
            none = plan.add(Job(f"{prefix}-none-s{seed}", "train", (*common, "head=none"), seed, label=name))
            tuned = None
            if prefix in densecrf:
                plan.add(Job(f"{prefix}-densecrf-s{seed}", "eval", ("head=densecrf",), seed, source=none.name,
                             pairs_with=none.name, label=f"{name} + DenseCRF (defaults)"))
                if tune:
                    tuned = plan.add(Job(none.name, "tune", (), seed, source=none.name,
                                         label=f"DenseCRF parameters of {none.name} on val"))
                    plan.add(Job(f"{prefix}-densecrf_tuned-s{seed}", "eval", ("head=densecrf",), seed,
                                 source=none.name, tuned_from=tuned.name, tuned_head="densecrf", pairs_with=none.name,
                                 label=f"{name} + DenseCRF (tuned on val)"))
            if prefix in densecrf_3d:
                volume = ("head=densecrf", "head.volume=true", "head.name=densecrf_3d")
                plan.add(Job(f"{prefix}-densecrf_3d-s{seed}", "eval", volume, seed, source=none.name,
                             pairs_with=none.name, label=f"{name} + 3-D DenseCRF (defaults)"))
                if tune:
                    tuned_3d = plan.add(Job(f"{prefix}-none-3d-s{seed}", "tune", ("head.volume=true",), seed, source=none.name,
                                            label=f"3-D DenseCRF parameters of {none.name}, val subjects"))
                    plan.add(Job(f"{prefix}-densecrf_3d_tuned-s{seed}", "eval", volume, seed, source=none.name,
                                 tuned_from=tuned_3d.name, tuned_head="densecrf_3d", pairs_with=none.name,
                                 label=f"{name} + 3-D DenseCRF (tuned on val subjects)"))
            for head in heads.get(prefix, ()):
                trained = (*common, f"head={head}")
                if head == "crfrnn" and crfrnn_protocol == "finetune":
                    more = (f"trainer.max_epochs={finetune_epochs}",)
                    cont = plan.add(Job(f"{prefix}-none-continued-s{seed}", "train", (*common, "head=none", *more), seed,
                                        source=none.name, label=f"{name}, none +{finetune_epochs} ep (CRF-RNN's baseline)"))
                    plan.add(Job(f"{prefix}-crfrnn-s{seed}", "train", (*trained, *more), seed, source=none.name,
                                 tuned_from=tuned.name if tuned else None, tuned_head="crfrnn", pairs_with=cont.name,
                                 label=f"{name} + CRF-RNN (fine-tuned +{finetune_epochs} ep"
                                       + (", tuned init)" if tuned else ")")))
                    continue
                # (the seed does not change a backbone: composed once for all seeds)
                matched = changed_backbone([*base, *backbone, "head=none"], [*base, *backbone, f"head={head}"])
                baseline = none
                if matched:
                    job_name = f"{prefix}-none-{'-'.join(m.split('.', 1)[1].replace('=', '') for m in matched)}-s{seed}"
                    matched_words = backbone_words(_backbone((*base, *backbone, "head=none", *matched)), "none")
                    baseline = plan.get("train", job_name) or plan.add(Job(
                        job_name, "train", (*common, "head=none", *matched), seed,
                        label=f"{matched_words} ({HEAD_WORDS.get(head, head)}'s baseline)"))
                protocol = " (from scratch)" if head == "crfrnn" else ""
                plan.add(Job(f"{prefix}-{head}-s{seed}", "train", trained, seed, pairs_with=baseline.name,
                             label=f"{name} + {HEAD_WORDS.get(head, head)}{protocol}"))
                if head == "pointrend" and prefix in controls:
                    plan.add(Job(f"{prefix}-none-fine_skip-s{seed}", "train",
                                 (*common, "head=none", "backbone.fine_skip=true"), seed,
                                 label=f"{name} + stride-4 skip ({HEAD_WORDS.get(head, head)}'s control)"))
    return plan
