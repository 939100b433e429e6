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
    monkeypatch.setattr(hardware, "cgroup_cpu_quota", lambda: None)  # whatever this machine's container allows
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
    monkeypatch.setattr(hardware, "cgroup_cpu_quota", lambda: None)
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


def _cgroup_tree(tmp_path, membership: str, files: dict[str, str]):
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    (tmp_path / "cgroup").write_text(membership)
    return dict(root=tmp_path / "fs", membership=tmp_path / "cgroup")


def test_cgroup_v2_quota_is_the_tightest_on_the_way_up(tmp_path):
    paths = _cgroup_tree(tmp_path, "0::/jobs/run1\n", {
        "cpu.max": "max 100000\n", "jobs/cpu.max": "350000 100000\n", "jobs/run1/cpu.max": "max 100000\n"})
    assert hardware.cgroup_cpu_quota(**paths) == 3.5  # the parent's limit applies to the child
    unlimited = _cgroup_tree(tmp_path / "free", "0::/\n", {"cpu.max": "max 100000\n"})
    assert hardware.cgroup_cpu_quota(**unlimited) is None


def test_cgroup_v1_quota_and_a_container_that_sees_its_group_as_the_root(tmp_path):
    paths = _cgroup_tree(tmp_path, "5:memory:/x\n4:cpu,cpuacct:/docker/abc\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert hardware.cgroup_cpu_quota(**paths) == 1.5
    # inside the container the host's group path does not exist: the mount's root is its group
    inside = _cgroup_tree(tmp_path / "in", "0::/kubepods/pod1/c1\n", {"cpu.max": "200000 100000\n"})
    assert hardware.cgroup_cpu_quota(**inside) == 2.0
    assert hardware.cgroup_cpu_quota(root=tmp_path / "none", membership=tmp_path / "missing") is None


@affinity
def test_available_cpus_respects_a_container_cpu_limit(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(hardware, "cgroup_cpu_quota", lambda: 2.5)  # docker --cpus 2.5 on 16 cores
    assert hardware.available_cpus() == 3
    assert default_workers() == 3
    monkeypatch.setattr(hardware, "cgroup_cpu_quota", lambda: 0.2)
    assert hardware.available_cpus() == 1
    monkeypatch.setattr(hardware, "cgroup_cpu_quota", lambda: None)
    assert hardware.available_cpus() == 16
