"""Any Lightning logger by config: csv, tensorboard and mlflow on one tiny run (wandb: test_tracking.py,
none: every other test), each reading the run's name and group by interpolation."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from segrefine.runconfig import config_group, curated_config
from segrefine.train import train


def tiny_run(root, loggers: str):
    from hydra import compose, initialize_config_dir

    from conftest import CONFIG_DIR, TINY

    tiny = [o for o in TINY if not o.startswith("logger=")]  # one epoch: test_tracking.py checks two
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*tiny, f"logger={loggers}", "backbone=fcn", "name=logged",
                                          f"paths.data_dir={root / 'data'}", f"paths.output_dir={root / 'run'}"])
    train(cfg)
    out = root / "run"
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("loggers"), "[csv,tensorboard]")


def test_csv_logger_is_lightnings_own_with_metrics_learning_rate_and_run_config(run):
    out, results = run
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    ious = [float(r["val/iou"]) for r in rows if r.get("val/iou")]
    assert ious == pytest.approx([results["metrics"]["val/iou"]])
    assert [float(r["lr-Adam"]) for r in rows if r.get("lr-Adam")] == pytest.approx([1e-3])  # the configured start
    hparams = yaml.safe_load((out / "csv" / "hparams.yaml").read_text())
    assert {k: v for k, v in hparams.items() if k not in ("experiment", "provenance")} == results["run_config"]
    assert results["run_config"] == curated_config(results["config"])


def test_tensorboard_logger_writes_the_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, results = run
    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    assert [e.value for e in accumulator.Scalars("val/iou")] == pytest.approx([results["metrics"]["val/iou"]])
    assert [e.value for e in accumulator.Scalars("lr-Adam")] == pytest.approx([1e-3])


@pytest.mark.slow  # MLflow's store creates its tables in each new run folder: ~10 s on 2 CPUs
def test_mlflow_logger_files_the_run_by_label_seed_and_group_in_a_local_store(tmp_path):
    from mlflow.tracking import MlflowClient

    out, results = tiny_run(tmp_path, "mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("logged")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "FCN-8s s0" == f"{results['label']} s0"
    assert found.data.tags["group"] == config_group(results["config"])
    assert found.data.tags["job_type"] == "train"
    assert found.data.params["seed"] == "0"
    history = [m.value for m in client.get_metric_history(found.info.run_id, "val/iou")]
    assert history == pytest.approx([results["metrics"]["val/iou"]])
    assert results["wandb"] is None  # no wandb logger: nothing to record
