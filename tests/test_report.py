"""The report reads results.json files back; numbers checked against numpy."""

import json

import numpy as np
import pytest

from segrefine.report import load_study, main, summarise, to_markdown
from segrefine.results import read_results, write_results


def fake_run(folder, backbone, head, seed, iou, data="synthetic"):
    metrics = {"test/iou": iou, "test/dice": iou + 0.05, "test/pixel_acc": 0.9, "test/boundary_f1": iou / 2,
               "test/ms_per_image": 3.0 + seed, "params": 1_000_000}
    return write_results(folder, {"job_type": "train", "experiment": "t", "data": data, "backbone": backbone,
                                  "head": head, "seed": seed, "config": {}, "metrics": metrics, "per_image": []})


def test_groups_by_data_backbone_head_with_mean_and_sample_std(tmp_path):
    ious = [0.61, 0.65, 0.70]
    for seed, iou in enumerate(ious):
        fake_run(tmp_path / f"unet{seed}", "unet", "none", seed, iou)
    fake_run(tmp_path / "fcn0", "fcn", "none", 0, 0.4)
    fake_run(tmp_path / "other", "unet", "none", 0, 0.1, data="folder")  # another dataset: never merged
    rows = summarise(load_study([tmp_path]).runs)
    assert [(r["data"], r["backbone"], r["n"]) for r in rows] == [("folder", "unet", 1), ("synthetic", "fcn", 1), ("synthetic", "unet", 3)]
    mean, std = rows[2]["test/iou"]
    assert mean == pytest.approx(np.mean(ious)) and std == pytest.approx(np.std(ious, ddof=1))
    assert rows[2]["seeds"] == [0, 1, 2]
    table = to_markdown(rows)
    assert f"{np.mean(ious) * 100:.2f} ± {np.std(ious, ddof=1) * 100:.2f}" in table


def test_incomplete_runs_are_listed_not_averaged(tmp_path, capsys):
    fake_run(tmp_path / "ok", "unet", "none", 0, 0.5)
    crashed = tmp_path / "crashed" / ".hydra"
    crashed.mkdir(parents=True)
    (crashed / "config.yaml").write_text("seed: 1\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{ truncated")
    study = load_study([tmp_path])
    assert len(study.runs) == 1
    assert sorted(p.split("/")[-1] for p, _ in study.incomplete) == ["broken", "crashed"]
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| synthetic | unet | none | 50.00 ± 0.00" in out and "crashed: no results.json" in out


def test_results_round_trip_and_nan_becomes_null(tmp_path):
    path = write_results(tmp_path, {"metrics": {"test/iou": float("nan"), "x": 1.5}})
    assert json.loads(path.read_text())["metrics"]["test/iou"] is None
    assert read_results(tmp_path)["metrics"]["x"] == 1.5


def test_missing_folder_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
