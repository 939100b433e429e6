"""The DeepLab protocol for the offline CRF: parameters chosen on the validation split."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONFIG_DIR
from segrefine.crf import PYDENSECRF_KERNELS, CRFKernels
from segrefine.evaluate import evaluate
from segrefine.runconfig import comparable_config, config_differences
from segrefine.tuning import ENQUEUED, NO_CRF, SEARCH_SPACE, TUNED_FILE, tune_densecrf, tuned_overrides
from test_evaluate import trained_run  # noqa: F401  (module fixture: a small trained head=none PSPNet)


def eval_cfg(run, out, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("eval", overrides=[f"ckpt_path={run}", "logger=none", "trainer.enable_progress_bar=false",
                                          f"paths.output_dir={out}", *overrides])


def test_search_space_holds_a_crf_too_weak_to_matter_and_the_enqueued_points():
    assert SEARCH_SPACE.keys() == CRFKernels().as_dict().keys()  # the head's kernel keys
    assert ENQUEUED["pydensecrf"] == PYDENSECRF_KERNELS.as_dict() and ENQUEUED["segrefine"] == CRFKernels().as_dict()
    for name, point in ENQUEUED.items():
        assert point.keys() == SEARCH_SPACE.keys()
        assert all(SEARCH_SPACE[k][0] <= v <= SEARCH_SPACE[k][1] for k, v in point.items()), name
    assert SEARCH_SPACE["gaussian_compat"][0] <= 1e-3 and SEARCH_SPACE["bilateral_compat"][0] <= 1e-3


@pytest.fixture(scope="module")
def tuned(trained_run, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("tuned")
    return out, tune_densecrf(trained_run, out, trials=4, overrides=["head.num_workers=1"])


def test_tuned_crf_is_never_worse_than_no_crf_on_validation(trained_run, tuned, tmp_path):  # noqa: F811
    out, summary = tuned
    # The objective is what the report's Δ is on: the none run's per-image mean IoU on the
    # validation split, computed independently by segrefine-eval.
    assert summary["metric"] == "val/iou_image"
    none = evaluate(eval_cfg(trained_run, tmp_path / "none", "split=val"))
    assert summary["none_value"] == pytest.approx(none["val/iou_image"], abs=1e-9)
    assert summary["best_value"] >= none["val/iou_image"]
    # The enqueued points were tried first, in order.
    assert [t["params"] for t in summary["trials"][:3]] == list(ENQUEUED.values())
    # Zero pairwise weights, the choice when no trial beats no CRF, change no prediction.
    zero = evaluate(eval_cfg(trained_run, tmp_path / "zero", "split=val", "head=densecrf", "head.num_workers=1",
                             *(f"head.{k}={v}" for k, v in NO_CRF.items())))
    assert zero["val/iou_image"] == none["val/iou_image"]
    if summary["no_crf_chosen"]:
        assert summary["best_params"] == NO_CRF and summary["best_value"] == none["val/iou_image"]
        assert summary["outcome"] == "no_crf"
    else:
        assert summary["best_value"] > none["val/iou_image"]
        expected = next((name for name, point in ENQUEUED.items() if point == summary["best_params"]), "new")
        assert summary["outcome"] == expected
    # Each trial's value is what segrefine-eval reports for those parameters (first enqueued point).
    pydensecrf = evaluate(eval_cfg(trained_run, tmp_path / "p", "split=val", "head=densecrf", "head.num_workers=1",
                                   *(f"head.{k}={v}" for k, v in ENQUEUED["pydensecrf"].items())))
    assert summary["trials"][0]["value"] == pytest.approx(pydensecrf["val/iou_image"], abs=1e-9)


def test_tuned_head_evaluates_on_test_and_records_its_parameters(trained_run, tuned, tmp_path):  # noqa: F811
    out, summary = tuned
    saved = OmegaConf.load(out / TUNED_FILE)
    assert saved.tuned.split == "val" and saved.tuned.trials == 4 and list(saved.tuned["keys"]) == sorted(SEARCH_SPACE)
    overrides = ["head=densecrf", *tuned_overrides(out / TUNED_FILE, name="densecrf_tuned")]
    evaluate(eval_cfg(trained_run, tmp_path / "test", *overrides, "head.num_workers=1"))
    result = json.loads((tmp_path / "test" / "results.json").read_text())
    head = result["config"]["head"]
    assert head["name"] == "densecrf_tuned" and head["tuned"]["split"] == "val"
    assert {k: head[k] for k in SEARCH_SPACE} == pytest.approx(summary["best_params"], rel=1e-12)
    # Another seed's tuning (other values, same protocol) is the same configuration.
    other = {**head, **{k: 1.0 for k in SEARCH_SPACE}}
    assert config_differences(comparable_config({"head": head}), comparable_config({"head": other})) == []


def test_tuning_needs_room_for_the_enqueued_points(tmp_path):
    with pytest.raises(ValueError, match="at least 3"):
        tune_densecrf(tmp_path, tmp_path, trials=2)


def test_when_no_trial_beats_no_crf_the_tuned_crf_is_the_identity(trained_run, tmp_path, monkeypatch):  # noqa: F811
    import segrefine.tuning as tuning

    real = tuning._val_objective

    def every_crf_hurts(head, cache, num_classes, protocol, merge=False):
        value = real(head, cache, num_classes, protocol, merge)
        crf_on = head is not None and (head.kernels.gaussian_compat or head.kernels.bilateral_compat)
        return value - 0.5 if crf_on else value

    monkeypatch.setattr(tuning, "_val_objective", every_crf_hurts)
    # Two workers: the identity is re-scored with the worker pool the trials used (it was shut down too early once).
    summary = tune_densecrf(trained_run, tmp_path, trials=3, overrides=["head.num_workers=2"])
    assert summary["no_crf_chosen"] and summary["best_params"] == NO_CRF and summary["outcome"] == "no_crf"
    assert summary["best_value"] == summary["none_value"]
    saved = OmegaConf.load(tmp_path / TUNED_FILE)
    assert saved.gaussian_compat == 0.0 and saved.bilateral_compat == 0.0 and "no trial beat no CRF" in (
        tmp_path / TUNED_FILE).read_text()


def test_under_the_origin_protocol_the_tuning_maximises_its_per_image_iu(trained_run, tmp_path):  # noqa: F811
    summary = tune_densecrf(trained_run, tmp_path / "t", trials=3, overrides=["head.num_workers=1", "metrics=unet_crfrnn"])
    assert summary["metric"] == "val/unet_crfrnn/iu"
    none = evaluate(eval_cfg(trained_run, tmp_path / "none", "split=val", "metrics=unet_crfrnn"))
    assert summary["none_value"] == pytest.approx(none["val/unet_crfrnn/iu"], abs=1e-9)
    segrefine = evaluate(eval_cfg(trained_run, tmp_path / "s", "split=val", "head=densecrf", "head.num_workers=1",
                                  "metrics=unet_crfrnn", *(f"head.{k}={v}" for k, v in ENQUEUED["segrefine"].items())))
    assert summary["trials"][1]["value"] == pytest.approx(segrefine["val/unet_crfrnn/iu"], abs=1e-9)
