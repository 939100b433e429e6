"""Scale-out and faults: launchers, resumable sweeps, fault isolation, determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, subprocess_env
from segrefine.report import load_study
from segrefine.train import train

pytestmark = pytest.mark.timeout(900)
BASE = [o for o in TINY if not o.startswith("logger=")] + ["backbone=pspnet"]


def cli(module: str, *args: str, cwd: Path, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *args]
    env = subprocess_env()
    if kwargs.pop("background", False):
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def wait_for_file(root: Path, pattern: str, process: subprocess.Popen, timeout: float = 600) -> bool:
    """Block until a file matching ``pattern`` exists under ``root``; False if ``process`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(root.glob(pattern)):
            return True
        try:
            process.wait(timeout=0.02)  # sleeps, but returns at once when the process ends
            return any(root.glob(pattern))
        except subprocess.TimeoutExpired:
            continue
    return False


def job(sweep: Path, override: str) -> Path:
    """The job folder of a sweep whose name (the job's overrides, ``key-value`` joined by ``+``)
    holds ``override`` (``key=value``)."""
    part = override.replace("=", "-", 1)
    (folder,) = [p for p in sweep.iterdir() if p.is_dir() and part in p.name.split("+")]
    return folder


@pytest.mark.slow  # the submitit launcher end to end (a CLI subprocess)
def test_submitit_local_sweep_completes(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    proc = cli("segrefine.train", "-m", *BASE, "logger=none", "seed=0,1", "hydra/launcher=submitit_local",
               "hydra.launcher.timeout_min=10", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all((job(sweep, f"seed={s}") / "results.json").exists() for s in (0, 1))


@pytest.mark.slow  # ~20 s of CLI sweeps; the resume rules are tested in-process (test_failsafe), a stopped sweep in test_faults
def test_killed_sweep_resumes_and_skips_finished_jobs(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    args = ["-m", *BASE, "trainer.max_epochs=6", "seed=0,1", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}"]
    process = cli("segrefine.train", *args, cwd=tmp_path, background=True)
    # Checkpoints are written atomically (temp file + rename), so once last.ckpt exists it is whole.
    assert wait_for_file(sweep, "*seed-1*/checkpoints/last.ckpt", process), "the sweep ended before job 2 saved a checkpoint"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first, second = job(sweep, "seed=0"), job(sweep, "seed=1")
    second_ckpt = second / "checkpoints" / "last.ckpt"
    assert (first / "results.json").exists() and not (second / "results.json").exists()
    first_done = (first / "results.json").stat().st_mtime_ns
    first_ckpt = (first / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    interrupted = torch.load(second_ckpt, weights_only=True)
    interrupted_wandb = sorted((second / "wandb").glob("offline-run-*"))[0].name.rsplit("-", 1)[1]

    proc = cli("segrefine.train", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (first / "results.json").stat().st_mtime_ns == first_done  # skipped, untouched
    assert (first / "checkpoints" / "last.ckpt").stat().st_mtime_ns == first_ckpt
    resumed = torch.load(second_ckpt, weights_only=True)
    assert interrupted["epoch"] < 5 and resumed["epoch"] > interrupted["epoch"]
    assert resumed["global_step"] == 6 * 2  # 6 epochs of 2 batches: nothing trained twice
    done = json.loads((second / "results.json").read_text())
    assert done["status"] == "complete" and done["wandb"]["id"] == interrupted_wandb


@pytest.mark.slow  # ~10 s of CLI multirun (test_train runs a multirun in the default suite)
def test_a_failing_job_does_not_stop_the_others(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    proc = cli("segrefine.train", "-m", *BASE, "logger=none", "backbone.encoder_name=resnet18,resnet_nope",
               f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode != 0  # the sweep reports the failure ...
    assert (job(sweep, "backbone.encoder_name=resnet18") / "results.json").exists()  # ... after the rest ran
    failed = job(sweep, "backbone.encoder_name=resnet_nope")
    assert "resnet_nope" in (failed / "error.txt").read_text() and not (failed / "results.json").exists()
    study = load_study([sweep])
    assert len(study.runs) == 1 and [Path(p).name for p, _ in study.incomplete] == [failed.name]
    assert "resnet_nope" in study.incomplete[0][1]


def test_same_config_and_seed_give_identical_metrics(make_cfg, tmp_path):
    first = train(make_cfg("backbone=pspnet", output_dir=tmp_path / "a"))
    second = train(make_cfg("backbone=pspnet", output_dir=tmp_path / "b"))
    for key in ("test/iou", "test/dice", "test/pixel_acc", "test/boundary_f1", "val/loss"):
        assert first[key] == second[key], key  # bitwise on CPU
