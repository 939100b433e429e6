"""Never a silent wrong result: resume and evaluate only what matches, safe loading of
checkpoints and stored configs, honest failure records."""

from __future__ import annotations

import errno
import functools
import json
import pathlib
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import segrefine.runs
import segrefine.tracking
from conftest import CONFIG_DIR, REPO
from segrefine.checkpoints import CheckpointError, check_targets
from segrefine.evaluate import evaluate, force_data_keys
from segrefine.heads.none import NoHead
from segrefine.runconfig import comparable_config
from segrefine.tracking import wandb_log_records
from segrefine.runs import run_recording_failure
from segrefine.train import train
from segrefine.validation import ConfigValueError

BASE = ("backbone=pspnet",)  # TINY: 16 training images in batches of 8 = 2 steps per epoch


def fail_after(monkeypatch, calls: int, error=RuntimeError("killed")) -> None:
    """The training step raises after ``calls`` steps (an interruption mid-training)."""
    original, count = NoHead.losses, {"n": 0}

    def losses(self, out, image, mask):
        count["n"] += 1
        if count["n"] > calls:
            raise error
        return original(self, out, image, mask)

    monkeypatch.setattr(NoHead, "losses", losses)


def interrupted_run(make_cfg, monkeypatch, out: Path, *overrides: str) -> None:
    """A 2-epoch run killed in its second epoch: last.ckpt holds epoch 0, no results.json."""
    with monkeypatch.context() as m:
        fail_after(m, 2)
        with pytest.raises(RuntimeError, match="killed"):
            train(make_cfg(*BASE, "trainer.max_epochs=2", *overrides, output_dir=out))
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not (out / "results.json").exists()


# -- 1, 10, 11: resume only what matches ----------------------------------------------


def test_resume_refuses_a_changed_config_and_continues_the_same_one(make_cfg, monkeypatch, tmp_path):
    out = tmp_path / "run"
    interrupted_run(make_cfg, monkeypatch, out)
    last = out / "checkpoints" / "last.ckpt"
    stamp = last.stat().st_mtime_ns
    with pytest.raises(CheckpointError, match=r"differs in optim\.optimizer\.lr, seed\).*resume=false"):
        train(make_cfg(*BASE, "trainer.max_epochs=2", "optim.optimizer.lr=0.05", "seed=5", output_dir=out))
    assert last.stat().st_mtime_ns == stamp and not (out / "results.json").exists()  # nothing touched

    train(make_cfg(*BASE, "trainer.max_epochs=2", output_dir=out))  # the same config continues
    assert torch.load(last, weights_only=True)["global_step"] == 4  # 2 epochs x 2 steps: nothing trained twice
    assert json.loads((out / "results.json").read_text())["status"] == "complete"

    fresh = tmp_path / "fresh"  # resume=false starts afresh under the new settings, which are then the ones used
    interrupted_run(make_cfg, monkeypatch, fresh)
    train(make_cfg(*BASE, "trainer.max_epochs=2", "optim.optimizer.lr=0.05", "seed=5", "resume=false", output_dir=fresh))
    state = torch.load(fresh / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 0.05 and state["global_step"] == 4


def test_resume_with_wandb_continues_the_same_wandb_run(make_cfg, monkeypatch, tmp_path):
    out = tmp_path / "run"
    interrupted_run(make_cfg, monkeypatch, out, "logger=wandb")
    (first,) = (out / "wandb").glob("offline-run-*")
    train(make_cfg(*BASE, "trainer.max_epochs=2", "logger=wandb", output_dir=out))
    assert json.loads((out / "results.json").read_text())["wandb"]["id"] == first.name.rsplit("-", 1)[1]


def test_a_copied_run_folder_still_resumes_and_a_copied_finished_one_is_skipped(make_cfg, monkeypatch, tmp_path):
    original, copy = tmp_path / "study" / "job", tmp_path / "moved" / "job"
    interrupted_run(make_cfg, monkeypatch, original)
    shutil.copytree(original, copy)
    train(make_cfg(*BASE, "trainer.max_epochs=2", output_dir=copy))
    done = json.loads((copy / "results.json").read_text())
    assert torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not done["checkpoint"].startswith("..") and (copy / done["checkpoint"]).is_file()
    assert not (original / "results.json").exists()  # the original folder is left alone

    again = tmp_path / "again" / "job"
    shutil.copytree(copy, again)
    stamp = (again / "results.json").stat().st_mtime_ns
    metrics = train(make_cfg(*BASE, "trainer.max_epochs=2", output_dir=again))
    assert (again / "results.json").stat().st_mtime_ns == stamp and metrics == done["metrics"]  # skipped


def test_a_corrupt_last_checkpoint_is_named_with_the_way_out(make_cfg, monkeypatch, tmp_path):
    out = tmp_path / "run"
    interrupted_run(make_cfg, monkeypatch, out)
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as by a crash or a full disk
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(last))}: not a readable .*resume=false \(or delete it\)"):
        train(make_cfg(*BASE, "trainer.max_epochs=2", output_dir=out))
    train(make_cfg(*BASE, "trainer.max_epochs=2", "resume=false", output_dir=out))
    assert torch.load(last, weights_only=True)["global_step"] == 4


# -- 6, 7: nothing from a checkpoint executes code --------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: a stand-in for any code in a crafted checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_crafted_pickle_checkpoint_never_runs(make_cfg, tmp_path):
    marker = tmp_path / "marker"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": {"payload": _Payload(marker)}}}, crafted)
    probe = tmp_path / "probe.ckpt"  # the payload is live: the unsafe way of loading runs it
    torch.save({"payload": _Payload(tmp_path / "probe")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe").exists()

    with pytest.raises(CheckpointError, match="refused unread"):
        evaluate(eval_cfg(crafted, tmp_path / "eval"))
    out = tmp_path / "run"  # ... nor as the last.ckpt an interrupted run would resume from
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(crafted, out / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointError, match="refused unread"):
        train(make_cfg(*BASE, output_dir=out))
    assert not marker.exists() and not (tmp_path / "eval").exists() and not (out / "results.json").exists()
    for path in (REPO / "src").rglob("*.py"):
        assert "weights_only=False" not in path.read_text(), path


def test_stored_config_targets_are_segrefine_or_allowed(trained, tmp_path):
    check_targets({"a": {"_target_": "torch.optim.Adam"}, "b": {"_target_": "segrefine.heads.none.NoHead"},
                   "c": {"_target_": "pytorch_lightning.Trainer"}}, "ok")
    for target in ("tempfile.mkdtemp", "segrefine.configs.os.system", "os.system", "pytorch_lightning.seed_everything"):
        with pytest.raises(CheckpointError, match=re.escape(f"x._target_={target!r}")):
            check_targets({"x": {"_target_": target}}, "here")

    made = tmp_path / "made"
    made.mkdir()
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["config"]["data"] = {"_target_": "tempfile.mkdtemp", "dir": str(made)}
    crafted = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, crafted)
    with pytest.raises(CheckpointError, match=r"data\._target_='tempfile\.mkdtemp' is not segrefine's"):
        evaluate(eval_cfg(crafted, tmp_path / "eval"))
    assert not list(made.iterdir()) and not (tmp_path / "eval").exists()


# -- 2, 3: evaluate only what matches ---------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TINY head=none PSPNet run (shared by the evaluation tests here)."""
    out = tmp_path_factory.mktemp("trained")
    data = tmp_path_factory.mktemp("data")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        from conftest import TINY

        cfg = compose("train", overrides=[*TINY, *BASE, f"paths.data_dir={data}", f"paths.output_dir={out}"])
    train(cfg)
    return out


def eval_cfg(run, out, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("eval", overrides=force_data_keys([
            f"ckpt_path={run}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "logger=none",
            f"paths.output_dir={out}", *overrides,
        ]))


def test_eval_refuses_a_head_that_needs_training_on_another_heads_checkpoint(trained, tmp_path):
    with pytest.raises(CheckpointError, match=r"head=pointrend has parameters that need training.*head=none"):
        evaluate(eval_cfg(trained, tmp_path / "pr", "head=pointrend"))
    assert not (tmp_path / "pr").exists()
    evaluate(eval_cfg(trained, tmp_path / "crfrnn", "head=crfrnn"))  # explicitly initialised: allowed, labelled
    saved = json.loads((tmp_path / "crfrnn" / "results.json").read_text())
    assert saved["head"] == "crfrnn" and saved["head_weights"].startswith("untrained")


def test_eval_results_record_the_training_config_with_the_head_replaced(trained, tmp_path):
    train_run = json.loads((trained / "results.json").read_text())
    evaluate(eval_cfg(trained, tmp_path / "crf", "head=densecrf", "head.num_workers=1"))
    saved = json.loads((tmp_path / "crf" / "results.json").read_text())
    assert saved["head_weights"].startswith("none needed") and saved["split"] == "test"
    evaluated, expected = comparable_config(saved["config"], drop=("seed",)), comparable_config(train_run["config"], drop=("seed",))
    assert evaluated["head"]["name"] == "densecrf" and evaluated["trainer"]["max_epochs"] == 1  # the schedule kept
    assert evaluated == {**expected, "head": evaluated["head"]}
    source = saved["source"]
    assert (source["head"], source["seed"]) == ("none", 0) and source["run_config"] == comparable_config(train_run["config"])
    assert (tmp_path / "crf" / source["checkpoint"]).resolve() == (trained / train_run["checkpoint"]).resolve()


def test_eval_data_keys_change_just_that_key_and_a_whole_group_must_not_rename(trained, tmp_path):
    train_data = json.loads((trained / "results.json").read_text())["config"]["data"]
    evaluate(eval_cfg(trained, tmp_path / "n4", "data.num_test=4", "data.batch_size=2"))
    saved = json.loads((tmp_path / "n4" / "results.json").read_text())
    assert saved["config"]["data"] == {**train_data, "num_test": 4, "batch_size": 2} and saved["data"] == "synthetic"
    assert [r["id"] for r in saved["per_image"]] == [f"test_{i:05d}" for i in range(4)]

    with pytest.raises(ValueError, match=r"data=synthetic would replace the checkpoint's whole data config.*"
                                         r"data\.image_size 32 -> 64.*pass them alone"):
        evaluate(eval_cfg(trained, tmp_path / "group", "data=synthetic", "data.num_test=4"))
    with pytest.raises(ValueError, match=r"data\.nope is not a key of the checkpoint's data config"):
        evaluate(eval_cfg(trained, tmp_path / "typo", "data.nope=1"))
    with pytest.raises(ConfigValueError, match=r"data\.batch_size=0 must be an integer >= 1"):
        evaluate(eval_cfg(trained, tmp_path / "zero", "data.batch_size=0"))
    assert not any((tmp_path / d).exists() for d in ("group", "typo", "zero"))


# -- 4, 13: bad values stop before anything is built ------------------------------------


@pytest.mark.parametrize("override, message", [
    ("trainer.max_epochs=0", r"trainer\.max_epochs=0 must be an integer >= 1"),
    ("trainer.max_epochs=abc", r"trainer\.max_epochs='abc' must be an integer >= 1"),
    ("data.batch_size=0", r"data\.batch_size=0 must be an integer >= 1"),
    ("data.batch_size=2.5", r"data\.batch_size=2\.5 must be an integer >= 1"),
])
def test_bad_values_are_refused_naming_the_key(make_cfg, tmp_path, override, message):
    out = tmp_path / "run"
    with pytest.raises(ConfigValueError, match=message):
        run_recording_failure(train, make_cfg(*BASE, override, output_dir=out))
    assert sorted(p.name for p in out.iterdir()) == ["error.txt"]  # the failure recorded, nothing else


# -- 8, 9: honest failure records ------------------------------------------------------


def test_a_failed_run_ends_its_wandb_run_failed_with_the_error(make_cfg, monkeypatch, tmp_path):
    import wandb

    finished = []
    real_finish = wandb.finish
    monkeypatch.setattr(wandb, "finish", lambda *a, **k: finished.append(k) or real_finish(*a, **k))
    fail_after(monkeypatch, 1, RuntimeError("disk on fire"))
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(make_cfg(*BASE, "logger=wandb", output_dir=out))
    assert finished == [{"exit_code": 1}] and wandb.run is None
    (log_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = finished_log(log_file)
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 1  # syncs as failed
    summary = [u for r in records if r.WhichOneof("record_type") == "summary" for u in r.summary.update]
    assert [json.loads(u.value_json) for u in summary if u.key == "error"] == ["RuntimeError: disk on fire"]


def test_an_incomplete_wandb_log_is_recorded_in_results_and_said_on_the_console(make_cfg, monkeypatch, tmp_path, capsys):
    import wandb

    real_finish = wandb.finish

    def finish_on_a_full_disk(*args, **kwargs):  # the writer stops half-way, as on a full disk
        directory = Path(wandb.run.dir).parent
        real_finish(*args, **kwargs)
        (log_file,) = directory.glob("run-*.wandb")
        finished_log(log_file)  # the writer is done ...
        log_file.write_bytes(log_file.read_bytes()[: log_file.stat().st_size // 2])

    monkeypatch.setattr(wandb, "finish", finish_on_a_full_disk)
    # a truncated log never gains its exit record: wait 0.5 s for it, not the default 10 s
    monkeypatch.setattr(segrefine.tracking, "wandb_log_problem",
                        functools.partial(segrefine.tracking.wandb_log_problem, wait=0.5))
    out = tmp_path / "run"
    train(make_cfg(*BASE, "logger=wandb", output_dir=out))
    saved = json.loads((out / "results.json").read_text())
    assert re.search(r"run-\w+\.wandb (is unreadable or truncated|has no exit record)", saved["wandb"]["error"])
    assert "wandb log incomplete" in capsys.readouterr().err


def test_a_whole_wandb_log_records_no_error(make_cfg, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(*BASE, "logger=wandb", output_dir=out))
    saved = json.loads((out / "results.json").read_text())
    assert saved["wandb"]["mode"] == "offline" and "error" not in saved["wandb"]
    (log_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    (exit_record,) = [r.exit for r in finished_log(log_file) if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0


def finished_log(path: Path, wait: float = 10.0) -> list:
    """The records of a wandb run log once its writer has flushed the exit record."""
    deadline = time.monotonic() + wait
    while True:
        records = list(wandb_log_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def test_checkpoints_are_written_atomically_when_the_disk_fills(make_cfg, monkeypatch, tmp_path):
    real_save, saves = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):  # the 3rd checkpoint write hits a full disk half-way
        saves["n"] += 1
        if saves["n"] == 3:
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        train(make_cfg(*BASE, "trainer.max_epochs=2", output_dir=out))
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert files == ["best-epoch000.ckpt", "last.ckpt"]  # no partial file, no temp file
    for name in files:
        assert torch.load(out / "checkpoints" / name, weights_only=True)["epoch"] == 0  # the previous, whole


def test_an_unwritable_error_file_is_said_on_the_console_and_the_error_kept(make_cfg, monkeypatch, tmp_path, capsys):
    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segrefine.runs, "atomic_write_text", full_disk)
    cfg = make_cfg(*BASE, output_dir=tmp_path / "run")

    def job(cfg):
        raise ValueError("the real failure")

    with pytest.raises(ValueError, match="the real failure"):
        run_recording_failure(job, cfg)
    assert "could not write" in capsys.readouterr().err
    assert not (tmp_path / "run" / "error.txt").exists() and not list((tmp_path / "run").glob(".error*"))
