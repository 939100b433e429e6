"""Run labels (the row in words) and tracker groups (one per exact configuration)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, TINY
from segrefine.labels import LabelError, check_label, evaluation_label, generated_label
from segrefine.runconfig import comparable_config, config_group

FORBIDDEN = ("=None", "=False", "init_from=", "<a run", "=null", "=false")


def resolved(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, "paths.data_dir=/data", "paths.output_dir=/out/job", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def label(*overrides: str) -> str:
    """The label a command line ``segrefine-train *overrides`` gets."""
    return generated_label(resolved(*overrides), overrides)


@pytest.mark.parametrize("overrides, expected", [
    ((), "U-Net"),
    (("backbone=fcn",), "FCN-8s"),
    (("backbone=fcn", "backbone.variant=16s"), "FCN-16s"),
    (("backbone=fcn", "backbone.fine_skip=true"), "FCN-8s + stride-4 skip"),
    (("backbone=pspnet", "trainer.max_epochs=12"), "PSPNet, 12 epochs"),
    (("trainer.max_epochs=1",), "U-Net, 1 epoch"),
    (("backbone=pspnet", "backbone.variant=zhao"), "PSPNet (Zhao)"),
    (("head=crfrnn",), "U-Net + CRF-RNN"),
    (("head=pointrend",), "U-Net + PointRend"),  # the stride-4 stop is PointRend's own
    (("backbone.output_stride=4",), "U-Net stopped at stride 4"),
    (("head=crfrnn", "head.parametrisation=zheng"), "U-Net + CRF-RNN, parametrisation zheng"),
    (("backbone=fcn", "backbone.fine_skip=false"), "FCN-8s"),
    (("backbone.encoder_weights=null", "optim.optimizer.lr=0.0001"), "U-Net, no encoder weights, lr 0.0001"),
    (("init_from=/out/fcn-none-s0", "trainer.max_epochs=4", "backbone=fcn"), "FCN-8s, 4 epochs (fine-tuned)"),
    # Run-only keys and the seed say nothing about the row.
    (("seed=3", "logger=csv", "paths.log_dir=/x", "trainer.accelerator=cpu", "label=null"), "U-Net"),
])
def test_generated_labels_say_the_configuration_in_words(overrides, expected):
    got = label(*overrides)
    assert got == expected
    assert not any(bad in got for bad in FORBIDDEN)


def test_long_generated_labels_keep_whole_words_and_count_the_rest():
    got = label("data.image_size=48", "data.num_train=12", "data.num_val=6", "data.num_test=6", "trainer.max_epochs=3",
                "backbone=fcn", "backbone.fine_skip=true")
    assert got == "FCN-8s + stride-4 skip, 3 epochs, image size 48, +3 more"
    assert len(got) <= 60


def test_early_stopping_makes_its_own_row_and_says_so_but_logging_callbacks_do_not():
    base = resolved()
    stopping = resolved("+callbacks.stop._target_=pytorch_lightning.callbacks.EarlyStopping",
                        "+callbacks.stop.monitor=val/iou")
    logging_only = resolved("+callbacks.progress._target_=pytorch_lightning.callbacks.TQDMProgressBar",
                            "+callbacks.summary._target_=pytorch_lightning.callbacks.ModelSummary",
                            "~callbacks.lr_monitor")
    assert comparable_config(logging_only, drop=("seed",)) == comparable_config(base, drop=("seed",))
    assert config_group(logging_only) == config_group(base)
    assert comparable_config(stopping, drop=("seed",)) != comparable_config(base, drop=("seed",))
    assert config_group(stopping) != config_group(base)
    assert generated_label(stopping) == "U-Net, early stopping"


def test_labels_longer_than_60_characters_are_refused_by_name():
    assert check_label("x" * 60) == "x" * 60
    with pytest.raises(LabelError, match="61 characters.*at most 60.*shorten it"):
        check_label("x" * 61)
    with pytest.raises(LabelError, match="non-empty"):
        check_label("  ")


def test_train_refuses_a_long_label_before_writing_anything(make_cfg, tmp_path):
    from segrefine.train import train

    with pytest.raises(LabelError, match="61 characters"):
        train(make_cfg(f"label={'y' * 61}", output_dir=tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_an_evaluation_says_which_head_on_which_run():
    trained = resolved("backbone=fcn")
    densecrf = {**trained, "head": {"name": "densecrf"}}
    assert evaluation_label(densecrf, trained, "FCN-8s", overrides=[]) == "FCN-8s + DenseCRF"
    assert evaluation_label(densecrf, trained, None, overrides=[]) == "FCN-8s + DenseCRF"
    assert evaluation_label(densecrf, trained, "FCN-8s", split="val", overrides=[]) == "FCN-8s + DenseCRF, val split"
    tuned = {**trained, "head": {"name": "densecrf", "tuned": {"keys": ["bilateral_compat"]}}}
    assert evaluation_label(tuned, trained, "FCN-8s", overrides=[]) == "FCN-8s + DenseCRF (tuned)"
    assert evaluation_label(trained, trained, "FCN-8s", overrides=[]) == "FCN-8s"
    crfrnn = resolved("backbone=fcn", "head=crfrnn")
    assert evaluation_label({**crfrnn, "head": {"name": "none"}}, crfrnn, "x", overrides=[]) == "FCN-8s on CRF-RNN weights"
    assert evaluation_label({**densecrf, "label": "mine"}, trained, "FCN-8s", overrides=[]) == "mine"


def test_groups_are_one_per_configuration_and_shared_by_its_seeds():
    """The configurations wandb merged before: a baseline, its continuation with more epochs
    from a checkpoint, and its stride-4-skip control were all group fcn-none-synthetic."""
    none = [resolved("backbone=fcn", "trainer.max_epochs=8", f"seed={s}") for s in (0, 1)]
    continued = [resolved("backbone=fcn", "trainer.max_epochs=12", f"seed={s}", f"init_from=/out/fcn-none-s{s}")
                 for s in (0, 1)]
    fine_skip = [resolved("backbone=fcn", "trainer.max_epochs=8", "backbone.fine_skip=true", f"seed={s}") for s in (0, 1)]
    groups = [{config_group(c) for c in seeds} for seeds in (none, continued, fine_skip)]
    assert all(len(g) == 1 for g in groups)  # the seeds of a configuration share it
    assert len(set.union(*groups)) == 3  # no two configurations do
    assert all(g.startswith("fcn-none-synthetic-") for g in set.union(*groups))
    # What never changes a result never changes the group.
    moved = resolved("backbone=fcn", "trainer.max_epochs=8", "seed=0", "paths.data_dir=/elsewhere",
                     "paths.output_dir=/other/job", "logger=csv", 'label="the baseline"', "num_threads=1")
    assert config_group(moved) == config_group(none[0])


def test_study_labels_name_rows_in_words():
    from segrefine.study import study_plan

    plan = study_plan(experiment="paper_table", preset="smoke", seeds=[0, 1],
                      backbones={b: (f"backbone={b}",) for b in ("fcn", "unet", "pspnet")},
                      heads={b: ("crfrnn", "pointrend") for b in ("fcn", "unet", "pspnet")},
                      densecrf=("fcn", "unet", "pspnet"), finetune_epochs=4, fine_skip_controls=("fcn", "pspnet"))
    labels = {(j.kind, j.name): j.label for j in plan.jobs}
    assert labels[("train", "pspnet-crfrnn-s0")] == "PSPNet + CRF-RNN (fine-tuned +4 ep, tuned init)"
    assert labels[("train", "pspnet-none-continued-s1")] == "PSPNet, none +4 ep (CRF-RNN's baseline)"
    assert labels[("train", "fcn-none-fine_skip-s0")] == "FCN-8s + stride-4 skip (PointRend's control)"
    assert labels[("train", "unet-none-output_stride4-s0")] == "U-Net stopped at stride 4 (PointRend's baseline)"
    assert labels[("eval", "unet-densecrf_tuned-s0")] == "U-Net + DenseCRF (tuned on val)"
    for job in plan.jobs:
        if job.kind != "tune":
            assert 0 < len(job.label) <= 60 and f"s{job.seed}" not in job.label.split()
            assert not any(bad in job.label for bad in FORBIDDEN)
            twin = plan.get(job.kind, job.name.replace(f"-s{job.seed}", f"-s{1 - job.seed}"))
            assert twin.label == job.label  # a row's seeds carry the same label


def test_a_study_hands_each_job_its_label(tmp_path):
    from segrefine.study import Job, Plan, compose_eval, compose_train, runtime_overrides

    plan = Plan()
    none = plan.add(Job("fcn-none-s0", "train", ("backbone=fcn", "head=none"), 0, label="FCN-8s, none +4 ep (CRF-RNN's baseline)"))
    densecrf = plan.add(Job("fcn-densecrf-s0", "eval", ("head=densecrf",), 0, source=none.name,
                            pairs_with=none.name, label="FCN-8s + DenseCRF (defaults)"))
    assert compose_train(runtime_overrides(none, plan, tmp_path, lambda j: None)).label == none.label
    eval_cfg = compose_eval([f"ckpt_path={tmp_path}", *runtime_overrides(densecrf, plan, tmp_path, lambda j: None)])
    assert eval_cfg.label == densecrf.label
    with pytest.raises(LabelError, match="at most 60"):
        plan.add(Job("long-s0", "train", (), 0, label="z" * 61))


def test_command_line_overrides_equal_to_the_defaults_say_nothing():
    """Inside a Hydra job the label's words come from its overrides, less those that set a
    key to the value the job's group choices compose to anyway."""
    from hydra.core.hydra_config import HydraConfig

    from segrefine.labels import run_label

    overrides = ["backbone=fcn", "head=crfrnn", "backbone.encoder_weights=null", "optim.optimizer.lr=0.001", "trainer.max_epochs=7",
                 "head.iterations=5"]
    config, labelled = resolved(*overrides), resolved(*overrides, "label=mine")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        HydraConfig.instance().set_config(compose("train", overrides=overrides, return_hydra_config=True))
        try:
            assert run_label(config) == "FCN-8s + CRF-RNN, 7 epochs"
            assert run_label(labelled) == "mine"
        finally:
            HydraConfig.instance().cfg = None
