"""What a Δ cell may claim, by design: hand-computed intervals and p-values, stars only where the
design has a test, subjects as the unit, non-finite values as missing data, Holm families."""

import json
import math

import numpy as np
import pytest

from segrefine.report import holm, load_study, main, sign_flip_p, summarise, to_csv, to_markdown_full as to_markdown
from segrefine.record import RunRecord
from segrefine.runconfig import comparable_config

from test_report import BASE, GAIN, config, eval_run, run


def rows_by_head(folder):
    rows, _ = summarise(load_study([folder]).runs)
    return {r.head: r for r in rows}, rows


def table_line(rows, head):
    return next(line for line in to_markdown(rows).splitlines() if line.startswith("| ") and f" | {head} | " in line)


def test_three_seeds_get_a_t_interval_and_the_exact_sign_flip_p(tmp_path):
    # Per-seed Δ 0.2 / 1.0 / 1.8 points. By hand: mean 1.0, sd 0.8, t(2; 0.975) = 4.302653,
    # half-width 4.302653 * 0.8 / sqrt(3) = 1.98727 -> [-0.99, +2.99]; p = 2 of 8 sign patterns.
    for seed, delta in enumerate((0.002, 0.010, 0.018)):
        run(tmp_path / f"n{seed}", BASE, seed=seed)
        run(tmp_path / f"c{seed}", [b + delta for b in BASE], head="crfrnn", seed=seed)
    heads, rows = rows_by_head(tmp_path)
    test = heads["crfrnn"].stats["test/iou_image"]
    assert test["level"] == "seeds" and test["n"] == 3
    assert (test["ci_low"], test["ci_high"]) == pytest.approx((0.01 - 0.0198727, 0.01 + 0.0198727), abs=1e-6)
    assert test["p"] == pytest.approx(0.25)
    assert "+1.00 [-0.99, +2.99] p=0.25 (Holm 0.5) n=3" in table_line(rows, "crfrnn")  # Holm over IoU and BF1


def test_one_seed_retrained_shows_the_delta_without_a_test_or_star(tmp_path):
    run(tmp_path / "none", BASE)
    run(tmp_path / "crf", [b + 0.063 for b in BASE], head="crfrnn")  # every image +6.3 points
    heads, rows = rows_by_head(tmp_path)
    test = heads["crfrnn"].stats["test/iou_image"]
    assert test["level"] == "none" and test["p"] is None and test["ci_low"] is None and "p_holm" not in test
    line = table_line(rows, "crfrnn")
    assert "+6.30 (1 seed: no test)" in line and "*" not in line and "p=" not in line
    assert "Across-seed family" not in to_markdown(rows)  # no test, no family
    # ... but the table says what a test would take: 2 Δs (IoU, BF1), 2 * 2/2^n < 0.05 from n = 7.
    assert "No test: 2 Δs of one retrained model per side" in to_markdown(rows)
    assert "a star would need at least 7 seeds per configuration" in to_markdown(rows)


def test_one_seed_same_weights_is_conditional_and_its_own_holm_family(tmp_path):
    # none and crfrnn with two seeds (across seeds), densecrf on seed 0's weights only (conditional).
    for seed in (0, 1):
        none = run(tmp_path / f"n{seed}", BASE, seed=seed)
        run(tmp_path / f"c{seed}", [b + 0.02 + 0.01 * seed for b in BASE], head="crfrnn", seed=seed)
    base_cfg = json.loads((tmp_path / "n0" / "results.json").read_text())["config"]
    eval_run(tmp_path / "d0", [b + g for b, g in zip(BASE, GAIN)], base_cfg)
    heads, rows = rows_by_head(tmp_path)
    conditional = heads["densecrf"].stats["test/iou_image"]
    assert conditional["level"] == "images" and conditional["n"] == 1 and conditional["unit"] == "images"
    assert conditional["p"] == pytest.approx(sign_flip_p(np.array(GAIN)))
    # A t-interval over the 10 images: t(9; 0.975) = 2.262157.
    half = 2.262157 * np.std(GAIN, ddof=1) / math.sqrt(10)
    assert (conditional["ci_low"], conditional["ci_high"]) == pytest.approx((np.mean(GAIN) - half, np.mean(GAIN) + half))
    across = [heads["crfrnn"].stats[k]["p"] for k in ("test/iou_image", "test/boundary_f1_image")]
    within = [heads["densecrf"].stats[k]["p"] for k in ("test/iou_image", "test/boundary_f1_image")]
    assert [heads["crfrnn"].stats[k]["p_holm"] for k in ("test/iou_image", "test/boundary_f1_image")] == \
        pytest.approx(holm(across))
    assert [heads["densecrf"].stats[k]["p_holm"] for k in ("test/iou_image", "test/boundary_f1_image")] == \
        pytest.approx(holm(within))
    assert "]† p=" in table_line(rows, "densecrf") and "n=1" in table_line(rows, "densecrf")
    notes = to_markdown(rows)
    assert "Across-seed family: 2 tests with 2 paired seeds" in notes and "Conditional (†) family: 2 tests" in notes


def subject_rows(values_by_subject):
    rows = []
    for subject, values in values_by_subject.items():
        rows += [{"id": f"{subject}_z{k:03d}", "subject": subject, "iou": v, "boundary_f1": v / 2}
                 for k, v in enumerate(values)]
    return rows


def write_with_rows(folder, cfg, rows, job_type="train", **extra):
    mean = float(np.mean([r["iou"] for r in rows]))
    metrics = {"test/iou": mean, "test/iou_image": mean, "test/boundary_f1_image": mean / 2, "test/ms_per_image": 1.0}
    return RunRecord.new(job_type=job_type, seed=cfg["seed"], config=cfg, metrics=metrics, per_image=rows,
                         **extra).write(folder)


def test_slices_of_one_subject_are_one_unit_in_the_exact_sign_flip(tmp_path):
    # 6 subjects x 3 slices; every slice of 5 subjects gains 0.01, every slice of one loses 0.01.
    # By hand over subjects (summed Δ +-0.03): |sum| >= 4 units in 14 of 64 sign patterns, p = 0.21875;
    # the cluster-robust interval is the t-interval of the 6 subject means (equal sizes):
    # mean 0.006667, se 0.003333, t(5; 0.975) = 2.570582 -> [-0.00190, +0.01524].
    signs = {f"s{k}": (1 if k < 5 else -1) for k in range(6)}
    base = subject_rows({s: [0.5, 0.6, 0.7] for s in signs})
    head = subject_rows({s: [v + 0.01 * sign for v in (0.5, 0.6, 0.7)] for s, sign in signs.items()})
    base_cfg = config(data="msd")
    write_with_rows(tmp_path / "none", base_cfg, base)
    eval_cfg = {**base_cfg, "head": {"_target_": "segrefine.heads.densecrf", "name": "densecrf"}}
    write_with_rows(tmp_path / "crf", eval_cfg, head, job_type="eval",
                    source={"head": "none", "seed": 0, "run_config": comparable_config(base_cfg)})
    heads, rows = rows_by_head(tmp_path)
    test = heads["densecrf"].stats["test/iou_image"]
    assert test["unit"] == "subjects" and test["units"] == 6
    assert test["p"] == pytest.approx(14 / 64)
    assert (test["ci_low"], test["ci_high"]) == pytest.approx((0.006667 - 0.0085686, 0.006667 + 0.0085686), abs=1e-6)
    # Treating the 18 slices as independent would have claimed p = 2 * (816 + 153 + 18 + 1) / 2**18 = 0.0075.
    assert sign_flip_p(np.array([0.01] * 15 + [-0.01] * 3)) == pytest.approx(1976 / 2**18, abs=0.002)  # Monte Carlo
    assert "the images of one subject are not independent" in to_markdown(rows)


def test_non_finite_values_are_missing_data_never_significant(tmp_path):
    run(tmp_path / "none", BASE)
    base_cfg = json.loads((tmp_path / "none" / "results.json").read_text())["config"]
    path = eval_run(tmp_path / "crf", [b + 0.05 for b in BASE], base_cfg)
    record = json.loads(path.read_text())
    for i, row in enumerate(record["per_image"]):
        row["iou"] = math.nan if i < 2 else None  # a NaN literal (read back as float nan) and a null
        row["boundary_f1"] = math.nan if i == 0 else row["boundary_f1"]
    path.write_text(json.dumps(record))  # allow_nan: a bare NaN in the file, as a careless writer leaves it
    heads, rows = rows_by_head(tmp_path)
    crf = heads["densecrf"]
    assert "test/iou_image" not in crf.stats  # every pair has a missing value: no Δ at all
    assert any("every per-image iou pair has a non-finite value" in note for note in crf.notes)
    bf1 = crf.stats["test/boundary_f1_image"]
    assert bf1["dropped"] == 1 and bf1["mean"] == pytest.approx(0.025)  # 9 finite pairs of +0.05 / 2
    line = table_line(rows, "densecrf")
    assert "nan" not in line.lower() and "1 non-finite pairs left out" in line
    with pytest.raises(ValueError, match="non-finite"):
        sign_flip_p(np.array([0.1, math.nan, 0.2]))


def test_paired_n_is_shown_and_extra_seeds_are_named(tmp_path):
    for seed in (0, 1):
        run(tmp_path / f"n{seed}", BASE, seed=seed)
    for seed in (0, 1, 2):
        run(tmp_path / f"c{seed}", [b + 0.01 * (seed + 1) for b in BASE], head="crfrnn", seed=seed)
    heads, rows = rows_by_head(tmp_path)
    line = table_line(rows, "crfrnn")
    assert " n=2 of 3" in line and "| 3 |" in line  # the cells average 3 seeds, the Δ pairs 2
    assert heads["crfrnn"].stats["test/iou_image"]["mean"] == pytest.approx(0.015)
    assert any("seeds 2 have no `none` run" in note for note in heads["crfrnn"].notes)


def test_identical_rows_are_tested_once_and_a_kept_default_tuning_says_so(tmp_path):
    run(tmp_path / "none", BASE)
    base_cfg = json.loads((tmp_path / "none" / "results.json").read_text())["config"]
    values = [b + g for b, g in zip(BASE, GAIN)]
    eval_run(tmp_path / "crf", values, base_cfg)
    tuned = eval_run(tmp_path / "tuned", values, base_cfg, head="densecrf_tuned")
    record = json.loads(tuned.read_text())
    defaults = {"gaussian_sxy": 1.0, "bilateral_compat": 5.0}
    record["config"]["head"].update(defaults, tuned={"split": "val", "trials": 8, "by": "densecrf", "keys": list(defaults)})
    tuned.write_text(json.dumps(record))
    crf = json.loads((tmp_path / "crf" / "results.json").read_text())
    crf["config"]["head"].update(defaults)
    (tmp_path / "crf" / "results.json").write_text(json.dumps(crf))
    heads, rows = rows_by_head(tmp_path)
    assert heads["densecrf_tuned"].same_as is heads["densecrf"]
    line = table_line(rows, "densecrf_tuned (tuning kept the defaults)")
    assert "= U-Net densecrf (same per-image values)" in line and "p=" not in line
    assert "Conditional (†) family: 2 tests" in to_markdown(rows)  # the densecrf row's IoU and BF1 only
    assert heads["densecrf"].stats["test/iou_image"]["p_holm"] == pytest.approx(
        holm([heads["densecrf"].stats[k]["p"] for k in ("test/iou_image", "test/boundary_f1_image")])[0])
    # A tuning that chose zero kernel weights is named as such.
    record["config"]["head"].update(gaussian_compat=0.0, bilateral_compat=0.0,
                                    tuned={**record["config"]["head"]["tuned"], "keys": ["gaussian_compat", "bilateral_compat"]})
    tuned.write_text(json.dumps(record))
    _, rows = rows_by_head(tmp_path)
    assert "densecrf_tuned (no CRF won)" in to_markdown(rows)


def test_a_matched_control_row_also_shows_its_delta_against_the_plain_backbone(tmp_path):
    def write(folder, head, stride, gain):
        cfg = config(head=head)
        cfg["backbone"]["output_stride"] = stride
        rows = [{"id": f"img{i}", "iou": b + gain, "boundary_f1": (b + gain) / 2} for i, b in enumerate(BASE)]
        write_with_rows(folder, cfg, rows)

    write(tmp_path / "plain", "none", 1, 0.05)  # plain U-Net: better than the stride-4 control
    write(tmp_path / "control", "none", 4, 0.0)
    write(tmp_path / "pointrend", "pointrend", 4, 0.02)
    rows, _ = summarise(load_study([tmp_path]).runs)
    pointrend = next(r for r in rows if r.head == "pointrend")
    assert pointrend.baseline.config["backbone"]["output_stride"] == 4
    assert pointrend.plain.config["backbone"]["output_stride"] == 1
    assert pointrend.stats["test/iou_image"]["mean"] == pytest.approx(0.02)
    assert pointrend.plain_stats["test/iou_image"]["mean"] == pytest.approx(-0.03)
    line = next(line for line in to_markdown(rows).splitlines() if "| pointrend |" in line)
    assert "+2.00 (1 seed: no test); vs plain U-Net none: -3.00 (1 seed: no test)" in line
    assert "delta_vs_plain_iou_mean" in to_csv(rows).splitlines()[0]


def test_boundary_f1_tolerance_is_stated_in_pixels_per_image_size(tmp_path):
    run(tmp_path / "small", BASE, size=64)
    run(tmp_path / "large", BASE, size=320, backbone="fcn")
    rows, _ = summarise(load_study([tmp_path]).runs)
    text = to_markdown(rows)
    # 0.75 % of the diagonal: 0.0075 * 64 * sqrt(2) = 0.68 px, 0.0075 * 320 * sqrt(2) = 3.39 px.
    assert "Boundary F1 tolerance: 0.75 % of the image diagonal = 3.39 px at 320×320, 0.68 px at 64×64 " \
           "(under 1 px: exact matching)." in text


def test_a_run_with_metrics_out_of_their_range_is_listed_not_tabled(tmp_path, capsys):
    run(tmp_path / "good", BASE)
    bad = run(tmp_path / "bad", BASE, backbone="fcn")
    record = json.loads(bad.read_text())
    record["metrics"]["test/iou"], record["metrics"]["test/ms_per_image"] = 1.7, -5.0
    bad.write_text(json.dumps(record))
    study = load_study([tmp_path])
    assert [r.backbone for r in study.runs] == ["unet"]
    (where, reason), = study.incomplete
    assert where.endswith("bad") and "test/iou=1.7" in reason and "test/ms_per_image=-5" in reason
    assert main([str(tmp_path), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "170.00" not in out and "Runs left out" in out


def test_the_table_says_how_many_seeds_a_star_needs(tmp_path):
    for seed in (0, 1, 2):
        run(tmp_path / f"n{seed}", BASE, seed=seed)
        for head, gain in (("crfrnn", 0.03), ("pointrend", 0.04)):
            run(tmp_path / f"{head}{seed}", [b + gain for b in BASE], head=head, seed=seed)
    _, rows = rows_by_head(tmp_path)
    text = to_markdown(rows)
    # 4 tests with 3 seeds: the smallest p is 2/8, times 4 = 1 (capped); 4 * 2/2^n < 0.05 needs 2^n > 160, n >= 8.
    assert ("Across-seed family: 4 tests with 3 paired seeds; the smallest Holm-adjusted p this table can reach is 1 "
            "(no star is reachable); with 4 tests a star needs at least 8 seeds") in text


def test_a_crf_rnn_started_from_tuned_densecrf_values_is_not_called_a_tuning_outcome(tmp_path):
    run(tmp_path / "none", BASE)
    path = run(tmp_path / "crf", [b + 0.01 for b in BASE], head="crfrnn")
    record = json.loads(path.read_text())
    record["config"]["head"].update(gaussian_compat=0.0, bilateral_compat=0.0,
                                    tuned={"split": "val", "by": "densecrf", "keys": ["gaussian_compat", "bilateral_compat"]})
    path.write_text(json.dumps(record))
    _, rows = rows_by_head(tmp_path)
    assert "no CRF won" not in to_markdown(rows)  # its initial values were tuned; then it was trained


def volume_rows(dice, hd95, infinite=()):
    return [{"subject": f"s{k}", "n_slices": 5, "dice": d, "iou": d / (2 - d), "nsd": d, "hd95": h,
             "infinite": ["hd95"] if k in infinite else []} for k, (d, h) in enumerate(zip(dice, hd95))]


def test_volumetric_runs_are_compared_subject_by_subject_on_volume_metrics(tmp_path):
    base_cfg = config(data="msd")
    slices = subject_rows({f"s{k}": [0.5, 0.6] for k in range(4)})
    write_with_rows(tmp_path / "none", base_cfg, slices,
                    per_volume=volume_rows([0.70, 0.60, 0.80, 0.75], [3.0, 4.0, 2.0, 5.0]))
    eval_cfg = {**base_cfg, "head": {"_target_": "segrefine.heads.densecrf", "name": "densecrf"}}
    source = {"head": "none", "seed": 0, "run_config": comparable_config(base_cfg)}
    # Every subject's volume Dice +2 points, HD95 -1 mm; one subject's HD95 infinite in the head's run.
    write_with_rows(tmp_path / "crf", eval_cfg, slices, job_type="eval", source=source,
                    per_volume=volume_rows([0.72, 0.62, 0.82, 0.77], [2.0, 3.0, 1.0, None], infinite=(3,)))
    study = load_study([tmp_path])
    rows, _ = summarise(study.runs, "standard/volume")
    crf = next(r for r in rows if r.head == "densecrf")
    dice = crf.stats["test/volume/dice"]
    # By hand: 4 subject Δs of +0.02, one model on the same weights: a conditional test over
    # subjects, p = 2 of 16 sign patterns.
    assert dice["mean"] == pytest.approx(0.02) and dice["unit"] == "subjects" and dice["p"] == pytest.approx(0.125)
    assert "test/volume/hd95" not in crf.stats  # an infinite HD95 has no finite Δ
    assert any("hd95 is infinite for 1 subject(s)" in note for note in crf.notes)
    from segrefine.report import study_protocol, to_markdown as compact

    assert study_protocol(study.runs, None) == "standard/volume"
    table = compact(rows, "standard/volume")
    assert ("| configuration | head | paired n | Dice % (vol mean) | Δ Dice % [95 % CI] | p (Holm) | Δ NSD % | "
            "Δ HD95 mm | ms/img | params |") in table  # at most 10 columns; slice metrics in the full table
    assert "the subject is the unit" in table


def test_a_per_volume_value_out_of_range_is_a_problem(tmp_path):
    cfg = config(data="msd")
    write_with_rows(tmp_path / "bad", cfg, subject_rows({"s0": [0.5]}), per_volume=volume_rows([1.3], [2.0]))
    (where, reason), = load_study([tmp_path]).incomplete
    assert "per_volume[s0].dice=1.3" in reason


def test_subjects_named_by_one_side_only_still_cluster_and_conflicting_ones_are_refused(tmp_path):
    base_cfg = config(data="msd")
    rows = subject_rows({"s0": [0.5, 0.6], "s1": [0.4, 0.7], "s2": [0.6, 0.6]})
    write_with_rows(tmp_path / "none", base_cfg, [{k: v for k, v in r.items() if k != "subject"} for r in rows])
    eval_cfg = {**base_cfg, "head": {"_target_": "segrefine.heads.densecrf", "name": "densecrf"}}
    source = {"head": "none", "seed": 0, "run_config": comparable_config(base_cfg)}
    head_rows = [{**r, "iou": r["iou"] + 0.01} for r in rows]
    write_with_rows(tmp_path / "crf", eval_cfg, head_rows, job_type="eval", source=source)
    heads, _ = rows_by_head(tmp_path)
    assert heads["densecrf"].stats["test/iou_image"]["unit"] == "subjects"  # the baseline is an older run
    assert heads["densecrf"].stats["test/iou_image"]["units"] == 3
    head_rows[0]["subject"] = "s9"
    write_with_rows(tmp_path / "crf", eval_cfg, head_rows, job_type="eval", source=source)
    write_with_rows(tmp_path / "none", base_cfg, rows)
    heads, _ = rows_by_head(tmp_path)
    assert any("different subjects" in note for note in heads["densecrf"].notes)


def test_one_label_given_to_different_configurations_does_not_merge_their_names(tmp_path):
    run(tmp_path / "a", BASE, label="my sweep")
    run(tmp_path / "b", BASE, size=320, label="my sweep")
    rows, _ = summarise(load_study([tmp_path]).runs)
    assert len({r.label for r in rows}) == 2 and "my sweep" not in {r.label for r in rows}
