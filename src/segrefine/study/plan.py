"""A study as data: the jobs it runs and the configs they compose to.

A plan is a list of ``Job``s. ``train`` jobs train (``segrefine.train``), ``tune`` jobs choose
a post-hoc head's parameters for a baseline checkpoint on the validation split
(``segrefine.tuning``), ``eval`` jobs evaluate a checkpoint under a post-hoc head
(``segrefine.evaluate``). A job that is compared with a baseline run names it in
``pairs_with``; ``segrefine.study.pairing`` checks that the report will pair it so. The
studies' plans, the only study modules that name heads, are built in
``segrefine.study.paper_table`` and ``segrefine.study.origin``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import OmegaConf

from segrefine.configs import compose

KINDS = ("train", "tune", "eval")


@dataclass(frozen=True)
class Job:
    name: str                       # unique; the job's folder is <out>/<kind>/<name>
    kind: str                       # train | tune | eval
    overrides: tuple[str, ...]      # Hydra overrides (train config for train jobs, eval config for eval jobs)
    seed: int
    source: str | None = None       # train job: init_from; tune/eval job: the checkpoint
    tuned_from: str | None = None   # tune job whose parameters this job's head takes
    tuned_name: str | None = None   # head.name the tuned head takes; None keeps the head's
    pairs_with: str | None = None   # the baseline train job this job's Δ is against
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
    return compose("train", overrides)


def compose_eval(overrides: Iterable[str]):
    return compose("eval", overrides)


def changed_backbone(base: list[str], with_head: list[str]) -> list[str]:
    """Overrides that give ``base`` the backbone ``with_head`` composes to (e.g. U-Net's
    ``output_stride=4`` under PointRend): the matched baseline's backbone."""
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
    and tuned parameters (``tuned_file(tune_job)`` -> the head file its tuning wrote)."""
    from segrefine.tuning import tuned_overrides

    overrides = list(job.overrides)
    if job.label and job.kind != "tune":  # the row in words: the run's label (run-only, no new row)
        overrides.append(f'label="{job.label}"')
    if job.source is not None and job.kind == "train":
        overrides.append(f"init_from={plan.get('train', job.source).folder(out).resolve()}")
    if job.tuned_from is not None:
        overrides += tuned_overrides(tuned_file(plan.get("tune", job.tuned_from)), name=job.tuned_name)
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
