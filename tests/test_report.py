"""The report reads results.json files back; numbers checked against numpy."""

import csv
import io
import json

import numpy as np
import pytest

from segrefine.report import load_study, main, summarise, to_markdown, write_report
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


# -- paired statistics ----------------------------------------------------------------

from itertools import product  # noqa: E402

from segrefine.report import csv_columns, to_csv, to_latex  # noqa: E402

BASE = [0.50, 0.61, 0.42, 0.70, 0.55, 0.66, 0.38, 0.59, 0.47, 0.64]
GAIN = [0.031, 0.012, -0.004, 0.027, 0.045, 0.008, 0.019, -0.011, 0.036, 0.022]


def paired_run(folder, head, seed, ious, data="synthetic"):
    rows = [{"id": f"img{i}", "iou": v, "dice": v, "pixel_acc": 0.9, "boundary_f1": v / 2} for i, v in enumerate(ious)]
    metrics = {"test/iou": float(np.mean(ious)), "test/dice": float(np.mean(ious)), "test/pixel_acc": 0.9,
               "test/boundary_f1": float(np.mean(ious)) / 2, "test/ms_per_image": 1.0, "params": 10}
    return write_results(folder, {"data": data, "backbone": "unet", "head": head, "seed": seed, "config": {},
                                  "metrics": metrics, "per_image": rows, "job_type": "train", "experiment": "t"})


def exact_wilcoxon_p(diffs):
    """Two-sided exact signed-rank p-value by enumerating every sign pattern (no ties here)."""
    ranks = np.argsort(np.argsort(np.abs(diffs))) + 1
    observed = ranks[diffs > 0].sum()
    stats = [sum(r for r, s in zip(ranks, signs) if s) for signs in product([0, 1], repeat=len(diffs))]
    mean = len(diffs) * (len(diffs) + 1) / 4
    extreme = [s for s in stats if abs(s - mean) >= abs(observed - mean) - 1e-9]
    return len(extreme) / len(stats)


def test_paired_difference_against_none_with_exact_p_and_ci(tmp_path):
    paired_run(tmp_path / "none", "none", 0, BASE)
    paired_run(tmp_path / "crf", "crfrnn", 0, [b + g for b, g in zip(BASE, GAIN)])
    paired_run(tmp_path / "other_data", "crfrnn", 0, [0.0] * 10, data="folder")  # no none run there: unpaired
    rows = {r["data"] + r["head"]: r for r in summarise(load_study([tmp_path]).runs)}
    test = rows["syntheticcrfrnn"]["paired/iou"]
    diffs = np.array(GAIN)
    assert test["n"] == 10 and test["mean"] == pytest.approx(diffs.mean())
    assert test["p"] == pytest.approx(exact_wilcoxon_p(diffs), rel=1e-9)
    half_width = 1.96 * diffs.std(ddof=1) / np.sqrt(len(diffs))  # normal theory, ~ the bootstrap CI
    assert test["ci_low"] == pytest.approx(diffs.mean() - half_width, abs=0.3 * half_width)
    assert test["ci_high"] == pytest.approx(diffs.mean() + half_width, abs=0.3 * half_width)
    assert "paired/iou" not in rows["foldercrfrnn"] and "paired/iou" not in rows["syntheticnone"]


def test_pairs_only_within_the_same_seed(tmp_path):
    paired_run(tmp_path / "n0", "none", 0, BASE)
    paired_run(tmp_path / "n1", "none", 1, [b + 0.1 for b in BASE])
    paired_run(tmp_path / "c0", "densecrf", 0, [b + 0.01 for b in BASE])
    paired_run(tmp_path / "c1", "densecrf", 1, [b + 0.11 for b in BASE])
    (row,) = [r for r in summarise(load_study([tmp_path]).runs) if r["head"] == "densecrf"]
    assert row["paired/iou"]["n"] == 20 and row["paired/iou"]["mean"] == pytest.approx(0.01)
    assert row["paired/iou"]["p"] < 0.01 and "**" in to_markdown([row])


def test_markdown_csv_latex_parse_back_to_the_same_numbers(tmp_path):
    paired_run(tmp_path / "none", "none", 0, BASE)
    paired_run(tmp_path / "n1", "none", 1, [b - 0.02 for b in BASE])
    paired_run(tmp_path / "crf", "crfrnn", 0, [b + g for b, g in zip(BASE, GAIN)])
    rows = summarise(load_study([tmp_path]).runs)
    parsed_csv = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert list(parsed_csv[0]) == csv_columns()
    markdown_rows = [line.split(" | ") for line in to_markdown(rows).splitlines()[2:4]]
    latex_rows = [line.split(" & ") for line in to_latex(rows).splitlines() if line.startswith("synthetic")]
    for row, from_csv, from_md, from_tex in zip(rows, parsed_csv, markdown_rows, latex_rows):
        mean, std = row["test/iou"]
        assert float(from_csv["test/iou_mean"]) == mean and float(from_csv["test/iou_std"]) == std
        assert from_md[3] == f"{mean * 100:.2f} ± {std * 100:.2f}"
        assert from_tex[3] == f"{mean * 100:.2f} $\\pm$ {std * 100:.2f}"
        if "paired/iou" in row:
            assert float(from_csv["delta_iou_p"]) == row["paired/iou"]["p"]
            assert from_md[8].startswith(f"{row['paired/iou']['mean'] * 100:+.2f} [")


def test_write_report_files_and_figures(tmp_path):
    paired_run(tmp_path / "runs" / "none", "none", 0, BASE)
    paired_run(tmp_path / "runs" / "crf", "densecrf", 0, BASE)  # identical: p = 1, not an error
    paths = write_report(load_study([tmp_path / "runs"]), tmp_path / "report", figures=True)
    assert {"markdown", "csv", "latex", "metrics_figure", "cost_figure"} <= set(paths)
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert "p=1" in paths["markdown"].read_text()


def test_table_and_figures_logged_to_wandb_offline(tmp_path):
    from segrefine.report import log_to_wandb

    paired_run(tmp_path / "runs" / "none", "none", 0, BASE)
    paired_run(tmp_path / "runs" / "crf", "densecrf", 0, [b + g for b, g in zip(BASE, GAIN)])
    study = load_study([tmp_path / "runs"])
    paths = write_report(study, tmp_path / "report", figures=True)
    run_id = log_to_wandb(summarise(study.runs), paths, mode="offline", save_dir=tmp_path)
    (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    media = run_dir / "files" / "media"
    assert list(media.glob("table/report/table_*.table.json"))
    assert list(media.glob("images/report/metrics_figure_*.png"))


class FakeRun:
    def __init__(self, run_id, head, iou, state="finished"):
        self.id, self.state, self.job_type, self.group = run_id, state, "train", "t"
        self.config = {"data": {"name": "synthetic"}, "backbone": {"name": "unet"}, "head": {"name": head}, "seed": 0}
        self.summary = {"test/iou": iou, "test/dice": iou, "test/pixel_acc": 0.9, "test/boundary_f1": iou,
                        "test/ms_per_image": 2.0, "params": 5} if state == "finished" else {}


class FakeApi:
    def runs(self, path):
        assert path == "team/segrefine"
        return [FakeRun("a", "none", 0.5), FakeRun("b", "crfrnn", 0.6), FakeRun("c", "crfrnn", 0.0, state="crashed")]


def test_reads_runs_from_a_wandb_project():
    from segrefine.report import load_wandb_study

    study = load_wandb_study("team/segrefine", api=FakeApi())
    rows = summarise(study.runs)
    assert [(r["head"], r["test/iou"][0]) for r in rows] == [("none", 0.5), ("crfrnn", 0.6)]
    assert study.incomplete == [("team/segrefine/c", "wandb state 'crashed'")]
