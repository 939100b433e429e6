"""Run-only keys and path placeholders: what makes two run configs 'the same run'."""

from segrefine.runconfig import curated_config, comparable_config, config_differences


def _config(root: str, lr: float = 1e-3, **top) -> dict:
    return {
        "seed": 0,
        "name": "study",
        "force": False,
        "paths": {"root_dir": root, "data_dir": f"{root}/data", "output_dir": f"{root}/outputs/job"},
        "data": {"name": "synthetic", "root": f"{root}/data/synthetic", "image_size": 32},
        "optim": {"optimizer": {"lr": lr}},
        "trainer": {"max_epochs": 2, "enable_progress_bar": True},
        "callbacks": {"model_checkpoint": {"dirpath": f"{root}/outputs/job/checkpoints", "monitor": "val/iou"}},
        "logger": {"mode": "offline"},
        **top,
    }


def test_moved_study_compares_equal():
    a = comparable_config(_config("/home/a/study"))
    b = comparable_config(_config("/mnt/copy/elsewhere"))
    assert a == b
    assert a["data"]["root"] == "<paths.data_dir>/synthetic"
    assert "paths" not in a and "logger" not in a and "name" not in a
    assert a["callbacks"]["model_checkpoint"] == {"monitor": "val/iou"}


def test_run_only_keys_do_not_count_but_settings_do():
    base = _config("/r")
    quiet = _config("/r", force=True, print_config=True, num_threads=1)
    quiet["trainer"]["enable_progress_bar"] = False
    quiet["trainer"]["accelerator"] = "auto"  # e.g. an evaluation on whatever device is there
    assert config_differences(comparable_config(base), comparable_config(quiet)) == []
    other = _config("/r", lr=0.05, seed=5)
    assert config_differences(comparable_config(base), comparable_config(other)) == ["optim.optimizer.lr", "seed"]
    assert config_differences(comparable_config(base), comparable_config(other, drop=("seed",)), ) == [
        "optim.optimizer.lr", "seed"]
    assert config_differences(comparable_config(base, drop=("seed",)), comparable_config(other, drop=("seed",))) == [
        "optim.optimizer.lr"]


def test_a_data_root_outside_the_run_paths_is_part_of_the_config():
    a, b = _config("/r"), _config("/r")
    b["data"]["root"] = "/datasets/Task04_Hippocampus"
    assert config_differences(comparable_config(a), comparable_config(b)) == ["data.root"]


def test_tuned_head_parameters_are_outcomes_not_settings():
    def tuned(sxy: float, split: str = "val") -> dict:
        head = {"name": "densecrf", "bilateral_sxy": sxy, "iterations": 5,
                "tuned": {"split": split, "trials": 12, "keys": ["bilateral_sxy"]}}
        return _config("/r", head=head)

    assert config_differences(comparable_config(tuned(5.0)), comparable_config(tuned(40.0))) == []
    assert comparable_config(tuned(5.0))["head"]["bilateral_sxy"] == "<tuned>"
    assert config_differences(comparable_config(tuned(5.0)), comparable_config(tuned(5.0, split="test"))) == [
        "head.tuned.split"]
    untuned = _config("/r", head={"name": "densecrf", "bilateral_sxy": 5.0, "iterations": 5})
    assert comparable_config(untuned)["head"]["bilateral_sxy"] == 5.0


def test_init_from_is_per_seed_so_rows_across_seeds_ignore_its_path():
    a = _config("/r", seed=0, init_from="/r/outputs/study/train/unet-none-s0")
    b = _config("/r", seed=1, init_from="/r/outputs/study/train/unet-none-s1")
    scratch = _config("/r", seed=1, init_from=None)
    # A resume check (same seed, nothing dropped) still tells the two sources apart ...
    assert config_differences(comparable_config(a), comparable_config(b)) == ["init_from", "seed"]
    # ... a row across seeds does not, but still separates fine-tuned from scratch runs.
    assert config_differences(comparable_config(a, drop=("seed",)), comparable_config(b, drop=("seed",))) == []
    assert config_differences(comparable_config(a, drop=("seed",)), comparable_config(scratch, drop=("seed",))) == [
        "init_from"]


def test_curated_config_shows_no_machine_path_even_where_a_study_made_it_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {"paths": {"root_dir": ".", "log_dir": "./outputs", "data_dir": "./data", "output_dir": "outputs/s/train/b"},
              "init_from": str(tmp_path / "outputs" / "s" / "train" / "a"), "data": {"root": "./data/synthetic"},
              "seed": 3, "name": "s"}
    assert curated_config(config) == {"init_from": "<paths.log_dir>/s/train/a", "data": {"root": "<paths.data_dir>/synthetic"},
                                      "seed": 3}


def _densecrf(workers, declared: bool = True, target: str = "segrefine.heads.densecrf.DenseCRFHead") -> dict:
    head = {"_target_": target, "name": "densecrf", "iterations": 5, "num_workers": workers}
    if declared:
        head["run_only"] = ["num_workers"]
    return _config("/r", head=head)


def test_keys_a_component_declares_run_only_do_not_count_nor_does_the_declaration():
    two, eight = comparable_config(_densecrf(2)), comparable_config(_densecrf(8))
    assert config_differences(two, eight) == []
    assert two["head"] == {"_target_": "segrefine.heads.densecrf.DenseCRFHead", "name": "densecrf", "iterations": 5}
    assert "run_only" not in curated_config(_densecrf(2))["head"]
    # ... while its other keys still do
    other = _densecrf(2)
    other["head"]["iterations"] = 10
    assert config_differences(two, comparable_config(other)) == ["head.iterations"]


def test_results_written_before_heads_declared_their_keys_compare_equal_to_new_ones():
    old = comparable_config(_densecrf(1, declared=False))
    assert config_differences(old, comparable_config(_densecrf(None))) == []
    # Another component's undeclared key is a setting: only the DenseCRF head had one then.
    mine = "my_lab.heads.MyHead"
    assert config_differences(comparable_config(_densecrf(1, declared=False, target=mine)),
                              comparable_config(_densecrf(4, declared=False, target=mine))) == ["head.num_workers"]


def test_a_declaration_that_is_not_a_list_of_keys_is_refused_naming_it():
    import pytest

    bad = _densecrf(2)
    bad["head"]["run_only"] = "num_workers"
    with pytest.raises(ValueError, match=r"head\.run_only='num_workers' must be a list"):
        comparable_config(bad)
