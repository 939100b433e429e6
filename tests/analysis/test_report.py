"""The report reads results.json files back; numbers checked against hand computations,
numpy and exact enumeration."""

import csv
import io
import json
from itertools import product

import numpy as np
import pytest

from segrefine.report import (
    Column,
    config_labels,
    hierarchical_bootstrap,
    holm,
    load_study,
    main,
    run_value,
    sign_flip_p,
    summarise,
    to_csv,
    to_latex,
    to_markdown,
    to_markdown_full,
    write_report,
)
from segrefine.record import RunRecord
from segrefine.record import read_document as read_results
from segrefine.runconfig import comparable_config

BASE = [0.50, 0.61, 0.42, 0.70, 0.55, 0.66, 0.38, 0.59, 0.47, 0.64]
GAIN = [0.031, 0.012, -0.004, 0.027, 0.045, 0.008, 0.019, -0.011, 0.036, 0.022]


def config(backbone="unet", head="none", seed=0, data="synthetic", variant=None, encoder="resnet18", size=64, **extra):
    backbone_cfg = {"_target_": f"segrefine.models.{backbone}", "name": backbone, "encoder_name": encoder}
    if variant:
        backbone_cfg["variant"] = variant
    data_cfg = {"_target_": f"segrefine.data.{data}", "name": data, "image_size": size, "root": "/data/x"}
    if data != "msd":
        data_cfg["num_classes"] = 2
    return {"data": data_cfg, "backbone": backbone_cfg, "head": {"_target_": f"segrefine.heads.{head}", "name": head},
            "seed": seed, "trainer": {"max_epochs": 8}, "paths": {"output_dir": "/runs/x"}, "name": "t", **extra}


def run(folder, ious, head="none", seed=0, job_type="train", predictions=None, **kw):
    """A fabricated results.json; per-image iou/boundary_f1 rows, metrics consistent with them."""
    cfg = config(head=head, seed=seed, **kw)
    rows = [{"id": f"img{i}", "iou": v, "dice": v, "pixel_acc": 0.9, "boundary_f1": v / 2,
             "unet_crfrnn/iu": v, "unet_crfrnn/dsc": v, "unet_crfrnn/pa": v} for i, v in enumerate(ious)]
    mean = float(np.mean(ious))
    metrics = {"test/iou": mean + 0.01, "test/dice": mean, "test/pixel_acc": 0.9, "test/boundary_f1": mean / 2,
               "test/iou_image": mean, "test/boundary_f1_image": mean / 2, "test/ms_per_image": 1.0 + seed,
               "test/unet_crfrnn/iu": mean, "test/unet_crfrnn/dsc": mean, "test/unet_crfrnn/pa": mean, "params": 10}
    record = {"job_type": job_type, "experiment": "t", "data": cfg["data"]["name"], "backbone": cfg["backbone"]["name"],
              "head": head, "seed": seed, "config": cfg, "metrics": metrics, "per_image": rows,
              "num_classes": 2, "class_names": ["background", "fg"], "predictions": predictions}
    return RunRecord.new(**record).write(folder)


def eval_run(folder, ious, base_cfg, head="densecrf", split="test"):
    """An eval results.json in the agreed form: the training config with the head replaced,
    ``split`` and ``source`` naming the training run's comparable config."""
    path = run(folder, ious, head=head, seed=base_cfg["seed"], job_type="eval")
    record = json.loads(path.read_text())
    record["config"] = {**base_cfg, "head": {"_target_": "segrefine.heads.densecrf", "name": head}}
    record["split"] = split
    record["source"] = {"checkpoint": "../none/checkpoints/best.ckpt", "head": "none", "seed": base_cfg["seed"],
                        "run_config": comparable_config(base_cfg)}
    path.write_text(json.dumps(record))
    return path


def rows_of(folder, protocol="standard"):
    rows, duplicates = summarise(load_study([folder]).runs, protocol)
    return {(r.label, r.head): r for r in rows}, duplicates


# -- rows: exact configurations --------------------------------------------------------------


def test_mean_and_sample_std_over_seeds_and_a_dash_for_one_seed(tmp_path):
    ious = [0.61, 0.65, 0.70]
    for seed, iou in enumerate(ious):
        run(tmp_path / f"unet{seed}", [iou] * 4, seed=seed)
    run(tmp_path / "fcn0", [0.4] * 4, backbone="fcn")
    rows, _ = rows_of(tmp_path)
    unet = rows[("U-Net", "none")]
    assert unet.seeds == [0, 1, 2]
    table = to_markdown(list(rows.values()))
    assert f"| U-Net | none | – | {np.mean(ious) * 100:.2f} ± {np.std(ious, ddof=1) * 100:.2f} |" in table
    assert "| FCN | none | – | 40.00 |" in table  # one seed: the value, no spread (not "± 0.00" nor "± –")
    full = to_markdown_full(list(rows.values()))
    assert f"| U-Net | none | baseline | 3 | {(np.mean(ious) + 0.01) * 100:.2f} ± {np.std(ious, ddof=1) * 100:.2f} |" in full


def test_fcn_variants_and_encoders_are_separate_rows_named_by_what_differs(tmp_path):
    run(tmp_path / "a", [0.5] * 4, backbone="fcn", variant="8s")
    run(tmp_path / "b", [0.6] * 4, backbone="fcn", variant="32s")
    run(tmp_path / "c", [0.7] * 4, backbone="fcn", variant="8s", encoder="resnet34")
    run(tmp_path / "d", [0.8] * 4, backbone="fcn", variant="8s", size=320)
    rows, _ = rows_of(tmp_path)
    # In words; each key's most common value (ResNet-18, 64 px) goes without saying.
    assert sorted(rows) == [("FCN-32s", "none"), ("FCN-8s", "none"), ("FCN-8s, 320 px", "none"),
                            ("FCN-8s, ResNet-34", "none")]
    assert all(len(r.runs) == 1 for r in rows.values())


def test_labels_name_the_backbone_not_its_defaults():
    unet = config()
    fcn = config(backbone="fcn", variant="8s")
    assert config_labels([unet, fcn]) == ["U-Net", "FCN-8s"]


def test_a_duplicate_run_is_listed_not_averaged_nor_replacing(tmp_path, capsys):
    run(tmp_path / "first", [0.5] * 4)
    run(tmp_path / "again", [0.9] * 4)  # same config and seed
    run(tmp_path / "seed1", [0.6] * 4, seed=1)
    rows, duplicates = rows_of(tmp_path)
    assert sorted(p.split("/")[-1] for p, _ in duplicates) == ["again", "first"]
    assert rows[("U-Net", "none")].seeds == [1]
    assert main([str(tmp_path), "--no-figures"]) == 0
    assert "Duplicate runs (not averaged)" in capsys.readouterr().out


def test_baseline_is_the_none_row_differing_only_in_the_head(tmp_path):
    run(tmp_path / "n64", BASE)
    run(tmp_path / "n320", [b - 0.2 for b in BASE], size=320)
    run(tmp_path / "c320", [b - 0.1 for b in BASE], head="crfrnn", size=320)
    run(tmp_path / "p64", BASE, head="pointrend", extra_key=1)  # differs outside the head too: unpaired
    rows, _ = rows_of(tmp_path)
    (crf,) = [r for r in rows.values() if r.head == "crfrnn"]
    assert crf.baseline.config["data"]["image_size"] == 320 and crf.pairing == "retrained"
    assert len({r.label for r in rows.values() if r.head == "none"}) == 2  # 64 and 320 px: two labels
    assert crf.stats["test/iou_image"]["mean"] == pytest.approx(0.1)
    (pointrend,) = [r for r in rows.values() if r.head == "pointrend"]
    assert pointrend.baseline is None and "differs only in the head" in pointrend.notes[0]


def test_eval_runs_pair_on_the_same_weights_and_other_splits_are_skipped(tmp_path):
    base = run(tmp_path / "none", BASE)
    base_cfg = read_results(base)["config"]
    eval_run(tmp_path / "crf", [b + g for b, g in zip(BASE, GAIN)], base_cfg)
    eval_run(tmp_path / "tune", BASE, base_cfg, split="val")
    study = load_study([tmp_path])
    assert [p.split("/")[-1] for p, _ in study.skipped] == ["tune"] and not study.incomplete
    rows, _ = rows_of(tmp_path)
    crf = rows[("U-Net", "densecrf")]
    assert crf.pairing == "same weights" and crf.stats["test/iou_image"]["mean"] == pytest.approx(np.mean(GAIN))


# -- statistics ---------------------------------------------------------------------------


def test_sign_flip_p_against_exact_enumeration():
    values = np.array([0.031, 0.012, -0.004, 0.027, 0.045, 0.008, -0.019, 0.036])
    observed = abs(values.mean())
    flips = [abs((values * np.array(signs)).mean()) for signs in product([-1, 1], repeat=len(values))]
    exact = np.mean([f >= observed - 1e-12 for f in flips])
    assert sign_flip_p(values) == pytest.approx(exact, rel=1e-9)
    assert sign_flip_p(np.array([0.1, 0.2, 0.3])) == pytest.approx(0.25)  # 2 of 8 patterns as extreme


def test_sign_flip_p_against_scipy_permutation_test():
    from scipy.stats import permutation_test

    rng = np.random.default_rng(3)
    for values in (rng.normal(0.01, 0.02, 12), rng.normal(0.005, 0.02, 40)):
        reference = permutation_test((values,), np.mean, permutation_type="samples", n_resamples=np.inf
                                     if len(values) <= 16 else 99_999, random_state=0).pvalue
        ours = sign_flip_p(values)
        assert ours == pytest.approx(reference, rel=1e-9 if len(values) <= 16 else 0.1)


def test_holm_against_a_hand_computation():
    # sorted 0.01, 0.03, 0.04, 0.5 -> x4, x3, x2, x1 = 0.04, 0.09, 0.08 -> 0.09 (monotone), 0.5
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_hierarchical_bootstrap_resamples_seeds_then_images():
    # Images identical within a seed: only the seed draw varies; its distribution is exact.
    per_seed = [np.full(5, 0.1), np.full(7, -0.2), np.full(3, 0.4)]
    boot = hierarchical_bootstrap(per_seed, samples=20_000)
    exact = np.round([np.mean(c) for c in product([0.1, -0.2, 0.4], repeat=3)], 9)  # 27 equally likely draws
    values, counts = np.unique(exact, return_counts=True)
    observed = np.round(boot, 9)
    assert set(np.unique(observed)) == set(values)
    for value, count in zip(values, counts):
        assert np.mean(observed == value) == pytest.approx(count / 27, abs=0.01)
    # One seed: a bootstrap over its images, close to normal theory.
    diffs = np.array(GAIN)
    low, high = np.percentile(hierarchical_bootstrap([diffs]), [2.5, 97.5])
    half = 1.96 * diffs.std(ddof=1) / np.sqrt(len(diffs))
    assert low == pytest.approx(diffs.mean() - half, abs=0.3 * half) and high == pytest.approx(diffs.mean() + half, abs=0.3 * half)


def test_seeds_disagreeing_in_sign_are_not_significant_however_many_images(tmp_path):
    # Inside each seed every image moves the same way (60 images), but the per-seed means
    # disagree in sign: the evidence is 3 models, not 180 images.
    rng = np.random.default_rng(0)
    base = list(rng.uniform(0.4, 0.7, 60))
    shifts = {0: 0.05, 1: 0.04, 2: -0.03}
    for seed, shift in shifts.items():
        run(tmp_path / f"n{seed}", base, seed=seed)
        run(tmp_path / f"c{seed}", [b + shift + rng.uniform(0, 0.002) for b in base], head="crfrnn", seed=seed)
    rows, _ = rows_of(tmp_path)
    test = rows[("U-Net", "crfrnn")].stats["test/iou_image"]
    assert test["level"] == "seeds" and test["n"] == 3
    assert test["per_seed"] == pytest.approx([0.051, 0.041, -0.029], abs=0.002)
    assert test["p"] >= 0.25 and test["p_holm"] >= 0.25
    assert test["ci_low"] < 0 < test["ci_high"]
    pooled = np.concatenate([np.full(60, s) for s in shifts.values()])
    assert sign_flip_p(pooled) < 0.001  # what treating 180 images as independent would have claimed
    table = to_markdown(list(rows.values()))
    assert "*" not in table.split("\n")[3]  # no star on the crfrnn row


def test_delta_is_on_the_aggregation_of_the_column_beside_it(tmp_path):
    for seed in (0, 1):
        run(tmp_path / f"n{seed}", [b + 0.01 * seed for b in BASE], seed=seed)
        run(tmp_path / f"c{seed}", [b + g + 0.02 * seed for b, g in zip(BASE, GAIN)], head="crfrnn", seed=seed)
    rows, _ = rows_of(tmp_path)
    crf, none = rows[("U-Net", "crfrnn")], rows[("U-Net", "none")]
    column = Column("test/iou_image", "IoU % (img mean)", "iou")
    means = [np.mean([run_value(r, column) for r in x.runs.values()]) for x in (crf, none)]
    assert crf.stats["test/iou_image"]["mean"] == pytest.approx(means[0] - means[1])


def test_unet_crfrnn_protocol_columns_and_mixed_protocols_refused(tmp_path, capsys):
    run(tmp_path / "none", BASE)
    run(tmp_path / "crf", [b + g for b, g in zip(BASE, GAIN)], head="crfrnn")
    rows, _ = rows_of(tmp_path, "unet_crfrnn")
    markdown = to_markdown(list(rows.values()), "unet_crfrnn")
    assert "| IU % | Δ IU % [95 % CI] | p (Holm) | Δ DSC % | Δ PA (fg recall) % | ms/img | params |" in markdown
    assert "IoU % (pooled)" not in markdown and "IoU % (pooled)" not in to_markdown_full(list(rows.values()), "unet_crfrnn")
    assert rows[("U-Net", "crfrnn")].stats["test/unet_crfrnn/iu"]["mean"] == pytest.approx(np.mean(GAIN))
    record = read_results(tmp_path / "crf")
    record["metrics_protocol"] = "unet_crfrnn"
    (tmp_path / "crf" / "results.json").write_text(json.dumps(record))
    assert main([str(tmp_path), "--no-figures"]) == 2
    assert "--metrics" in capsys.readouterr().err
    assert main([str(tmp_path), "--no-figures", "--metrics", "unet_crfrnn"]) == 0


def test_markdown_csv_latex_carry_the_same_numbers(tmp_path):
    for seed in (0, 1):
        run(tmp_path / f"n{seed}", [b - 0.02 * seed for b in BASE], seed=seed)
        run(tmp_path / f"c{seed}", [b + g - 0.01 * seed for b, g in zip(BASE, GAIN)], head="crfrnn", seed=seed)
    rows = list(rows_of(tmp_path)[0].values())
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))
    md = [line.split(" | ") for line in to_markdown(rows).splitlines()[2:4]]
    full = [line.split(" | ") for line in to_markdown_full(rows).splitlines()[2:4]]
    tex = [line.split(" & ") for line in to_latex(rows).splitlines() if line.startswith("U-Net")]
    for row, from_csv, from_md, from_full, from_tex in zip(rows, parsed, md, full, tex):
        pooled = [run_value(r, Column("test/iou", "")) for r in row.runs.values()]
        image = [run_value(r, Column("test/iou_image", "")) for r in row.runs.values()]
        assert float(from_csv["test/iou_mean"]) == pytest.approx(np.mean(pooled))
        assert float(from_csv["test/iou_image_mean"]) == pytest.approx(np.mean(image))
        assert from_full[4] == f"{np.mean(pooled) * 100:.2f} ± {np.std(pooled, ddof=1) * 100:.2f}"
        assert from_md[3] == f"{np.mean(image) * 100:.2f} ± {np.std(image, ddof=1) * 100:.2f}"
        assert from_tex[3] == f"{np.mean(image) * 100:.2f} $\\pm$ {np.std(image, ddof=1) * 100:.2f}"
        if row.stats:
            test = row.stats["test/iou_image"]
            assert float(from_csv["delta_iou_p_holm"]) == test["p_holm"]
            assert [float(v) for v in from_csv["delta_iou_per_seed"].split()] == test["per_seed"]
            assert from_md[4].startswith(f"{test['mean'] * 100:+.2f} [") and from_full[9].startswith(from_md[4])
            assert from_md[5] == f"{test['p']:.2g} ({test['p_holm']:.2g})"


# -- loading: every bad folder listed, the report still printed --------------------------------


def test_bad_run_folders_are_listed_with_reasons_and_the_report_prints(tmp_path, capsys):
    run(tmp_path / "ok", BASE)
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "results.json").write_text("[1, 2]")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{ truncated")
    for name, error in (("empty", ""), ("crashed", "ValueError: boom\n\ntraceback")):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "config.yaml").write_text("seed: 1\n")
        (tmp_path / name / "error.txt").write_text(error)
    (tmp_path / "dir_error" / ".hydra").mkdir(parents=True)
    (tmp_path / "dir_error" / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (tmp_path / "dir_error" / "error.txt").mkdir()  # unreadable as a file
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| U-Net | none | – |" in out
    for expected in ("list: results.json holds a JSON list", "broken: unreadable results.json",
                     "empty: failed (error.txt is empty)", "crashed: failed: ValueError: boom",
                     "dir_error: failed (error.txt unreadable"):
        assert expected in out, expected


def test_results_round_trip_and_nan_becomes_null(tmp_path):
    path = RunRecord.new(metrics={"test/iou": float("nan"), "x": 1.5}).write(tmp_path)
    assert json.loads(path.read_text())["metrics"]["test/iou"] is None
    assert read_results(tmp_path)["metrics"]["x"] == 1.5


def test_missing_folder_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- figures from saved predictions, every data source -------------------------------------------


def save_predictions(folder, ids, num_classes=2, rgb=False, size=16):
    rng = np.random.default_rng(len(str(folder)))
    masks = rng.integers(0, num_classes, (len(ids), size, size)).astype(np.uint8)
    preds = np.where(rng.random(masks.shape) < 0.8, masks, (masks + 1) % num_classes).astype(np.uint8)
    images = rng.integers(0, 256, (len(ids), size, size, 3) if rgb else (len(ids), size, size)).astype(np.uint8)
    np.savez_compressed(folder / "predictions.npz", ids=np.array(ids), images=images, masks=masks, predictions=preds)


@pytest.mark.parametrize("data", ["synthetic", "folder", "msd", "voc"])
def test_report_with_figures_on_every_data_source(tmp_path, data):
    ids = [f"img{i}" for i in range(len(BASE))]
    for head, ious in (("none", BASE), ("crfrnn", [b + g for b, g in zip(BASE, GAIN)])):
        path = run(tmp_path / head, ious, head=head, data=data, predictions="predictions.npz")
        if data == "msd":  # msd has no data.num_classes: results.json says it
            record = read_results(path)
            assert "num_classes" not in record["config"]["data"]
            record["num_classes"] = 3
            path.write_text(json.dumps(record))
        save_predictions(tmp_path / head, ids, num_classes=3 if data == "msd" else 2, rgb=data == "voc")
    report = write_report(load_study([tmp_path]), tmp_path / "report")
    assert {"metrics_figure", "cost_figure", "qualitative_figure"} <= set(report.paths)
    assert all(report.paths[k].stat().st_size > 10_000 for k in ("metrics_figure", "cost_figure", "qualitative_figure"))
    assert report.problems == []


def test_a_partial_predictions_file_is_listed_and_the_other_figures_drawn(tmp_path, capsys):
    ids = [f"img{i}" for i in range(len(BASE))]
    for head in ("none", "crfrnn"):
        run(tmp_path / head, BASE, head=head, predictions="predictions.npz")
        save_predictions(tmp_path / head, ids)
    data = (tmp_path / "crfrnn" / "predictions.npz").read_bytes()
    (tmp_path / "crfrnn" / "predictions.npz").write_bytes(data[: len(data) // 2])  # a partial copy
    (tmp_path / "none" / "predictions.npz").unlink()
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "predictions.npz missing or unreadable" in out and "predictions.npz unreadable" in out
    assert "qualitative.png: not drawn" in out
    assert (tmp_path / "report" / "metrics.png").stat().st_size > 0 and not (tmp_path / "report" / "qualitative.png").exists()


def test_saved_predictions_without_a_common_image_are_reported_not_drawn(tmp_path):
    for head, ids in (("none", ["a", "b"]), ("crfrnn", ["c", "d"])):
        run(tmp_path / head, BASE, head=head, predictions="predictions.npz")
        save_predictions(tmp_path / head, ids)
    report = write_report(load_study([tmp_path]), tmp_path / "report")
    assert (str(tmp_path / "none"), "saved predictions of the paired runs share no image id") in report.problems
    assert "qualitative_figure" not in report.paths and "metrics_figure" in report.paths


def test_report_and_figures_import_no_model_code():
    import subprocess
    import sys

    code = ("import sys, segrefine.report, segrefine.figures; "
            "print(sorted(m for m in ('torch', 'pytorch_lightning', 'segmentation_models_pytorch', 'hydra', "
            "'segrefine.data', 'segrefine.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- wandb --------------------------------------------------------------------------------------


def test_table_logged_to_wandb_offline_with_numeric_columns(tmp_path):
    from segrefine.report import log_to_wandb

    for seed in (0, 1):
        run(tmp_path / "runs" / f"none{seed}", BASE, seed=seed)
        run(tmp_path / "runs" / f"crf{seed}", [b + g * (1 + seed) for b, g in zip(BASE, GAIN)], head="crfrnn", seed=seed)
    report = write_report(load_study([tmp_path / "runs"]), tmp_path / "report", figures=True)
    run_id = log_to_wandb(report, mode="offline", save_dir=tmp_path)
    (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    media = run_dir / "files" / "media"
    (table_file,) = media.glob("table/report/table_full_*.table.json")
    assert len(list(media.glob("table/report/table_*.table.json"))) == 2  # the main table and the full one
    table = json.loads(table_file.read_text())
    record = dict(zip(table["columns"], table["data"][1]))
    test = report.rows[1].stats["test/iou_image"]
    for stat in ("mean", "ci_low", "ci_high", "p", "p_holm"):
        assert record[f"delta_iou_{stat}"] == pytest.approx(test[stat])
        assert isinstance(record[f"delta_iou_{stat}"], float)  # numbers, not formatted cells
    assert record["test/iou_image_mean"] == pytest.approx(np.mean(BASE) + 1.5 * np.mean(GAIN))
    assert list(media.glob("images/report/metrics_*.png")) and list(media.glob("images/report/forest_*.png"))


# -- a real tiny run: saved predictions agree with its per-image metrics -------------------------


def test_a_real_run_saves_hash_chosen_predictions_that_match_its_metrics(make_cfg, tmp_path):
    import hashlib

    import torch

    from segrefine.metrics import per_image_metrics
    from segrefine.train import train

    out = tmp_path / "run"
    train(make_cfg("backbone=pspnet", "save_predictions=3", output_dir=out))
    record = read_results(out)
    assert record["num_classes"] == 3 and record["class_names"][0] == "background"
    assert record["predictions"] == "predictions.npz" and "unet_crfrnn" in record["metric_definitions"]
    assert record["timing"]["device"] == "cpu" and record["timing"]["torch_threads"] == torch.get_num_threads()
    assert record["timing"]["usable_cpus"] >= 1 and record["timing"]["gpu"] is None
    # 32 px images: 0.75 % of the 45.25 px diagonal = 0.34 px, stated in the table in pixels.
    assert record["boundary_tolerance_px"] == {"32×32": pytest.approx(0.0075 * 32 * 2**0.5)}
    with np.load(out / "predictions.npz", allow_pickle=False) as saved:
        ids, masks, preds, images = (saved[k] for k in ("ids", "masks", "predictions", "images"))
    all_ids = [row["id"] for row in record["per_image"]]
    expected = sorted(sorted(all_ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())[:3])
    assert list(ids) == expected and images.dtype == np.uint8 and images.shape == (3, 32, 32)
    rows = {row["id"]: row for row in record["per_image"]}
    again = per_image_metrics(torch.as_tensor(preds).long(), torch.as_tensor(masks).long(), 3)
    for k, sample_id in enumerate(ids):
        for key in ("iou", "boundary_f1", "unet_crfrnn/iu", "unet_crfrnn/pa"):
            assert again[key][k].item() == pytest.approx(rows[sample_id][key]), key
    assert record["metrics"]["test/iou_image"] == pytest.approx(np.mean([r["iou"] for r in rows.values()]))
    report = write_report(load_study([out]), tmp_path / "report")
    assert {"metrics_figure", "cost_figure"} <= set(report.paths)
    assert report.problems == [("forest.png", "not drawn: no row has a Δ"),
                               ("qualitative.png", "not drawn: no head paired with a `none` baseline")]
    assert "Boundary F1 tolerance: 0.75 % of the image diagonal = 0.34 px at 32×32 (under 1 px" in \
        report.paths["markdown"].read_text()


def test_the_table_says_where_ms_per_image_was_measured_and_refuses_to_mix_silently(tmp_path):
    cpu = {"cpu": "Xeon X", "usable_cpus": 2, "torch_threads": 2, "gpu": None, "torch": "2.4"}
    for seed in (0, 1):
        path = run(tmp_path / f"none{seed}", [0.5, 0.6], seed=seed)
        record = json.loads(path.read_text())
        record["timing"] = cpu
        path.write_text(json.dumps(record))
    text = to_markdown(summarise(load_study([tmp_path]).runs)[0])
    assert "ms/img: backbone + head forward per test image, warm, on CPU Xeon X, 2 usable CPUs, 2 torch threads" in text
    path = tmp_path / "none1" / "results.json"
    record = json.loads(path.read_text())
    record["timing"] = {**cpu, "gpu": "NVIDIA H200"}
    path.write_text(json.dumps(record))
    text = to_markdown(summarise(load_study([tmp_path]).runs)[0])
    assert "not comparable across them: CPU Xeon X" in text and "GPU NVIDIA H200, 2 usable CPUs" in text


def test_error_outline_keeps_the_inside_of_an_error_region():
    from segrefine.figures import error_outline

    errors = np.zeros((6, 6), dtype=bool)
    errors[1:5, 1:5] = True
    expected = errors.copy()
    expected[2:4, 2:4] = False  # the 2x2 inside shows the predicted class
    assert np.array_equal(error_outline(errors), expected)


def test_a_training_runs_best_epoch_is_a_count_not_an_iou_fraction(tmp_path):
    """train.py records val/iou_best_epoch (the epoch of the best val/iou): a run whose best
    epoch is 7 is complete and in the table, while a real IoU above 1 still keeps a run out."""
    path = run(tmp_path / "epoch7", BASE)
    record = json.loads(path.read_text())
    record["metrics"].update({"val/iou_best": 0.61, "val/iou_best_epoch": 7, "train/best_epoch": 7})
    path.write_text(json.dumps(record))
    study = load_study([tmp_path])
    assert len(study.runs) == 1 and study.incomplete == []
    record["metrics"]["val/iou_best"] = 1.2
    path.write_text(json.dumps(record))
    (where, reason), = load_study([tmp_path]).incomplete
    assert "val/iou_best=1.2" in reason and "iou_best_epoch" not in reason
