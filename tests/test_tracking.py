"""What a run leaves in wandb: read back from the offline run log, the way `wandb sync`
uploads it. One training run and one evaluation of it (module fixture) serve every test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import segrefine
from conftest import CONFIG_DIR, REPO, TINY
from segrefine.evaluate import evaluate
from segrefine.provenance import git_state, provenance
from segrefine.runconfig import comparable_config, config_group, curated_config
from segrefine.train import train
from segrefine.tracking import wandb_log_records

EXPERIMENT = "tracked"
WANDB = ["logger=wandb", "logger.wandb.mode=offline"]


def read_wandb_run(folder: Path) -> dict:
    """The run as the wandb server would hold it after a sync: its header, final config
    and summary (the updates applied in order), history rows and artifacts."""
    (log_file,) = (folder / "wandb").glob("offline-run-*/run-*.wandb")
    run: dict = {"config": {}, "summary": {}, "history": [], "artifacts": [], "config_records": []}

    def apply(target: dict, item) -> None:
        keys = [item.key] if item.key else list(item.nested_key)
        node = target
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)

    for record in wandb_log_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(group=record.run.run_group, job_type=record.run.job_type, tags=list(record.run.tags),
                       name=record.run.display_name)
            for item in record.run.config.update:
                apply(run["config"], item)
        elif kind == "config":
            run["config_records"].append([item.key or ".".join(item.nested_key) for item in record.config.update])
            for item in record.config.update:
                apply(run["config"], item)
        elif kind == "summary":
            for item in record.summary.update:
                apply(run["summary"], item)
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                if item.value_json:
                    row[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            run["history"].append(row)
        elif kind == "artifact":
            run["artifacts"].append(record.artifact)
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    run["config"].pop("_wandb", None)  # wandb's own bookkeeping
    return run


def leaves(config: dict, prefix: str = "") -> dict:
    """Dotted key -> value of every leaf of a nested config."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-epoch training run (best checkpoint by val/loss, which usually improves in
    epoch 2, so the best epoch is not just the first) with its checkpoints logged as a
    model artifact, and a densecrf evaluation of its checkpoint."""
    root = tmp_path_factory.mktemp("tracking")
    tiny = [o for o in TINY if not o.startswith("logger=")]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_DATA_DIR", str(root / "wandb-data"))  # artifact staging copies stay in tmp
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            train_cfg = compose("train", overrides=[
                *tiny, *WANDB, "logger.wandb.log_model=true", f"name={EXPERIMENT}", "trainer.max_epochs=2",
                "callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=min",
                f"paths.data_dir={root / 'data'}", f"paths.output_dir={root / 'train'}",
            ])
            eval_cfg = compose("eval", overrides=[
                f"ckpt_path={root / 'train'}", "head=densecrf", "head.num_workers=1", "trainer.accelerator=cpu",
                "trainer.enable_progress_bar=false", *WANDB, f"paths.output_dir={root / 'eval'}",
            ])
        train(train_cfg)
        evaluate(eval_cfg)
    return {
        "root": root,
        "train": (json.loads((root / "train" / "results.json").read_text()), read_wandb_run(root / "train")),
        "eval": (json.loads((root / "eval" / "results.json").read_text()), read_wandb_run(root / "eval")),
    }


def test_runs_are_named_by_label_and_seed_grouped_by_configuration_with_the_experiment_as_tag(runs):
    (trained_results, trained), (eval_results, evaluated) = runs["train"], runs["eval"]
    # The group is the configuration's: a hash of its comparable config without the seed.
    group = config_group(trained_results["config"])
    assert group.startswith("unet-none-synthetic-")
    assert (trained["group"], trained["job_type"], trained["name"]) == (group, "train", "U-Net s0")
    assert trained_results["label"] == "U-Net"
    assert trained_results["wandb"]["name"] == "U-Net s0" and trained_results["wandb"]["group"] == group
    assert trained["tags"] == ["synthetic", "unet", "none", f"experiment:{EXPERIMENT}"]
    assert trained["summary"]["label"] == "U-Net" and evaluated["summary"]["label"] == "U-Net + DenseCRF"
    assert eval_results["label"] == "U-Net + DenseCRF"
    assert evaluated["group"] == eval_results["wandb"]["group"] == config_group(eval_results["config"]) != group
    assert (evaluated["job_type"], evaluated["name"]) == ("eval", "U-Net + DenseCRF s0")
    assert evaluated["tags"] == ["synthetic", "unet", "densecrf", f"experiment:{EXPERIMENT}"]
    assert trained["config"]["experiment"] == evaluated["config"]["experiment"] == EXPERIMENT
    assert trained["exit_code"] == evaluated["exit_code"] == 0


@pytest.mark.parametrize("job", ["train", "eval"])
def test_config_is_the_curated_run_config_each_key_once(runs, job):
    results, run = runs[job]
    config = run["config"]
    extra = {"split", "source"} if job == "eval" else set()
    # Top level: the settings groups and keys of the run, plus provenance; nothing twice
    # (no `config.*` copy from Lightning's hyperparameters, no num_classes/class_names).
    assert set(config) == {"data", "backbone", "head", "optim", "trainer", "callbacks", "metrics", "seed",
                           "init_from", "test", "experiment", "provenance", *extra}
    for keys in run["config_records"]:
        assert len(keys) == len(set(keys))
    # Run-only keys and machine paths are not columns.
    for key in ("paths", "logger", "force", "resume", "print_config", "name", "ckpt_path", "num_threads",
                "save_predictions", "hydra"):
        assert key not in config
    assert "dirpath" not in config["callbacks"]["model_checkpoint"]
    assert "dirpath" not in config["callbacks"]["last_checkpoint"]
    assert "wandb_images" not in config["callbacks"]
    assert config["data"]["root"] == "<paths.data_dir>/synthetic"
    root = str(runs["root"])
    assert not [k for k, v in leaves(config).items() if root in str(v)]
    # The same config as results.json's run_config, and the same provenance.
    assert {k: v for k, v in config.items() if k not in {"experiment", "provenance", *extra}} == results["run_config"]
    assert config["provenance"] == results["provenance"]


def test_no_setting_is_logged_under_two_names(runs):
    keys = set(leaves(runs["train"][1]["config"]))
    assert not [(k, other) for k in keys for other in keys if other != k and other.endswith("." + k)]


def test_whole_run_values_are_summary_columns_equal_to_results(runs):
    results, run = runs["train"]
    metrics, summary = results["metrics"], run["summary"]
    for key in ("params", "params/trainable", "train/fit_seconds", "train/steps", "train/best_epoch",
                "val/iou_best", "val/iou_best_epoch"):
        assert summary[key] == metrics[key], key
    # By hand: 16 training images in batches of 8 for 2 epochs.
    assert metrics["train/steps"] == 4
    assert metrics["train/fit_seconds"] > 0
    # Parameters = the backbone's and head's tensors in the checkpoint, less BatchNorm statistics.
    state = torch.load(runs["root"] / "train" / results["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    counted = sum(t.numel() for k, t in state.items() if k.startswith(("backbone.", "head.")) and not k.endswith(buffers))
    assert metrics["params"] == metrics["params/trainable"] == counted
    # The best epoch is where the monitored val/loss was lowest (the first such epoch).
    losses = [row["val/loss"] for row in run["history"] if "val/loss" in row]
    epochs = [row["epoch"] for row in run["history"] if "val/loss" in row]
    assert epochs == [0, 1]
    assert metrics["train/best_epoch"] == epochs[losses.index(min(losses))]
    assert results["checkpoint"] == f"checkpoints/best-epoch{metrics['train/best_epoch']:03d}.ckpt"
    # Beside the last val/iou (wandb's own summary value), the best one and its epoch, as logged.
    ious = [row["val/iou"] for row in run["history"] if "val/iou" in row]
    assert summary["val/iou"] == ious[-1]
    assert metrics["val/iou_best"] == max(ious) and metrics["val/iou_best_epoch"] == epochs[ious.index(max(ious))]
    # The learning rate of each epoch: the poly schedule's, 1e-3 * (1 - step/steps)^0.9 at
    # the start of epochs 0 and 1 (2 steps each of 4).
    lrs = [row["lr-Adam"] for row in run["history"] if "lr-Adam" in row]
    assert lrs == pytest.approx([1e-3, 1e-3 * (1 - 2 / 4) ** 0.9])


def test_eval_run_traces_back_to_the_training_run(runs):
    trained, (results, run) = runs["train"][0], runs["eval"]
    assert run["config"]["split"] == "test"
    assert run["config"]["source"] == {
        "checkpoint": trained["checkpoint"],  # relative to the training run's folder
        "run_id": trained["wandb"]["id"],
        "head": "none",
        "experiment": EXPERIMENT,
        "seed": 0,
    }
    assert results["source"]["wandb_id"] == trained["wandb"]["id"]
    assert run["summary"]["params"] == results["metrics"]["params"] == trained["metrics"]["params"]
    assert run["summary"]["params/trainable"] == results["metrics"]["params/trainable"]
    assert "test/iou" in run["summary"] and "train/steps" not in run["summary"]


def test_checkpoints_are_logged_as_a_model_artifact_offline(runs):
    results, run = runs["train"]
    models = [a for a in run["artifacts"] if a.type == "model"]
    assert {a.name for a in models} == {f"model-{results['wandb']['id']}"}
    originals = {json.loads(a.metadata)["original_filename"]: list(a.aliases) for a in models}
    assert sorted(originals[Path(results["checkpoint"]).name]) == ["best", "latest"]
    assert "last.ckpt" in originals


def test_results_record_the_code_version_and_commit(runs):
    recorded = runs["train"][0]["provenance"]
    assert recorded["version"] == segrefine.__version__
    if shutil.which("git") and (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert recorded["git_commit"] == head
        assert isinstance(recorded["git_dirty"], bool)
    assert provenance() == recorded


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_of_a_checkout_and_of_a_plain_folder(tmp_path):
    assert git_state(tmp_path) == (None, None)  # not a checkout
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], env=env, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    (repo / "a.txt").write_text("one")
    git("add", "a.txt")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "HEAD").strip()
    assert git_state(repo) == (head, False)
    (repo / "untracked.txt").write_text("outputs are not changes to the code")
    assert git_state(repo) == (head, False)
    (repo / "a.txt").write_text("two")
    assert git_state(repo) == (head, True)


def test_disabled_wandb_is_reported_as_disabled(tmp_path):
    from segrefine.tracking import WandbLogger, finish_wandb, wandb_run_info

    try:
        assert wandb_run_info(WandbLogger(save_dir=str(tmp_path), name="r", group="g", mode="disabled"))["mode"] == "disabled"
    finally:
        finish_wandb()


def test_wandb_gets_no_anonymous_setting():
    """Lightning passes ``anonymous=None`` to wandb.init, and wandb warns on every run that it
    has no effect: segrefine's logger leaves it out (and keeps it when asked for)."""
    from segrefine.tracking import WandbLogger

    assert "anonymous" not in WandbLogger(save_dir=".", mode="disabled")._wandb_init
    assert WandbLogger(save_dir=".", mode="disabled", anonymous=True)._wandb_init["anonymous"] == "allow"


def test_curated_config_drops_run_only_keys_but_keeps_tuned_values():
    config = {
        "name": "study", "seed": 1, "force": True, "resume": False, "print_config": True, "ckpt_path": None,
        "paths": {"root_dir": "/home/me/repo", "data_dir": "/data", "output_dir": "/home/me/repo/outputs/job"},
        "logger": {"mode": "offline"},
        "data": {"name": "synthetic", "root": "/data/synthetic"},
        "head": {"name": "densecrf", "bilateral_compat": 4.5, "num_workers": 2, "run_only": ["num_workers"], "tuned": {"keys": ["bilateral_compat"]}},
        "callbacks": {"model_checkpoint": {"dirpath": "/home/me/repo/outputs/job/checkpoints", "monitor": "val/iou"}},
        "init_from": "/home/me/repo/outputs/none-s1",
    }
    assert curated_config(config) == {
        "seed": 1,
        "data": {"name": "synthetic", "root": "<paths.data_dir>/synthetic"},
        "head": {"name": "densecrf", "bilateral_compat": 4.5, "tuned": {"keys": ["bilateral_compat"]}},
        "callbacks": {"model_checkpoint": {"monitor": "val/iou"}},
        "init_from": "<paths.root_dir>/outputs/none-s1",
    }
    # The comparison view hides the tuned value; the curated one shows it.
    assert comparable_config(config)["head"]["bilateral_compat"] == "<tuned>"


def test_reading_wandb_without_credentials_stops_with_one_line_naming_the_fix(tmp_path, monkeypatch):
    from segrefine.report import main
    from segrefine.tracking import require_wandb_credentials

    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # none there
    with pytest.raises(SystemExit) as stopped:
        main(["--wandb", "team/project"])
    message = str(stopped.value.code)
    assert "wandb login" in message and "WANDB_API_KEY" in message and "\n" not in message
    # A netrc entry for wandb's host, or the key in the environment, is enough (not checked online).
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    require_wandb_credentials()
    (tmp_path / "netrc").write_text("machine example.org\n  login user\n  password secret\n")
    with pytest.raises(SystemExit, match="api.wandb.ai"):
        require_wandb_credentials()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    require_wandb_credentials()
