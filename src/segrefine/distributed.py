"""DDP under Hydra: every rank must run the same *single* job in the same output folder.

Lightning starts ranks 1..N-1 of ``strategy=ddp`` by re-running the command line. Under a
Hydra multirun that command is the whole sweep, so each extra rank would start the sweep
again. ``use_job_command_for_ddp()`` makes Lightning re-run only the current job instead:
its own overrides plus ``hydra.run.dir=<this job's folder>``. Under torchrun or SLURM the
ranks are started outside and nothing changes.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch


def _job_subprocess_cmd(local_rank: int) -> tuple[Sequence[str], str]:
    import __main__
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

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


def use_job_command_for_ddp() -> None:
    # Both Lightning packages hold their own reference to the function.
    from lightning_fabric.strategies.launchers import subprocess_script as fabric_launcher
    from pytorch_lightning.strategies.launchers import subprocess_script as trainer_launcher

    fabric_launcher._hydra_subprocess_cmd = _job_subprocess_cmd
    trainer_launcher._hydra_subprocess_cmd = _job_subprocess_cmd


def gather_objects(obj, world_size: int) -> list:
    """``obj`` from every rank (``[obj]`` without a process group)."""
    if world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
