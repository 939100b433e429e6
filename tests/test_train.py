"""The training entry point end to end: results.json, multirun, resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from segrefine.callbacks import NonFiniteLossError
from segrefine.checkpoints import CheckpointError
from segrefine.data.common import DataError
from segrefine.heads.none import NoHead
from segrefine.report import load_study, summarise
from segrefine.train import train

from conftest import TINY, subprocess_env


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "segrefine.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_multirun_one_job_per_backbone_each_with_results_and_own_wandb_run(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    overrides = [o for o in TINY if not o.startswith("logger=")]
    proc = run_cli("-m", *overrides, f"paths.data_dir={data_dir}", "backbone=fcn,pspnet",
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(sweep.glob("*/results.json"))
    assert len(results) == 2
    runs = [json.loads(p.read_text()) for p in results]
    assert sorted(r["backbone"] for r in runs) == ["fcn", "pspnet"]
    wandb_ids = set()
    for path, run in zip(results, runs):
        assert run["status"] == "complete" and run["job_type"] == "train" and run["head"] == "none"
        for key in ("test/iou", "test/dice", "test/pixel_acc", "test/boundary_f1", "test/ms_per_image", "params"):
            assert key in run["metrics"], key
        assert [row["id"] for row in run["per_image"]] == [f"test_{i:05d}" for i in range(8)]
        assert (path.parent / run["checkpoint"]).is_file()
        assert run["wandb"]["mode"] == "offline"
        (offline_run,) = (path.parent / "wandb").glob(f"offline-run-*-{run['wandb']['id']}")
        assert (offline_run / f"run-{run['wandb']['id']}.wandb").is_file()
        media = offline_run / "files" / "media"
        assert list(media.glob("images/val/overlays_*.png"))  # validation overlays
        assert list(media.glob("images/mask/val/*.mask.png"))  # ... with their ground-truth/prediction masks
        assert list(media.glob("table/test/per_image_*.table.json"))  # per-image metrics table
        wandb_ids.add(run["wandb"]["id"])
    assert len(wandb_ids) == 2
    rows, _ = summarise(load_study([sweep]).runs)
    assert [(r.label, len(r.runs)) for r in rows] == [("FCN-8s", 1), ("PSPNet", 1)]


def test_train_returns_metrics_and_writes_results(make_cfg, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = train(make_cfg("backbone=pspnet", "print_config=true", output_dir=out))
    assert "backbone:" in capsys.readouterr().out  # print_config shows the composed config
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"]["test/iou"] == pytest.approx(metrics["test/iou"])
    assert saved["config"]["backbone"]["name"] == "pspnet"
    per_image_mean_acc = sum(r["pixel_acc"] for r in saved["per_image"]) / len(saved["per_image"])
    assert 0 < per_image_mean_acc <= 1


def test_continuing_a_run_under_a_longer_schedule_is_refused(make_cfg, tmp_path):
    # The recorded max_epochs would not be the schedule the model was trained with (the LR
    # decay was planned for the old one). Resuming the same config: tests/test_failsafe.py.
    out = tmp_path / "run"
    train(make_cfg("backbone=pspnet", output_dir=out))
    first = (out / "results.json").read_text()
    with pytest.raises(CheckpointError, match=r"differs in trainer\.max_epochs\).*pass another ckpt_path"):
        train(make_cfg("backbone=pspnet", "trainer.max_epochs=2", "ckpt_path=last", output_dir=out))
    assert (out / "results.json").read_text() == first


def test_resume_without_checkpoint_is_a_clear_error(make_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path='last'.*last.ckpt"):
        train(make_cfg("ckpt_path=last", output_dir=tmp_path / "fresh"))
    assert not (tmp_path / "fresh").exists()


def test_non_finite_loss_stops_and_names_the_step(make_cfg, tmp_path, monkeypatch):
    original = NoHead.losses
    calls = {"n": 0}

    def losses(self, out, image, mask):
        calls["n"] += 1
        result = original(self, out, image, mask)
        if calls["n"] == 2:
            result["loss"] = result["loss"] * float("nan")
        return result

    monkeypatch.setattr(NoHead, "losses", losses)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at step 1"):
        train(make_cfg("backbone=pspnet", "data.batch_size=4", output_dir=out))
    assert not (out / "results.json").exists()


def test_bad_data_fails_before_anything_is_written(make_cfg, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DataError, match="does not exist"):
        train(make_cfg("data=folder", f"data.root={tmp_path / 'missing'}", output_dir=out))
    assert not out.exists()


def test_unknown_group_option_lists_the_valid_ones(tmp_path):
    proc = run_cli("backbone=resnet", f"hydra.run.dir={tmp_path / 'never'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'backbone/resnet'" in proc.stderr
    assert "fcn" in proc.stderr and "pspnet" in proc.stderr and "unet" in proc.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["fcn", "unet", "pspnet"])
def test_every_backbone_beats_the_majority_class(make_cfg, tmp_path, backbone):
    # The smoke preset's schedule (conf/preset/smoke.yaml).
    metrics = train(make_cfg(f"backbone={backbone}", "data.image_size=64", "data.num_train=192", "data.num_val=32",
                             "data.num_test=32", "data.batch_size=16", "trainer.max_epochs=8", output_dir=tmp_path / "run"))
    # Predicting background everywhere scores IoU 0 on every foreground class.
    assert metrics["test/iou"] > 0.3
