"""DDP under Hydra: every rank must run the same *single* job in the same output folder.

Why a patch. With ``strategy=ddp`` Lightning's launcher starts ranks 1..N-1 by re-running the
command line; when Hydra is initialised it builds that command with its private
``_hydra_subprocess_cmd`` (``sys.argv`` plus ``hydra.run.dir=...``). Under a Hydra multirun
``sys.argv`` is the whole sweep, so every extra rank would start the sweep again and run its
jobs in step with rank 0 only by luck. ``use_job_command_for_ddp()`` replaces that function, in
both Lightning packages (each holds its own reference), with one that re-runs only the current
job: its config, its overrides and ``hydra.run.dir=<this job's folder>``. Rank 1 logs to
``<job folder>/<job name>_ddp_rank_1.log`` and writes no ``.hydra/``; rank 0 alone writes
``results.json``.

Between jobs. Lightning leaves the launch in the launching process: ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, ``NODE_RANK`` and the process group (destroyed
only at exit). The next job's Lightning would then take the ranks as started outside, start
none, and wait for the exited ones. So each call (one per job) first destroys the previous
job's process group and restores those variables, if that job launched ranks.

What is checked. The function is private, so before replacing it ``use_job_command_for_ddp()``
checks, in both ``lightning_fabric`` and ``pytorch_lightning``, that ``_hydra_subprocess_cmd``
exists, takes ``(local_rank)`` (``inspect.signature``) and is still looked up by
``_SubprocessScriptLauncher._call_children_scripts``. If not, it raises ``LightningPatchError``
naming the installed Lightning version and the fix, rather than silently leaving the
sweep-relaunching command in place. Tested with Lightning 2.6 (``TESTED_LIGHTNING``).

The supported alternative: start the ranks outside Lightning. When ``LOCAL_RANK`` is set
(torchrun) or SLURM provides the ranks, Lightning's cluster environments detect the external
processes and its launcher re-runs nothing; the patch is then not needed (and skipped when
``LOCAL_RANK`` is set):

- torchrun, one machine: ``torchrun --standalone --nproc_per_node=2 -m segrefine.train
  trainer=ddp trainer.devices=2 hydra.run.dir=<folder>`` (fix ``hydra.run.dir``: the default has
  a timestamp, which the ranks could disagree on). With ``-m`` every rank runs the whole sweep,
  the jobs in the same order and folders (sweep folders have no timestamp), one process group
  for all of them; with the basic launcher only (not joblib).
- SLURM through submitit: ``-m hydra/launcher=slurm hydra.launcher.tasks_per_node=<gpus>
  hydra.launcher.gpus_per_node=<gpus> trainer=ddp`` (``SLURMEnvironment`` reads the ranks).

Neither keeps a plain ``segrefine-train -m ... trainer=ddp`` working on one machine:
``submitit_local`` with ``tasks_per_node>1`` starts the tasks but sets only ``SUBMITIT_LOCAL_*``
variables, which no Lightning environment reads, and ``strategy=ddp_spawn`` (no re-run) brings
back only the weights and logged metrics from its worker processes, so the per-image rows the
test step gathers on rank 0 would be lost. Hence the checked patch.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Sequence

import torch

# The Lightning minor version this patch was checked against (the guard below checks the rest).
TESTED_LIGHTNING = "2.6"
_PATCHED = "_hydra_subprocess_cmd"
_LAUNCHER_MODULES = (
    "lightning_fabric.strategies.launchers.subprocess_script",
    "pytorch_lightning.strategies.launchers.subprocess_script",
)


# What Lightning's launcher writes into the launching process's own environment, and leaves there.
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Those variables as they were before this process last launched DDP ranks (None: it has not).
_env_before_launch: dict[str, str | None] | None = None
_env_at_job_start: dict[str, str | None] = {}


class LightningPatchError(RuntimeError):
    """The installed Lightning no longer has the private launcher function this module replaces."""


def _job_subprocess_cmd(local_rank: int) -> tuple[Sequence[str], str]:
    import __main__
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    global _env_before_launch
    _env_before_launch = _env_at_job_start  # Lightning has just set _LAUNCH_ENV in os.environ
    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    for source in hydra_cfg.runtime.config_sources:
        if source.provider == "command-line":
            command.append(f"--config-dir={source.path}")
    command.append(f"--config-name={hydra_cfg.job.config_name}")
    command += list(hydra_cfg.overrides.task)
    command += [
        f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',
        f"hydra.job.name={hydra_cfg.job.name}_ddp_rank_{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def _patch_problem(module) -> str | None:
    """Why ``module._hydra_subprocess_cmd`` cannot be replaced usefully, or None."""
    where = f"{module.__name__}.{_PATCHED}"
    original = getattr(module, _PATCHED, None)
    if not callable(original):
        return f"{where} does not exist"
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):
        return f"{where} has no readable signature"
    expected = inspect.signature(_job_subprocess_cmd)
    # Lightning calls it as f(local_rank) and f(local_rank=...): same names and kinds needed.
    if [(p.name, p.kind) for p in signature.parameters.values()] != [
        (p.name, p.kind) for p in expected.parameters.values()
    ]:
        return f"{where} has the signature {signature}, not {expected}"
    launcher = getattr(module, "_SubprocessScriptLauncher", None)
    spawn = getattr(launcher, "_call_children_scripts", None)
    code = getattr(spawn, "__code__", None)
    if code is None or _PATCHED not in code.co_names:
        # Replacing the name would then change nothing: the launcher builds its command elsewhere.
        return f"{module.__name__}._SubprocessScriptLauncher._call_children_scripts no longer calls {_PATCHED}"
    return None


def _lightning_version() -> str:
    try:
        import pytorch_lightning

        return pytorch_lightning.__version__
    except Exception:  # the version is only for the message
        return "unknown"


def _end_previous_launch() -> None:
    """Undo what the previous job's DDP launch left in this process: its ranks have exited, but
    its process group and ``LOCAL_RANK`` & co. remain, so the next job's Lightning would take the
    ranks as started outside, start none, and wait for the old ones (a gloo "Connection closed by
    peer"). Lightning itself destroys the group only at exit."""
    global _env_before_launch
    if _env_before_launch is None:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in _env_before_launch.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _env_before_launch = None


def use_job_command_for_ddp() -> None:
    """Make Lightning's DDP ranks 1..N-1 re-run only the current Hydra job (see the module
    docstring); called at the start of every job. Raises ``LightningPatchError`` when the
    installed Lightning cannot be patched."""
    global _env_at_job_start
    _end_previous_launch()
    _env_at_job_start = {key: os.environ.get(key) for key in _LAUNCH_ENV}
    if "LOCAL_RANK" in os.environ:
        return  # ranks started outside Lightning (torchrun) or this is a started rank: no re-run

    modules = [importlib.import_module(name) for name in _LAUNCHER_MODULES]
    problems = [problem for problem in map(_patch_problem, modules) if problem]
    if problems:
        raise LightningPatchError(
            f"segrefine cannot make DDP work under Hydra with the installed pytorch-lightning "
            f"{_lightning_version()} (tested with {TESTED_LIGHTNING}.x): {'; '.join(problems)}. "
            "Without this, each extra DDP rank of a multirun would rerun the whole sweep. Fix: install "
            f"the tested version (pip install 'pytorch-lightning=={TESTED_LIGHTNING}.*'), or start the ranks outside "
            "Lightning: torchrun --nproc_per_node=N -m segrefine.train ... hydra.run.dir=<folder>, or "
            "on SLURM hydra/launcher=slurm hydra.launcher.tasks_per_node=N"
        )
    for module in modules:
        setattr(module, _PATCHED, _job_subprocess_cmd)


def use_job_command_under_hydra() -> None:
    """``use_job_command_for_ddp`` when the job runs under Hydra (a plain ``train(cfg)`` call
    from a notebook or test has no job command to re-run)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        use_job_command_for_ddp()


def gather_objects(obj, world_size: int) -> list:
    """``obj`` from every rank (``[obj]`` without a process group)."""
    if world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
