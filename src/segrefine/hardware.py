"""What a timing was measured on: ``describe(device)`` for results files and benchmark headers.

A ``ms/img`` figure means little without the CPU (and how many of its cores the process may
use), torch's thread count and, on CUDA, the GPU; every benchmark prints this dict next to
its table.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

import torch


def cgroup_cpu_quota(root: str | Path = "/sys/fs/cgroup", membership: str | Path = "/proc/self/cgroup") -> float | None:
    """The CPU time this process's cgroups allow, in CPUs (``docker --cpus``, a Kubernetes CPU
    limit), or None without a quota. cgroup v2 (``cpu.max``) and v1 (``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``); the tightest quota on the way from the process's group up to the
    hierarchy's root counts, since every level applies. Files that are missing or unreadable
    mean no quota there (Linux only; elsewhere None)."""
    root = Path(root)
    try:
        lines = Path(membership).read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, group = parts
        if hierarchy == "0" and controllers == "":  # v2: one unified hierarchy
            base, read = root, _cpu_max
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own mount
            base = next((root / name for name in (controllers, "cpu", "cpu,cpuacct") if (root / name).is_dir()), None)
            read = _cfs_quota
            if base is None:
                continue
        else:
            continue
        # inside a container the group path may be the host's, absent here: the mount's root is
        # then the container's own group
        folder = base / group.lstrip("/")
        for level in [folder, *folder.parents]:  # up to the mount's root, which is always read
            quota = read(level)
            if quota is not None:
                quotas.append(quota)
            if level == base:
                break
    return min(quotas) if quotas else None


def _cpu_max(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _cfs_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroups cpusets, SLURM
    binding), further limited by a cgroup CPU quota (a container's ``--cpus``, rounded up)
    and by ``SLURM_CPUS_PER_TASK`` when set; ``os.cpu_count()`` counts the whole machine
    instead."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm:
        try:
            cpus = min(cpus, int(slurm))
        except ValueError:
            raise ValueError(f"SLURM_CPUS_PER_TASK={slurm!r} is not an integer") from None
    return max(1, cpus)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe(device: torch.device | str = "cpu") -> dict:
    """The hardware a timing on ``device`` ran on, as a JSON-ready dict:
    ``cpu`` (model), ``usable_cpus`` (:func:`available_cpus`), ``torch_threads``,
    ``device`` (``cpu`` or ``cuda:N``), ``gpu`` (name, or None off CUDA), ``torch`` (version)
    and ``cuda`` (torch's CUDA version, None for a CPU build)."""
    device = torch.device(device)
    gpu = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        device = torch.device("cuda", index)
        gpu = torch.cuda.get_device_name(index)
    return {
        "cpu": cpu_model(),
        "usable_cpus": available_cpus(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def summary(device: torch.device | str = "cpu", threads: bool = True) -> str:
    """One line for a benchmark header, e.g. ``CPU Intel Xeon (2 usable CPUs), 2 torch threads, torch 2.4``
    (``threads=False`` leaves the thread count out, for tables that give it per row)."""
    h = describe(device)
    where = f"GPU {h['gpu']} ({h['device']}), " if h["gpu"] else ""
    nthreads = f"{h['torch_threads']} torch threads, " if threads else ""
    return f"{where}CPU {h['cpu']} ({h['usable_cpus']} usable CPUs), {nthreads}torch {h['torch']}"
