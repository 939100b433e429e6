"""Volumes as the unit of volumetric data (msd): slices know subject, index and spacing; test
and validation subjects are restacked and scored per volume; the 3-D CRF head runs on them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from segrefine.data.common import evaluation_loader
from segrefine.heads.densecrf import DenseCRFHead
from segrefine.heads.none import NoHead
from segrefine.metrics import volume_metrics
from segrefine.module import SegmentationModule
from test_datasets import LabelBackbone, msd, write_msd_task

pytestmark = pytest.mark.usefixtures("single_thread")

# write_msd_task's affine: 1.5 x 2.0 x 2.5 mm along R, A, S, stored in I, L, P order.
SPACING_AXIAL = [2.5, 1.5, 2.0]  # slices along S; rows along R, columns along A


def corrupted(image, labels):
    """The 'prediction' LabelBackbone reads off the image: the labels with errors that depend on
    the slice position (class 2 pushed one voxel along S, a stray class-1 block in a high slice)."""
    pred = labels.astype(np.float32).copy()
    two = labels == 2
    pred[two] = 0
    pred[np.roll(two, 1, axis=2)] = 2
    pred[3:6, 3:6, -5] = 1
    return pred


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("vol") / "T"
    truth = write_msd_task(root, n=4, shapes=[(35, 51, 35), (33, 47, 30), (36, 50, 35), (31, 49, 28)],
                           image_fn=corrupted)
    return root, truth


def test_slices_know_subject_index_and_spacing_from_the_header(task, tmp_path):
    root, _ = task
    dm = msd(root, tmp_path, normalise="none", clip_percentiles=None, split_fractions=[0.5, 0.25, 0.25])
    item = dm.datasets["test"][0]
    subject, index = item["id"].rsplit("_z", 1)
    assert item["subject"] == subject and item["slice"] == int(index)
    assert item["spacing"].tolist() == SPACING_AXIAL
    sagittal = msd(root, tmp_path / "x", axis=0, split_fractions=[0.5, 0.25, 0.25])
    assert sagittal.datasets["val"][0]["spacing"].tolist() == [1.5, 2.0, 2.5]
    # An entry cached before spacing was recorded gets it from the header, once.
    entry_file = next((tmp_path / "cache").glob("T-*/hippocampus_*.json"))
    entry = json.loads(entry_file.read_text())
    del entry["spacing"]
    entry_file.write_text(json.dumps(entry))
    again = msd(root, tmp_path, normalise="none", clip_percentiles=None, split_fractions=[0.5, 0.25, 0.25])
    assert json.loads(entry_file.read_text())["spacing"] == SPACING_AXIAL
    assert again.volume_datasets["test"][0]["spacing"] == tuple(SPACING_AXIAL)


def test_volumes_restack_every_slice_in_order_without_padding(task, tmp_path):
    root, truth = task
    dm = msd(root, tmp_path, normalise="none", clip_percentiles=None, empty_slice_fraction=0.0,
             split_fractions=[0.5, 0.25, 0.25], pad_to=[40, 52])
    for split in ("val", "test"):
        batches = list(evaluation_loader(dm, split))
        assert [b["subject"] for b in batches] == dm.splits[split]
        for batch in batches:
            image, labels = truth[batch["subject"]]
            expected = np.moveaxis(labels, 2, 0)  # axial slices, in order
            h, w = batch["height"], batch["width"]
            assert (h, w) == expected.shape[1:] and batch["mask"].shape[1:] == (40, 52)
            assert np.array_equal(batch["mask"][:, :h, :w].numpy(), expected)
            assert (batch["mask"][:, h:, :] == 255).all() and (batch["mask"][:, :, w:] == 255).all()
            assert batch["id"] == [f"{batch['subject']}_z{s:03d}" for s in range(len(expected))]
            scored = [i for i, keep in zip(batch["id"], batch["scored"].tolist()) if keep]
            assert scored == [i for i in dm.datasets[split].ids if i.startswith(batch["subject"] + "_")]
            assert 0 < len(scored) < len(expected)  # empty slices are left out of the slice rows only


def test_per_volume_rows_score_the_restacked_volume_with_its_spacing(task, tmp_path):
    root, truth = task
    dm = msd(root, tmp_path, normalise="none", clip_percentiles=None, empty_slice_fraction=0.0,
             split_fractions=[0.5, 0.25, 0.25], batch_size=7)
    module = SegmentationModule(LabelBackbone(3), NoHead(3), num_classes=3, class_names=dm.class_names,
                                nsd_tolerance_mm=2.0)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, dataloaders=evaluation_loader(dm, "test"), verbose=False)
    (row,) = module.volume_rows
    image, labels = truth[row["subject"]]
    expected = volume_metrics(np.moveaxis(image, 2, 0).astype(np.uint8), np.moveaxis(labels, 2, 0), SPACING_AXIAL,
                              3, nsd_tolerance_mm=2.0)
    assert row["n_slices"] == labels.shape[2] and row["spacing"] == SPACING_AXIAL
    for name in ("dice", "iou", "nsd", "hd95"):
        assert row[f"{name}/Anterior"] == pytest.approx(expected[name][0])
        assert row[f"{name}/Posterior"] == pytest.approx(expected[name][1])
        assert row[name] == pytest.approx(expected[name].mean())
        assert module.test_results[f"test/volume/{name}"] == pytest.approx(row[name])  # one test subject
    assert 0 < row["nsd/Posterior"] < 1 and row["hd95/Posterior"] == pytest.approx(2.5)  # one slice, 2.5 mm
    # Slice rows: only the split's slices, each with its subject.
    assert {r["subject"] for r in module.test_rows} == {row["subject"]}
    assert [r["id"] for r in module.test_rows] == dm.datasets["test"].ids
    # A data.pad_to smaller than the slices: the volume is still scored whole, and the kept
    # predictions are the slice loader's centre crops (so they stack).
    cropped = msd(root, tmp_path / "crop", normalise="none", clip_percentiles=None, empty_slice_fraction=0.0,
                  split_fractions=[0.5, 0.25, 0.25], batch_size=7, pad_to=[30, 40])
    module = SegmentationModule(LabelBackbone(3), NoHead(3), num_classes=3, class_names=dm.class_names,
                                nsd_tolerance_mm=2.0, save_predictions=1000)
    trainer.test(module, dataloaders=evaluation_loader(cropped, "test"), verbose=False)
    assert module.volume_rows[0]["hd95"] == pytest.approx(row["hd95"])
    arrays = module.prediction_arrays()
    assert arrays["predictions"].shape[1:] == (30, 40) and len(arrays["ids"]) == len(cropped.datasets["test"])
    first = cropped.datasets["test"][0]
    at = list(arrays["ids"]).index(first["id"])
    assert np.array_equal(arrays["masks"][at], first["mask"].numpy())
    assert np.array_equal(arrays["predictions"][at], first["image"][0].round().numpy())  # LabelBackbone's reading


@pytest.mark.parametrize("backend", ["torch", "pydensecrf"])
def test_volume_crf_head_refines_the_whole_volume(task, tmp_path, backend):
    root, truth = task
    dm = msd(root, tmp_path, normalise="none", clip_percentiles=None, empty_slice_fraction=0.0,
             split_fractions=[0.5, 0.25, 0.25], batch_size=16)
    batch = dm.volume_datasets["test"][0]
    kernels = dict(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=6.0, bilateral_schan=20.0, bilateral_compat=5.0)
    head = DenseCRFHead(3, backend=backend, volume=True, num_workers=1, **kernels).eval()
    module = SegmentationModule(LabelBackbone(3), head, num_classes=3, class_names=dm.class_names).eval()
    with torch.no_grad():
        refined = module.volume_logits(batch).exp()
        plain = SegmentationModule(LabelBackbone(3), NoHead(3), 3, dm.class_names).eval().volume_logits(batch).softmax(1)
    h, w = batch["height"], batch["width"]
    from segrefine.crf import CRFKernels, dense_crf

    image = batch["image"][:, :, :h, :w].movedim(0, 1)[None]
    image255 = (image - image.min()) / (image.max() - image.min()) * 255
    expected = dense_crf(plain[:, :, :h, :w].movedim(0, 1)[None], image255, kernels=CRFKernels(**kernels),
                         spacing=tuple(SPACING_AXIAL))[0].movedim(0, 1)
    assert (refined[:, :, :h, :w] - expected).abs().max() < 1e-3
    assert (refined - plain).abs().max() > 0.05  # the CRF acted
    with pytest.raises(RuntimeError, match="post-hoc only"):
        module(batch["image"][:2])  # slice by slice it refuses: it needs the whole volume


TRAIN = ["backbone=pspnet", "data.batch_size=8", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
         "data.split_fractions=[0.5,0.25,0.25]", "data.empty_slice_fraction=0"]


@pytest.fixture(scope="module")
def msd_run(task, tmp_path_factory):
    """A head=none run on the fixture task (one test subject, one validation subject)."""
    from hydra import compose, initialize_config_dir

    from conftest import CONFIG_DIR, TINY
    from segrefine.train import train

    root, _ = task
    run = tmp_path_factory.mktemp("msd_run")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*(o for o in TINY if not o.startswith("data.")), "data=msd",
                                          f"data.root={root}", f"paths.data_dir={tmp_path_factory.mktemp('d')}",
                                          f"paths.output_dir={run}", *TRAIN])
    train(cfg)
    return run


def test_train_and_volume_crf_evaluation_write_per_volume_results(task, msd_run, make_cfg, tmp_path):
    from test_evaluate import eval_cfg

    from segrefine.evaluate import evaluate
    from segrefine.train import train

    root, truth = task
    with pytest.raises(ValueError, match="post-hoc only"):
        train(make_cfg("data=msd", f"data.root={root}", "head=densecrf", "head.volume=true", *TRAIN,
                       output_dir=tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    run = msd_run
    saved = json.loads((run / "results.json").read_text())
    (row,) = saved["per_volume"]
    subject = row["subject"]
    assert row["n_slices"] == truth[subject][1].shape[2] and row["spacing"] == SPACING_AXIAL
    assert set(row) >= {"dice", "iou", "nsd", "hd95", "dice/Anterior", "hd95/Posterior"}
    assert {r["subject"] for r in saved["per_image"]} == {subject}
    for name in ("dice", "iou", "nsd", "hd95"):
        assert f"test/volume/{name}" in saved["metrics"]
    assert "volume" in saved["metric_definitions"] and saved["metric_definitions"]["nsd_tolerance_mm"] == 1.0

    out = tmp_path / "crf3d"
    metrics = evaluate(eval_cfg(run, out, "head=densecrf", "head.volume=true", "head.backend=torch",
                                "logger=wandb", "split=val"))
    crf = json.loads((out / "results.json").read_text())
    val_subjects = sorted({r["subject"] for r in crf["per_image"]})
    assert [r["subject"] for r in crf["per_volume"]] == val_subjects
    dice = [r["dice"] for r in crf["per_volume"] if r["dice"] is not None]
    assert metrics["val/volume/dice"] == pytest.approx(float(np.mean(dice)))
    assert crf["config"]["head"]["volume"] is True and list(out.glob("wandb/offline-run-*"))
    for r in [*crf["per_volume"], row]:  # null + a Dice: infinite, and named so
        for c in ("Anterior", "Posterior"):
            assert (r[f"hd95/{c}"] is None and r[f"dice/{c}"] is not None) == (f"hd95/{c}" in r["infinite"])
    with pytest.raises(ValueError, match="not a volumetric source"):  # 2-D data: refused before any output
        evaluate(eval_cfg(run, tmp_path / "o", "data=synthetic", "data.num_train=2", "data.num_val=2",
                          "data.num_test=2", "head=densecrf", "head.volume=true"))
    assert not (tmp_path / "o").exists()


def test_volume_crf_is_tuned_on_validation_subjects_as_eval_scores_it(msd_run, tmp_path):
    from test_evaluate import eval_cfg

    from segrefine.evaluate import evaluate
    from segrefine.tuning import TUNED_FILE, tune_densecrf, tuned_overrides

    summary = tune_densecrf(msd_run, tmp_path / "tune", trials=3, overrides=["head.volume=true", "head.backend=torch"])
    assert summary["volume"] is True and summary["best_value"] >= summary["none_value"]
    # The subject is the unit: the objective is the mean volume Dice over the validation
    # subjects, the report's first column for volumetric runs, as segrefine-eval scores it.
    assert summary["metric"] == "val/volume/dice"
    none = evaluate(eval_cfg(msd_run, tmp_path / "none", "split=val"))
    assert summary["none_value"] == pytest.approx(none["val/volume/dice"])
    assert summary["none_value"] != pytest.approx(none["val/iou_image"])  # not the slice mean it used to be
    tuned = evaluate(eval_cfg(msd_run, tmp_path / "tuned", "split=val", "head=densecrf", "head.backend=torch",
                              *tuned_overrides(tmp_path / "tune" / TUNED_FILE)))
    assert tuned["val/volume/dice"] == pytest.approx(summary["best_value"], abs=1e-6)
    saved = json.loads((tmp_path / "tuned" / "results.json").read_text())
    assert saved["config"]["head"]["volume"] is True and saved["per_volume"]
    assert summary["best_value"] == pytest.approx(np.mean([r["dice"] for r in saved["per_volume"] if r["dice"] is not None]), abs=1e-6)


def test_the_2d_crf_on_volumetric_data_is_tuned_on_subjects_too(msd_run, tmp_path):
    from test_evaluate import eval_cfg

    from segrefine.evaluate import evaluate
    from segrefine.tuning import TUNED_FILE, tune_densecrf, tuned_overrides

    summary = tune_densecrf(msd_run, tmp_path / "tune", trials=3, overrides=["head.backend=torch"])
    assert summary["volume"] is False and summary["metric"] == "val/volume/dice"
    none = evaluate(eval_cfg(msd_run, tmp_path / "none", "split=val"))
    assert summary["none_value"] == pytest.approx(none["val/volume/dice"])
    tuned = evaluate(eval_cfg(msd_run, tmp_path / "tuned", "split=val", "head=densecrf", "head.backend=torch",
                              *tuned_overrides(tmp_path / "tune" / TUNED_FILE)))
    assert tuned["val/volume/dice"] == pytest.approx(summary["best_value"], abs=1e-6)