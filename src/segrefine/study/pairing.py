"""The pairing check: the report pairs a head with the baseline run (``head.name`` the
report's ``BASELINE_HEAD``) whose ``comparable_config(config, drop=("seed",))`` differs only
in ``head`` (and has the same seed), so every plan is checked against that rule by composing
its configs, without training."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from segrefine.study.plan import Job, Plan, job_config


def pairings(configs: dict[tuple[str, str], dict[str, Any]]) -> dict[tuple[str, str], list[str]]:
    """For every job that is not a baseline, the baseline train jobs of the same seed whose
    comparable config differs from it only in ``head``: the report's pairing rule."""
    from segrefine.analysis.rows import BASELINE_HEAD
    from segrefine.runconfig import comparable_config, config_differences

    nones = {name: (c["seed"], comparable_config(c, drop=("seed",))) for (kind, name), c in configs.items()
             if kind == "train" and c["head"]["name"] == BASELINE_HEAD}
    out = {}
    for key, config in configs.items():
        if config["head"]["name"] == BASELINE_HEAD:
            continue
        mine = comparable_config(config, drop=("seed",))
        out[key] = sorted(
            name for name, (seed, none) in nones.items()
            if seed == config["seed"]
            and all(d == "head" or d.startswith("head.") for d in config_differences(mine, none))
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
