from __future__ import annotations

import os

import pytest
import torch

from segrefine import hardware
from segrefine.heads.densecrf import DenseCRFHead, default_workers

affinity = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs os.sched_getaffinity")


@affinity
def test_available_cpus_follows_affinity_and_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})
    assert hardware.available_cpus() == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert hardware.available_cpus() == 2
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")  # cannot exceed the affinity mask
    assert hardware.available_cpus() == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "two")
    with pytest.raises(ValueError, match="SLURM_CPUS_PER_TASK"):
        hardware.available_cpus()


@affinity
def test_densecrf_pool_split_among_local_ranks(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers() == 2
    assert DenseCRFHead(3).num_workers == 2
    assert DenseCRFHead(3, num_workers=5).num_workers == 5  # an explicit size wins
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # more ranks than CPUs: still one worker
    assert default_workers() == 1


def test_describe_cpu(monkeypatch):
    torch_threads = torch.get_num_threads()
    info = hardware.describe("cpu")
    assert set(info) == {"cpu", "usable_cpus", "torch_threads", "device", "gpu", "torch", "cuda"}
    assert info["device"] == "cpu" and info["gpu"] is None
    assert info["torch_threads"] == torch_threads
    assert info["usable_cpus"] == hardware.available_cpus()
    assert info["torch"] == torch.__version__
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert f"({info['usable_cpus']} usable CPUs), {torch_threads} torch threads" in hardware.summary("cpu")
    assert "torch threads" not in hardware.summary("cpu", threads=False)


def test_describe_cuda_names_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"Fake GPU {index}")
    info = hardware.describe("cuda")
    assert info["device"] == "cuda:1" and info["gpu"] == "Fake GPU 1"
    assert hardware.describe("cuda:0")["gpu"] == "Fake GPU 0"
    assert hardware.summary("cuda").startswith("GPU Fake GPU 1 (cuda:1)")
