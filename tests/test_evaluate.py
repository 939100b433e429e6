"""Post-hoc evaluation: same weights under another head, paired per image; DenseCRF head."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONFIG_DIR
from segrefine.checkpoints import CheckpointError
from segrefine.evaluate import evaluate
from segrefine.heads.densecrf import DenseCRFHead
from segrefine.train import train
from segrefine.types import BackboneOutput


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir):
    """A small PSPNet trained for a few epochs with head=none (shared by the tests here);
    test IoU about 0.5, so the CRF has real predictions to refine."""
    out = tmp_path_factory.mktemp("trained")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            "backbone=pspnet", "data.image_size=64", "data.num_train=96", "data.num_val=8", "data.num_test=8",
            "data.batch_size=8", "trainer.max_epochs=5", "optim.optimizer.lr=3e-3", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            "logger=none", f"paths.data_dir={data_dir}", f"paths.output_dir={out}",
        ])
    train(cfg)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("evaldata")


def eval_cfg(run, out, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("eval", overrides=[
            f"ckpt_path={run}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "logger=none",
            f"paths.output_dir={out}", *overrides,
        ])


def test_eval_none_reproduces_training_metrics_and_densecrf_pairs(trained_run, tmp_path):
    trained = json.loads((trained_run / "results.json").read_text())
    again = evaluate(eval_cfg(trained_run, tmp_path / "none"))
    for key in ("test/iou", "test/dice", "test/pixel_acc", "test/boundary_f1"):
        assert again[key] == pytest.approx(trained["metrics"][key], abs=1e-6)
    crf = evaluate(eval_cfg(trained_run, tmp_path / "crf", "head=densecrf", "head.num_workers=1"))
    saved = json.loads((tmp_path / "crf" / "results.json").read_text())
    assert saved["job_type"] == "eval" and saved["head"] == "densecrf" and saved["source"]["head"] == "none"
    assert [r["id"] for r in saved["per_image"]] == [r["id"] for r in trained["per_image"]]
    assert again["test/iou"] > 0.3  # a model worth refining
    # The CRF must not make this model worse beyond noise (fixed seed, 8 test images).
    assert crf["test/iou"] >= again["test/iou"] - 0.01
    assert crf["test/boundary_f1"] >= again["test/boundary_f1"] - 0.01


def test_eval_on_validation_split_reports_val_metrics(trained_run, tmp_path):
    metrics = evaluate(eval_cfg(trained_run, tmp_path / "v", "split=val", "head=densecrf", "head.num_workers=1"))
    assert "val/iou" in metrics and "test/iou" not in metrics


def test_missing_and_foreign_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        evaluate(eval_cfg(tmp_path / "nope.ckpt", tmp_path / "o"))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a segrefine checkpoint"):
        evaluate(eval_cfg(foreign, tmp_path / "o"))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        evaluate(eval_cfg(garbage, tmp_path / "o"))
    assert not (tmp_path / "o" / "results.json").exists()


def _scene(channels: int, size=(33, 41), seed=0):
    """Blocky image with two regions and noisy, slightly wrong probabilities."""
    rng = np.random.default_rng(seed)
    h, w = size
    truth = np.zeros((h, w), np.int64)
    truth[8:25, 10:30] = 1
    image = np.where(truth[None] == 1, 180.0, 60.0).repeat(channels, 0) + rng.normal(0, 10, (channels, h, w))
    logits = np.stack([np.zeros((h, w)), 2.0 * truth - 1.0]) + rng.normal(0, 1.2, (2, h, w))
    probs = torch.from_numpy(logits).softmax(0).float()
    return probs, torch.from_numpy(image).float().clamp(0, 255), truth


@pytest.mark.parametrize("channels", [1, 3])
def test_densecrf_cleans_noisy_probabilities_on_gray_and_rgb(channels):
    probs, image, truth = _scene(channels)
    head = DenseCRFHead(num_classes=2, intensity_range=(0, 255), num_workers=1).eval()
    out = BackboneOutput(logits=probs.log()[None], features=[], feature_strides=(), stride=1)
    refined = head(out, image[None]).argmax(1)[0].numpy()
    before = (probs.argmax(0).numpy() == truth).mean()
    assert (refined == truth).mean() > before + 0.05


def test_densecrf_worker_count_does_not_change_results():
    scenes = [_scene(1, seed=s) for s in range(3)]
    probs = torch.stack([p for p, _, _ in scenes])
    image = torch.stack([i for _, i, _ in scenes])
    one = DenseCRFHead(num_classes=2, num_workers=1).refine(probs, image)
    two = DenseCRFHead(num_classes=2, num_workers=2).refine(probs, image)
    assert torch.equal(one, two)


def test_densecrf_head_matches_pydensecrf_densecrf2d_on_rgb():
    """Independent reference: the README way of calling pydensecrf on an RGB uint8 image."""
    import pydensecrf.densecrf as dcrf

    probs, image, _ = _scene(3)
    image = image.round()
    h, w = image.shape[-2:]
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(probs.numpy().reshape(2, -1))))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    rgb = np.ascontiguousarray(image.permute(1, 2, 0).numpy().astype(np.uint8))
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=rgb, compat=10)
    expected = np.array(crf.inference(3)).reshape(2, h, w)
    head = DenseCRFHead(num_classes=2, intensity_range=(0, 255), num_workers=1, iterations=3,
                        gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80, bilateral_schan=13, bilateral_compat=10)
    assert np.allclose(head.refine(probs[None], image[None])[0].numpy(), expected, atol=1e-5)


def test_densecrf_trains_exactly_like_none():
    logits = torch.randn(2, 3, 8, 8)
    out = BackboneOutput(logits=logits, features=[], feature_strides=(), stride=4)
    image = torch.rand(2, 1, 32, 32)
    from segrefine.heads.none import NoHead

    assert torch.equal(DenseCRFHead(3).train()(out, image), NoHead(3)(out, image))


@pytest.mark.slow  # ~11 s: Hydra's Optuna sweeper end to end (the tuning itself is tested in-process in test_tuning)
def test_optuna_sweep_saves_a_usable_tuned_head(trained_run, data_dir, tmp_path):
    import subprocess
    import sys

    from omegaconf import OmegaConf

    from conftest import REPO, subprocess_env

    sweep, tuned = tmp_path / "sweep", tmp_path / "conf" / "head" / "densecrf_tuned.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "segrefine.evaluate", "--config-dir", str(REPO / "experiments" / "tune_densecrf"),
         "--config-name", "tune_densecrf", "-m", f"ckpt_path={trained_run}", "hydra.sweeper.n_trials=2",
         "logger=none", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "head.num_workers=1",
         f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}", f"hydra.callbacks.save_tuned_head.output={tuned}"],
        capture_output=True, text=True, timeout=600, env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(sweep.glob("*/results.json"))) == 2
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    saved = OmegaConf.load(tuned)
    assert saved.name == "densecrf_tuned" and saved.bilateral_sxy == best.best_params["head.bilateral_sxy"]
    assert "[tune] saved as" in proc.stdout
    # Usable as head=densecrf_tuned once its folder is on the config search path.
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=["ckpt_path=x", "head=densecrf_tuned", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"])
    assert cfg.head.gaussian_compat == best.best_params["head.gaussian_compat"]


@pytest.mark.parametrize("channels", [1, 3])
def test_densecrf_backends_agree(channels):
    probs, image, _ = _scene(channels, seed=channels)
    heads = {b: DenseCRFHead(num_classes=2, backend=b, num_workers=1, **{
        "gaussian_sxy": 1.0, "gaussian_compat": 3.0, "bilateral_sxy": 5.0, "bilateral_schan": 13.0,
        "bilateral_compat": 3.0}) for b in ("pydensecrf", "torch")}
    reference, ours = (heads[b].refine(probs[None], image[None])[0] for b in ("pydensecrf", "torch"))
    diff = (reference - ours).abs()
    assert torch.quantile(diff.flatten(), 0.999) <= 1e-4 and diff.max() <= 2e-2
    assert (reference.argmax(0) == ours.argmax(0)).float().mean() >= 0.9999
