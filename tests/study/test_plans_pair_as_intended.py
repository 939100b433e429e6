"""The studies' plans, tested without training: which jobs run, and which rows pair.

The report pairs a head with the ``none`` run of the same seed whose
``comparable_config(config, drop=("seed",))`` differs only in ``head``; every job a study
launches must pair with exactly its intended baseline, and nothing else may pair by accident.
"""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from segrefine.study import Job, Plan, check_pairings, job_config, pairings, study_plan
from segrefine.tuning import example_tuned_file

# backbone.fine_skip comes with the model engineer's FCN/PSPNet; until then the control's
# config is composed by appending the key (the pairing rule only reads the composed config).
HAS_FINE_SKIP = "fine_skip" in (REPO / "conf" / "backbone" / "fcn.yaml").read_text()


def paper_table(seeds=(0, 1), protocol="finetune", controls=("fcn", "pspnet"), tune=True) -> Plan:
    backbones = ("fcn", "unet", "pspnet")
    plan = study_plan(
        experiment="paper_table", preset="smoke", seeds=seeds, backbones={b: (f"backbone={b}",) for b in backbones},
        heads={b: ("crfrnn", "pointrend") for b in backbones}, densecrf=backbones, tune=tune,
        crfrnn_protocol=protocol, finetune_epochs=4, fine_skip_controls=controls,
    )
    if not HAS_FINE_SKIP:
        plan.jobs = [Job(**{**j.__dict__, "overrides": tuple("+" + o if o.startswith("backbone.fine_skip") else o
                                                               for o in j.overrides)}) for j in plan.jobs]
    return plan


@pytest.fixture(scope="module")
def tuned_file(tmp_path_factory):
    path = example_tuned_file(tmp_path_factory.mktemp("plan"))
    return lambda job: path


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One study folder for the module: composed configs are cached by their overrides."""
    return tmp_path_factory.mktemp("study")


def test_paper_table_jobs():
    plan = paper_table(seeds=(0,))
    names = {(j.kind, j.name) for j in plan.jobs}
    for b in ("fcn", "unet", "pspnet"):
        assert {("train", f"{b}-none-s0"), ("train", f"{b}-crfrnn-s0"), ("train", f"{b}-none-continued-s0"),
                ("train", f"{b}-pointrend-s0"), ("tune", f"{b}-none-s0"), ("eval", f"{b}-densecrf-s0"),
                ("eval", f"{b}-densecrf_tuned-s0")} <= names
    # U-Net is the only backbone PointRend changes; FCN/PSPNet get the stride-4 skip controls.
    assert ("train", "unet-none-output_stride4-s0") in names
    assert {n for k, n in names if "output_stride" in n} == {"unet-none-output_stride4-s0"}
    assert {n for k, n in names if "fine_skip" in n} == {"fcn-none-fine_skip-s0", "pspnet-none-fine_skip-s0"}
    assert len(plan.jobs) == 3 * 7 + 1 + 2
    # Every job runs after the jobs it needs.
    for i, job in enumerate(plan.jobs):
        before = {(j.kind, j.name) for j in plan.jobs[:i]}
        assert job.source is None or ("train", job.source) in before
        assert job.tuned_from is None or ("tune", job.tuned_from) in before


def test_finetuned_crfrnn_and_its_continuation_share_source_epochs_and_tuned_start(tuned_file, out):
    plan = paper_table(seeds=(0,))
    crfrnn = job_config(plan.get("train", "unet-crfrnn-s0"), plan, out, tuned_file)
    cont = job_config(plan.get("train", "unet-none-continued-s0"), plan, out, tuned_file)
    assert crfrnn["init_from"] == cont["init_from"] == str((out / "train" / "unet-none-s0").resolve())
    assert crfrnn["trainer"]["max_epochs"] == cont["trainer"]["max_epochs"] == 4
    assert crfrnn["head"]["bilateral_sxy"] == 80.0 and crfrnn["head"]["tuned"]["split"] == "val"  # the tuned values
    tuned = job_config(plan.get("eval", "unet-densecrf_tuned-s0"), plan, out, tuned_file)
    assert tuned["head"]["name"] == "densecrf_tuned" and tuned["head"]["bilateral_compat"] == 10.0


@pytest.mark.parametrize(("protocol", "seeds"), [("finetune", (0, 1)), ("scratch", (0,))])
def test_every_job_pairs_with_exactly_its_intended_baseline(protocol, seeds, tuned_file, out):
    plan = paper_table(seeds=seeds, protocol=protocol)
    found = check_pairings(plan, out, tuned_file)  # raises on any other pairing
    intended = {
        "crfrnn": "{b}-none-continued-s{s}" if protocol == "finetune" else "{b}-none-s{s}",
        "densecrf": "{b}-none-s{s}", "densecrf_tuned": "{b}-none-s{s}", "pointrend": "{b}-none-s{s}",
    }
    for seed in seeds:
        for b in ("fcn", "unet", "pspnet"):
            for head, baseline in intended.items():
                kind = "eval" if head.startswith("densecrf") else "train"
                expected = baseline.format(b=b, s=seed)
                if head == "pointrend" and b == "unet":
                    expected = f"unet-none-output_stride4-s{seed}"  # the backbone PointRend uses
                assert found[(kind, f"{b}-{head}-s{seed}")] == [expected]
    assert len(found) == len(seeds) * 3 * 4


def test_a_mispaired_plan_is_refused(tuned_file, out):
    plan = Plan()
    common = ("experiment=paper_table", "preset=smoke", "backbone=unet", "seed=0")
    plan.add(Job("unet-none-s0", "train", (*common, "head=none"), 0))
    # U-Net under PointRend stops at stride 4: the full U-Net is not its baseline.
    plan.add(Job("unet-pointrend-s0", "train", (*common, "head=pointrend"), 0, pairs_with="unet-none-s0"))
    with pytest.raises(ValueError, match=r"unet-pointrend-s0: pairs with nothing, intended unet-none-s0"):
        check_pairings(plan, out, tuned_file)


def test_pairing_rule_by_hand():
    def config(head, seed=0, lr=1e-3, **top):
        return {"seed": seed, "head": {"name": head}, "optim": {"lr": lr}, **top}

    configs = {("train", "a"): config("none"), ("train", "b"): config("none", lr=1e-2),
               ("train", "c"): config("crfrnn"), ("train", "d"): config("crfrnn", seed=1),
               ("train", "e"): config("none", seed=1), ("eval", "f"): config("densecrf", lr=1e-2)}
    assert pairings(configs) == {("train", "c"): ["a"], ("train", "d"): ["e"], ("eval", "f"): ["b"]}


def test_plan_refuses_inconsistent_requests():
    with pytest.raises(ValueError, match="crfrnn protocol 'joint'"):
        paper_table(protocol="joint")
    with pytest.raises(ValueError, match=r"\['segnet'\] are not backbones"):
        study_plan(experiment="paper_table", preset="smoke", seeds=[0], backbones={"fcn": ("backbone=fcn",)},
                   heads={}, densecrf=["segnet"])
    plan = Plan()
    with pytest.raises(ValueError, match="refers to train job x"):
        plan.add(Job("y", "eval", ("head=densecrf",), 0, source="x"))


def test_without_tuning_crfrnn_starts_from_the_head_defaults(tuned_file, out):
    plan = paper_table(seeds=(0,), tune=False, controls=())
    assert not plan.of("tune") and not [j for j in plan.jobs if "densecrf_tuned" in j.name]
    crfrnn = job_config(plan.get("train", "fcn-crfrnn-s0"), plan, out, tuned_file)
    assert "tuned" not in crfrnn["head"]
    assert crfrnn["head"]["bilateral_sxy"] == OmegaConf.load(REPO / "conf" / "head" / "crfrnn.yaml").bilateral_sxy


@pytest.mark.slow  # ~11 s of config composition on MSD data; tests/test_origin.py checks the plan's blocks
def test_origin_table_trains_exactly_its_rows_and_pairs_them(tuned_file, out, tmp_path_factory):
    from test_datasets import write_msd_task

    from segrefine.study import origin
    backbones = ["fcn", "segnet", "unet"]
    root = tmp_path_factory.mktemp("msd") / "Task04_Hippocampus"
    write_msd_task(root, n=3)
    args = type("Args", (), {"preset": "full", "seeds": "0,1", "tune_trials": 40, "crfrnn_protocol": "finetune",
                             "finetune_epochs": 40})()
    plan = origin.plan_for(args, [*origin.METRICS_OVERRIDES, "data=msd", f"data.root={root}"], backbones)
    jobs = {(j.kind, j.name.rsplit("-s", 1)[0]) for j in plan.jobs}
    assert jobs == {("train", f"{b}-none") for b in backbones} | {
        ("eval", "fcn-densecrf"), ("eval", "fcn-densecrf_tuned"), ("tune", "fcn-none"), ("tune", "unet-none"),
        ("eval", "unet-densecrf"), ("eval", "unet-densecrf_tuned"), ("train", "unet-none-continued"),
        ("train", "unet-crfrnn"), ("train", "crfunet-crfrnn"),
        # data=msd is volumetric: U-Net's none checkpoint also gets the 3-D CRF, defaults and tuned
        ("eval", "unet-densecrf_3d"), ("tune", "unet-none-3d"),
        ("eval", "unet-densecrf_3d_tuned")}
    # Every table row is a job of the plan, and every published row is shown.
    assert {job for _, _, job, _ in origin.ROWS} <= {name for _, name in jobs}
    assert {against for *_, against in origin.ROWS if against} <= {name for _, name in jobs}
    assert {published for _, published, _, _ in origin.ROWS if published} == set(origin.PUBLISHED)
    found = check_pairings(plan, out, tuned_file)
    assert found[("train", "unet-crfrnn-s1")] == ["unet-none-continued-s1"]
    assert found[("eval", "fcn-densecrf_tuned-s0")] == ["fcn-none-s0"]
    assert found[("eval", "unet-densecrf_3d_tuned-s1")] == ["unet-none-s1"]
    head = job_config(plan.get("eval", "unet-densecrf_3d_tuned-s0"), plan, out, tuned_file)["head"]
    assert head["volume"] is True and head["name"] == "densecrf_3d_tuned"
    # Block (a)'s CRF-U-Net is 64 wide: no none run pairs with it by accident.
    assert found[("train", "crfunet-crfrnn-s0")] == []
    config = job_config(plan.get("train", "unet-none-s0"), plan, out, tuned_file)
    # The origin schedule, networks and binary protocol, on the MSD source.
    assert config["data"]["name"] == "msd" and config["data"]["batch_size"] == 5
    assert config["metrics"]["protocol"] == "unet_crfrnn" and config["metrics"]["merge_foreground"] is True
    assert (config["trainer"]["max_epochs"], config["trainer"]["limit_train_batches"]) == (80, 10)
    assert config["optim"]["scheduler"]["_target_"] == "torch.optim.lr_scheduler.StepLR"
    assert (config["optim"]["scheduler"]["gamma"], config["optim"]["scheduler"]["step_size"]) == (0.9, None)
    assert config["backbone"]["variant"] == "vanilla" and config["backbone"]["base_width"] is None  # 32
    fcn = job_config(plan.get("train", "fcn-none-s0"), plan, out, tuned_file)["backbone"]
    assert (fcn["variant"], fcn["encoder_name"], fcn["encoder_weights"]) == ("8s", "vgg16", None)
    crfunet = job_config(plan.get("train", "crfunet-crfrnn-s0"), plan, out, tuned_file)
    assert (crfunet["backbone"]["base_width"], crfunet["trainer"]["max_epochs"], crfunet["init_from"]) == (64, 80, None)
    assert (crfunet["head"]["parametrisation"], crfunet["head"]["iterations"], crfunet["head"]["bilateral_sxy"]) == (
        "zheng", 10, 160)
    # --networks resnet18: segrefine's networks; its CRF-U-Net then is the U-Net and pairs with it.
    resnet = origin.plan_for(args, [*origin.METRICS_OVERRIDES, "data=msd", f"data.root={root}"], ["unet"], "resnet18")
    assert plan_backbone(resnet, "unet-none-s0", out, tuned_file)["variant"] == "smp"
    assert check_pairings(resnet, out, tuned_file)[("train", "crfunet-crfrnn-s0")] == ["unet-none-s0"]


def plan_backbone(plan, name, out, tuned_file):
    return job_config(plan.get("train", name), plan, out, tuned_file)["backbone"]


def test_a_job_that_does_not_compose_is_named_before_anything_runs(tuned_file, out):
    plan = Plan()
    plan.add(Job("fcn-none-s0", "train", ("experiment=paper_table", "backbone=fcn", "backbone.no_such_key=true"), 0))
    with pytest.raises(ValueError, match=r"train job fcn-none-s0 does not compose: .*backbone\.no_such_key"):
        check_pairings(plan, out, tuned_file)
    assert not (out / "train" / "fcn-none-s0").exists()


def test_origin_table_prints_three_blocks_and_names_the_protocol(tmp_path):
    import json

    from segrefine.study import origin

    def result(kind, job, seed=0, **metrics):
        folder = tmp_path / kind / job
        folder.mkdir(parents=True)
        config = {"seed": seed, "data": {"name": "synthetic", "image_size": 64, "batch_size": 5},
                  "trainer": {"max_epochs": 8, "limit_train_batches": 10}, "metrics": {"merge_foreground": True},
                  "backbone": {"name": "unet", "variant": "vanilla", "encoder_name": None, "base_width": None}}
        (folder / "results.json").write_text(json.dumps({"status": "complete", "metrics": metrics, "seed": seed,
                                                         "num_classes": 3, "config": config}))

    result("train", "unet-none-s0", **{"test/iou": 0.70, "test/dice": 0.80, "test/pixel_acc": 0.9})
    result("train", "unet-none-s1", 1, **{"test/iou": 0.74, "test/dice": 0.84, "test/pixel_acc": 0.9})
    result("eval", "unet-densecrf-s0", **{"test/iou": 0.75, "test/dice": 0.6, "test/pixel_acc": 0.8})
    result("eval", "fcn-densecrf-s0", **{"test/iou": 0.5, "test/dice": 0.6, "test/pixel_acc": 0.8})
    table = origin.origin_table(tmp_path)
    # Standard-protocol numbers only: said so, never under the origin's column names.
    assert "NOT the origin's" in table and "ours IoU" in table and "ours IU" not in table
    block_a, block_b = table.split("**(b)")[0], table.split("**(b)")[1].split("**(c)")[0]
    assert "| Vanilla U-Net | 72.00 ± 2.83 | 82.00 ± 2.83 | 90.00 ± 0.00 | 2 | Vanilla U-Net |" in block_a
    assert "| CNN-CRF, our reading: FCN-8s + offline DenseCRF (defaults) | 50.00 | 60.00 | 80.00 | 1 | CNN-CRF |" in block_a
    assert "SegNet" not in block_a  # rows without runs are left out
    # (b): the paired difference over the seeds both have (seed 0 only: 75 - 70).
    assert "| U-Net + CRF (offline, default parameters), same weights | 75.00 | 60.00 | 80.00 | 1 | +5.00 | unet-none |" in block_b
    assert "| Vanilla U-Net | 75.42 | 83.49 | 72.18 |" in table.split("**(c)")[1]
    # The footnote says what ours are.
    assert "data synthetic, image size 64, 3 classes, foreground merged: True; 8 epochs" in table
    assert "seeds 0, 1" in table and "networks (?): unet vanilla width 32;" in table  # from the runs' configs
    # --crfrnn-protocol scratch: the CRF-RNN row says so and is against the U-Net itself.
    result("train", "unet-crfrnn-s0", **{"test/iou": 0.72, "test/dice": 0.8, "test/pixel_acc": 0.9})
    (tmp_path / "origin_study.json").write_text(json.dumps({"preset": "smoke", "crfrnn_protocol": "scratch"}))
    assert "| U-Net + CRF-RNN trained jointly from scratch (--crfrnn-protocol scratch) | 72.00 | 80.00 | 90.00 | 1 | " \
           "+2.00 | unet-none |" in origin.origin_table(tmp_path)
    (tmp_path / "origin_study.json").unlink()
    (tmp_path / "train" / "unet-crfrnn-s0" / "results.json").unlink()
    # With the origin protocol's numbers in every training run, its columns are used.
    keys = {v: 0.5 for v in origin.ORIGIN_KEYS.values()}
    for seed in (0, 1):
        path = tmp_path / "train" / f"unet-none-s{seed}" / "results.json"
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "metrics": keys}))
    table = origin.origin_table(tmp_path)
    assert "origin protocol (metrics=unet_crfrnn)" in table and "| Vanilla U-Net | 50.00 ± 0.00" in table


def test_study_time_adds_up_over_reruns(tmp_path, capsys):
    """A rerun that finds every job done must not replace the study's time with its own ~0 s
    (the paper_table README prints it as "produced ... in N min")."""
    from segrefine.study import record_time

    path = tmp_path / "study.json"
    record_time(path, "python run.py --preset smoke", 390.0, {"train": 348.0, "tune": 18.0, "eval": 24.0})
    record = record_time(path, "python run.py --preset smoke --update-readme", 2.5, {"train": 2.5, "tune": 0.0, "eval": 0.0})
    assert record == json.loads(path.read_text())
    assert record["command"] == "python run.py --preset smoke"  # the run that did the work
    assert record["seconds"] == 392.5 and record["by_kind"] == {"train": 350.5, "tune": 18.0, "eval": 24.0}
    assert [r["seconds"] for r in record["runs"]] == [390.0, 2.5]
    path.write_text("{not json")
    record = record_time(path, "python run.py", 5.0, {"train": 5.0})
    assert record["seconds"] == 5.0 and "unreadable" in capsys.readouterr().out
