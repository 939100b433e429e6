"""Job folder names of sweeps: stable, free of run-only keys and paths, reusable as overrides."""

from __future__ import annotations

from hydra.core.override_parser.overrides_parser import OverridesParser

from segrefine.runs import job_folder


def test_job_folder_names_keep_what_changes_the_computation_only():
    name = job_folder(["seed=1", "backbone=fcn", "head=crfrnn", "paths.data_dir=/data/x", "logger.mode=online",
                       "hydra/launcher=joblib", "resume=false", "trainer.accelerator=cpu", "data.root=/mnt/msd/Task04"])
    parts = name.split("+")
    assert parts[:2] == ["backbone-fcn", "data.root-" + __import__("hashlib").sha1(b"/mnt/msd/Task04").hexdigest()[:8]]
    assert parts[2:] == ["head-crfrnn", "seed-1"]
    # order of the overrides on the command line does not matter
    assert job_folder(["head=crfrnn", "seed=1", "data.root=/mnt/msd/Task04", "backbone=fcn"]) == name


def test_a_job_folder_can_be_handed_back_as_an_unquoted_override():
    name = job_folder(["backbone=fcn", "head.bilateral_sxy=5.0", "optim.optimizer.lr=1e-3", "+extra=x y", "seed=0"])
    assert "=" not in name and "," not in name and "/" not in name and " " not in name
    parsed = OverridesParser.create().parse_overrides([f"ckpt_path=outputs/default/multirun/{name}"])
    assert parsed[0].value() == f"outputs/default/multirun/{name}"


def test_overlong_names_keep_both_ends_and_stay_distinct():
    long_a = job_folder([f"data.k{i}=v" for i in range(60)] + ["seed=0"])
    long_b = job_folder([f"data.k{i}=v" for i in range(60)] + ["seed=1"])
    assert len(long_a) == 200 and long_a != long_b and long_a.startswith("data.k0-v") and long_b.endswith("seed-1")


def test_no_overrides_is_default():
    assert job_folder([]) == job_folder(["logger=none", "paths.log_dir=/tmp/x"]) == "default"


def test_a_key_the_head_declares_run_only_names_no_folder_of_a_composed_sweep():
    """As Hydra resolves ``hydra.sweep.subdir``: the resolver sees the job's config beside
    ``hydra``, so conf/head/densecrf.yaml's ``run_only: [num_workers]`` keeps its key out."""
    from omegaconf import OmegaConf

    from segrefine.study.plan import compose_train

    cfg = compose_train(["head=densecrf"])
    overrides = ["head=densecrf", "head.num_workers=3", "head.iterations=7", "seed=1"]
    root = OmegaConf.create({"hydra": {"overrides": {"task": overrides}},
                             "head": OmegaConf.to_container(cfg.head),
                             "subdir": "${job_folder:${hydra.overrides.task}}"})
    assert root.subdir == "head.iterations-7+head-densecrf+seed-1"
    # Without the config (a caller that has only the overrides) the key is not known to be run-only.
    assert "head.num_workers-3" in job_folder(overrides)
