"""DDP: two CPU ranks (gloo), inside a Hydra multirun, and the guard on the Lightning patch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning_fabric.strategies.launchers.subprocess_script as fabric_launcher
import pytest
import pytorch_lightning
import pytorch_lightning.strategies.launchers.subprocess_script as trainer_launcher
import torch

from conftest import REPO, TINY, subprocess_env
from segrefine import distributed
from segrefine.distributed import LightningPatchError, use_job_command_for_ddp

BASE = [o for o in TINY if not o.startswith("logger=")] + ["backbone=pspnet"]
CPU_DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m module args`` with this checkout's code and configs."""
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env["SEGREFINE_CONFIG_DIR"] = str(REPO / "conf")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


# --- the guard on the private Lightning function (in-process, fast) ---------------------------

@pytest.fixture
def launchers(monkeypatch):
    """Both launcher modules and this module's launch record, restored after the test whatever
    it patched; no ``LOCAL_RANK``."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(distributed, "_env_before_launch", None)  # no launch by an earlier job
    monkeypatch.setattr(distributed, "_env_at_job_start", {})
    for module in (fabric_launcher, trainer_launcher):
        monkeypatch.setattr(module, "_hydra_subprocess_cmd", module._hydra_subprocess_cmd)
    return fabric_launcher, trainer_launcher


def test_patch_replaces_the_function_in_both_lightning_packages(launchers):
    use_job_command_for_ddp()
    assert all(m._hydra_subprocess_cmd is distributed._job_subprocess_cmd for m in launchers)
    use_job_command_for_ddp()  # again, as every job of a sweep does: still accepted
    assert all(m._hydra_subprocess_cmd is distributed._job_subprocess_cmd for m in launchers)


@pytest.mark.parametrize("which", [0, 1])
def test_missing_private_function_is_a_clear_error(launchers, monkeypatch, which):
    module, other = launchers[which], launchers[1 - which]
    original_other = other._hydra_subprocess_cmd
    monkeypatch.delattr(module, "_hydra_subprocess_cmd")
    with pytest.raises(LightningPatchError) as error:
        use_job_command_for_ddp()
    message = str(error.value)
    assert f"{module.__name__}._hydra_subprocess_cmd does not exist" in message
    assert f"pytorch-lightning {pytorch_lightning.__version__}" in message  # the installed version
    assert "pip install 'pytorch-lightning==2.6.*'" in message and "torchrun --nproc_per_node" in message
    assert other._hydra_subprocess_cmd is original_other  # nothing half-patched


def test_changed_signature_is_a_clear_error(launchers, monkeypatch):
    monkeypatch.setattr(trainer_launcher, "_hydra_subprocess_cmd", lambda local_rank, node_rank: ([], ""))
    with pytest.raises(LightningPatchError, match=r"_hydra_subprocess_cmd has the signature \(local_rank, node_rank\)"):
        use_job_command_for_ddp()
    assert fabric_launcher._hydra_subprocess_cmd is not distributed._job_subprocess_cmd


def test_launcher_that_no_longer_calls_the_function_is_a_clear_error(launchers, monkeypatch):
    # The name still exists but the launcher builds its command elsewhere: replacing it would do nothing.
    monkeypatch.setattr(fabric_launcher._SubprocessScriptLauncher, "_call_children_scripts", lambda self: None)
    with pytest.raises(LightningPatchError, match="_call_children_scripts no longer calls _hydra_subprocess_cmd"):
        use_job_command_for_ddp()


def test_ranks_started_outside_lightning_need_no_patch(launchers, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun, or a rank Lightning started
    monkeypatch.delattr(fabric_launcher, "_hydra_subprocess_cmd")
    use_job_command_for_ddp()  # no error: Lightning's launcher does not re-run the command then
    assert trainer_launcher._hydra_subprocess_cmd is not distributed._job_subprocess_cmd


def test_next_job_ends_the_previous_jobs_launch(launchers, monkeypatch, tmp_path):
    # What a job's DDP launch leaves in the launching process: Lightning's variables (LOCAL_RANK
    # makes the next job's Lightning take the ranks as started outside) and the process group.
    monkeypatch.setenv("MASTER_PORT", "1234")  # the user's own, kept
    for key in ("MASTER_ADDR", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    use_job_command_for_ddp()  # job 1 starts
    monkeypatch.setattr(distributed, "_env_before_launch", distributed._env_at_job_start)  # it launched ranks
    leftovers = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "5678", "NODE_RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    for key, value in leftovers.items():
        monkeypatch.setenv(key, value)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for module in launchers:  # as before job 1's patch, to see job 2 patch again
            monkeypatch.setattr(module, "_hydra_subprocess_cmd", lambda local_rank: ([], ""))
        use_job_command_for_ddp()  # job 2 starts
        assert not torch.distributed.is_initialized()
        assert {key: os.environ.get(key) for key in leftovers} == {
            "MASTER_ADDR": None, "MASTER_PORT": "1234", "NODE_RANK": None, "LOCAL_RANK": None, "WORLD_SIZE": None}
        assert all(m._hydra_subprocess_cmd is distributed._job_subprocess_cmd for m in launchers)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_a_job_that_launched_nothing_leaves_the_environment_alone(launchers, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    use_job_command_for_ddp()
    use_job_command_for_ddp()
    assert os.environ["WORLD_SIZE"] == "2"


# --- real runs on two CPU processes ----------------------------------------------------------

def ddp_sweep(*launch: str, tmp_path: Path, data_dir: Path) -> tuple[subprocess.CompletedProcess, list[Path]]:
    """A 2-job (seed=0,1) x 2-rank CPU multirun started by ``launch``; checks what every such
    sweep must leave and returns the run and its two job folders (seed 0, seed 1)."""
    sweep = tmp_path / "logs" / "sweep"
    proc = cli(*launch, "segrefine.train", "-m", *BASE, *CPU_DDP, "logger=none", "seed=0,1",
               f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep}",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: "seed-1" in p.name.split("+"))
    assert len(jobs) == 2 and ["seed-0" in jobs[0].name.split("+"), "seed-1" in jobs[1].name.split("+")] == [True, True]
    # No other sweep or run folder anywhere (a rerun sweep would keep hydra.sweep.dir, hence the
    # stdout checks in the callers).
    assert list(tmp_path.rglob("multirun.yaml")) == [sweep / "multirun.yaml"]
    assert sorted(p.parent for p in tmp_path.rglob("results.json")) == sorted(jobs)
    assert sorted(p.parent for p in tmp_path.rglob(".hydra")) == sorted(jobs)
    for job, seed in zip(jobs, (0, 1)):
        results = json.loads((job / "results.json").read_text())
        assert results["status"] == "complete" and results["seed"] == seed
        assert sorted(r["id"] for r in results["per_image"]) == [f"test_{i:05d}" for i in range(8)]
        # 16 training images, batches of 8: one step per epoch on each of 2 ranks (2 on one).
        assert results["metrics"]["train/steps"] == 16 // (2 * 8)
    return proc, jobs


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_multirun_of_two_jobs_on_two_ranks_runs_each_job_once(tmp_path, data_dir):
    proc, jobs = ddp_sweep(tmp_path=tmp_path, data_dir=data_dir)
    # Only rank 0 ran the sweep: a rank that reran it would announce it on the shared stdout.
    assert proc.stdout.count("Launching 2 jobs locally") == 1, proc.stdout[-3000:]
    for job in jobs:  # each job had its own rank 1, run in the job's folder as a plain run
        assert (job / "train_ddp_rank_1.log").is_file()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_multirun_under_torchrun_needs_no_patch(tmp_path, data_dir):
    # The supported alternative: torchrun starts both ranks, and each runs the sweep in step.
    proc, jobs = ddp_sweep("torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           tmp_path=tmp_path, data_dir=data_dir)
    assert proc.stdout.count("Launching 2 jobs locally") == 2  # once per rank
    assert not list(tmp_path.rglob("*_ddp_rank_*.log"))  # Lightning started no rank


@pytest.mark.timeout(900)
@pytest.mark.slow  # a CLI run on two processes; the 2-job x 2-rank multirun (slow) covers it too
def test_ddp_on_two_cpu_processes(tmp_path, data_dir):
    run = tmp_path / "ddp"
    proc = cli("segrefine.train", *BASE, *CPU_DDP, "data.batch_size=4", f"paths.data_dir={data_dir}",
               f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in run.glob("results.json")] == ["results.json"]
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # one wandb run, from rank 0
    trained = json.loads((run / "results.json").read_text())
    assert sorted(r["id"] for r in trained["per_image"]) == [f"test_{i:05d}" for i in range(8)]
    # The same checkpoint tested by one process and by two gives the same numbers.
    single, double = tmp_path / "eval1", tmp_path / "eval2"
    for out, devices in ((single, 1), (double, 2)):
        strategy = ["trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={devices}"] if devices > 1 else ["trainer.accelerator=cpu"]
        proc = cli("segrefine.evaluate", f"ckpt_path={run}", *strategy, "logger=none", f"hydra.run.dir={out}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((d / "results.json").read_text()) for d in (single, double))
    for key in ("test/iou", "test/dice", "test/pixel_acc", "test/boundary_f1"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], abs=1e-9)
    assert [r["id"] for r in two["per_image"]] == [r["id"] for r in one["per_image"]]
