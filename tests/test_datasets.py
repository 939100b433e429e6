"""Real-dataset sources (MSD NIfTI, image folders, Pascal VOC) and augmentation.

Every fixture is written here, tiny, in the exact on-disk format of its source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch import nn

from segrefine.data import msd as msd_module
from segrefine.data.common import ArraySegmentationDataset, DataError
from segrefine.data.folder import FolderDataModule
from segrefine.data.msd import MSDDataModule, split_subjects
from segrefine.data.transforms import Augment, build_augment, fit_to
from segrefine.data.voc import VOC_CLASSES, VOCDataModule
from segrefine.heads.none import NoHead
from segrefine.module import SegmentationModule
from segrefine.train import train
from segrefine.types import IGNORE_INDEX, BackboneOutput

# Tiny tensors and tiny training runs: one intra-op thread (more only adds synchronisation latency).
pytestmark = pytest.mark.usefixtures("single_thread")

LABELS = {"0": "background", "1": "Anterior", "2": "Posterior"}


# -- fixture writers ----------------------------------------------------------------


def ras_case(shape, seed):
    """A RAS-ordered volume and its 3-class label: a box of class 1 next to a box of class 2."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    x, y, z = shape
    labels[x // 4 : x // 2, y // 4 : 3 * y // 4, z // 3 : 2 * z // 3] = 1
    labels[x // 2 : 3 * x // 4, y // 4 : 3 * y // 4, z // 3 : 2 * z // 3] = 2
    image = (labels * 100.0 + rng.normal(50, 5, shape)).astype(np.float32)
    return image, labels


def reoriented(array, affine, axcodes=("I", "L", "P")):
    """The same physical image stored with another voxel order (non-trivial affine)."""
    img = nib.Nifti1Image(array, affine)
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(axcodes))
    return img.as_reoriented(ornt)


def write_msd_task(root: Path, n=6, shapes=None, modalities=1, image_fn=None, axcodes=("I", "L", "P"), listed=True):
    """An MSD task folder; returns ``{subject: (ras_image, ras_labels)}`` as it should read back."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.array([[1.5, 0, 0, -20.0], [0, 2.0, 0, 7.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]])
    truth, training = {}, []
    for i in range(n):
        subject = f"hippocampus_{i:03d}"
        shape = shapes[i] if shapes else (35, 51, 35)
        image, labels = ras_case(shape, i)
        if image_fn is not None:
            image = image_fn(image, labels)
        if modalities > 1:
            image = np.stack([image * (m + 1) for m in range(modalities)], axis=-1)
        reoriented(image, affine, axcodes).to_filename(root / "imagesTr" / f"{subject}.nii.gz")
        reoriented(labels, affine, axcodes).to_filename(root / "labelsTr" / f"{subject}.nii.gz")
        truth[subject] = (image, labels)
        training.append({"image": f"./imagesTr/{subject}.nii.gz", "label": f"./labelsTr/{subject}.nii.gz"})
    meta = {"name": "Hippocampus", "labels": LABELS, "modality": {str(m): f"MRI{m}" for m in range(modalities)},
            "numTraining": n}
    if listed:
        meta["training"] = training
    (root / "dataset.json").write_text(json.dumps(meta))
    return truth


@pytest.fixture(scope="module")
def task3(tmp_path_factory) -> Path:
    """A 3-subject task shared by the tests that only read it (each keeps its own cache)."""
    root = tmp_path_factory.mktemp("msd") / "T"
    write_msd_task(root, n=3)
    return root


def msd(root, tmp_path, **kwargs) -> MSDDataModule:
    dm = MSDDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def save_png(path: Path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def folder_tree(root: Path, sizes=((16, 20), (18, 15), (16, 20), (12, 22)), mask_value=255):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for i, (h, w) in enumerate(sizes):
            mask = np.zeros((h, w), np.uint8)
            mask[2:8, 3:10] = mask_value
            save_png(root / split / "img" / f"case{i}.png", rng.integers(0, 255, (h, w), dtype=np.uint8))
            save_png(root / split / "gt" / f"case{i}.png", mask)
    return root


def palette_png(path: Path, mask: np.ndarray) -> None:
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.astype(np.uint8).tobytes())
    palette = np.random.default_rng(1).integers(0, 255, 768).astype(np.uint8)
    img.putpalette(palette.tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def voc_tree(root: Path, n_train=6, n_val=3) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(0)
    lists = {"train": [f"2007_{i:06d}" for i in range(n_train)], "val": [f"2008_{i:06d}" for i in range(n_val)]}
    for split, ids in lists.items():
        for k, image_id in enumerate(ids):
            h, w = (40, 50) if k % 2 else (45, 37)
            image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            mask = np.zeros((h, w), np.uint8)
            mask[5:20, 5:25] = 1 + k % 20
            mask[5:20, 5] = 255  # object boundary, ignored
            save_png(base / "JPEGImages" / f"{image_id}.jpg", image)
            palette_png(base / "SegmentationClass" / f"{image_id}.png", mask)
        listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("\n".join(ids) + "\n")
    return root


# -- MSD ------------------------------------------------------------------------------


def test_msd_reads_canonical_slices_ids_and_class_names(tmp_path):
    truth = write_msd_task(tmp_path / "Task04", n=4)
    raw = nib.load(tmp_path / "Task04" / "imagesTr" / "hippocampus_000.nii.gz")
    assert raw.shape == (35, 35, 51) and nib.aff2axcodes(raw.affine) == ("I", "L", "P")  # stored non-canonically
    dm = msd(tmp_path / "Task04", tmp_path, normalise="none", clip_percentiles=None, empty_slice_fraction=1.0,
             split_fractions=[0.5, 0.25, 0.25])
    assert dm.class_names == ["background", "Anterior", "Posterior"] and dm.num_classes == 3 and dm.in_channels == 1
    ds = dm.datasets["test"]
    subject = dm.splits["test"][0]
    assert len(ds) == 35 and ds.ids[17] == f"{subject}_z017"
    item = ds[17]
    image, labels = truth[subject]
    assert item["image"].shape == (1, 35, 51) and item["mask"].dtype == torch.int64
    np.testing.assert_allclose(item["image"][0].numpy(), image[:, :, 17], rtol=1e-6)
    assert np.array_equal(item["mask"].numpy(), labels[:, :, 17])


def test_msd_axis_and_modality_of_multimodal_volumes(tmp_path):
    truth = write_msd_task(tmp_path / "T", n=3, modalities=2)
    dm = msd(tmp_path / "T", tmp_path, axis="sagittal", modality=1, normalise="none", clip_percentiles=None,
             empty_slice_fraction=1.0, split_fractions=[0.34, 0.33, 0.33])
    subject = dm.splits["val"][0]
    item = dm.datasets["val"][20]
    assert item["id"] == f"{subject}_x020" and item["image"].shape == (1, 51, 35)
    np.testing.assert_allclose(item["image"][0].numpy(), truth[subject][0][20, :, :, 1], rtol=1e-6)
    both = msd(tmp_path / "T", tmp_path, modality=[0, 1], split_fractions=[0.34, 0.33, 0.33])
    assert both.in_channels == 2 and both.datasets["train"][0]["image"].shape[0] == 2
    with pytest.raises(DataError, match=r"hippocampus_000\.nii\.gz: has 2 modalities, data\.modality=\[2\]"):
        msd(tmp_path / "T", tmp_path, modality=2)


def test_msd_normalisation_per_volume(task3, tmp_path):
    volume = lambda dm: np.load(next((dm.cache_dir).glob("hippocampus_000-*.image.npy")))  # noqa: E731
    z = volume(msd(task3, tmp_path, normalise="zscore", split_fractions=[0.34, 0.33, 0.33]))
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3
    mm = volume(msd(task3, tmp_path, normalise="minmax", clip_percentiles=[1, 99], split_fractions=[0.34, 0.33, 0.33]))
    assert mm.min() == 0 and mm.max() == pytest.approx(1)
    assert (mm == 1).mean() >= 0.005  # the top percent was clipped to the maximum


def test_msd_split_is_by_subject_without_leakage(tmp_path):
    write_msd_task(tmp_path / "T", n=10, shapes=[(12, 14, 10)] * 10)
    dm = msd(tmp_path / "T", tmp_path, split_fractions=[0.6, 0.2, 0.2])
    subjects = {split: set(s) for split, s in dm.splits.items()}
    assert [len(subjects[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert not (subjects["train"] & subjects["val"] or subjects["train"] & subjects["test"] or subjects["val"] & subjects["test"])
    assert set.union(*subjects.values()) == {f"hippocampus_{i:03d}" for i in range(10)}
    for split, ds in dm.datasets.items():  # every slice comes from a subject of its own split
        assert {re.sub(r"_z\d+$", "", i) for i in ds.ids} <= subjects[split]
    assert split_subjects(list(subjects["train"] | subjects["val"] | subjects["test"]), [0.6, 0.2, 0.2], 0) == dm.splits
    # The subjects seed 0 picked before the sources shared one seeded split: unchanged.
    h = lambda *ids: [f"hippocampus_{i:03d}" for i in ids]  # noqa: E731
    assert dm.splits == {"train": h(0, 1, 3, 5, 8, 9), "val": h(4, 6), "test": h(2, 7)}
    assert split_subjects(h(*range(10)), [0.6, 0.2, 0.2], 3) == {"train": h(1, 3, 4, 5, 7, 8), "val": h(6, 9), "test": h(0, 2)}
    assert split_subjects([f"hippocampus_{i:03d}" for i in range(10)], [0.6, 0.2, 0.2], 1) != dm.splits
    with pytest.raises(DataError, match="cannot be split"):
        split_subjects(["a", "b"], [0.6, 0.2, 0.2], 0)


def test_msd_empty_slices_are_subsampled(task3, tmp_path):
    counts = {}
    for fraction in (0.0, 0.5, 1.0):
        dm = msd(task3, tmp_path, empty_slice_fraction=fraction, split_fractions=[0.34, 0.33, 0.33])
        counts[fraction] = len(dm.datasets["train"])
        if fraction == 0.0:
            assert all(((item["mask"] > 0) & (item["mask"] != IGNORE_INDEX)).any() for item in dm.datasets["train"])
    assert counts[0.0] == 12 and counts[1.0] == 35 and 12 < counts[0.5] < 35  # class boxes span z 11..22
    again = msd(task3, tmp_path, empty_slice_fraction=0.5, split_fractions=[0.34, 0.33, 0.33])
    assert len(again.datasets["train"]) == counts[0.5]


def test_msd_pads_odd_sizes_for_batching(tmp_path):
    shapes = [(35, 51, 35), (33, 47, 35), (36, 50, 35), (31, 51, 35)]
    write_msd_task(tmp_path / "T", n=4, shapes=shapes)
    dm = msd(tmp_path / "T", tmp_path, empty_slice_fraction=1.0, split_fractions=[0.5, 0.25, 0.25], batch_size=64)
    assert dm.size == (36, 51)  # the largest slice of the task
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert batch["image"].shape[-2:] == (36, 51) and batch["mask"].shape[-2:] == (36, 51)
    small = next(s for s in dm.splits["val"] + dm.splits["test"] if s != "hippocampus_002")
    split = "val" if small in dm.splits["val"] else "test"
    item = dm.datasets[split][0]
    h, w = shapes[int(small[-3:])][:2]
    assert (item["mask"][h:] == IGNORE_INDEX).all() and (item["mask"][:, w:] == IGNORE_INDEX).all()
    assert (item["image"][:, h:] == 0).all() and (item["mask"][:h, :w] != IGNORE_INDEX).all()
    fixed = msd(tmp_path / "T", tmp_path, pad_to=[32, 48], split_fractions=[0.5, 0.25, 0.25])
    assert fixed.datasets["test"][0]["image"].shape == (1, 32, 48)


def test_msd_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = tmp_path / "T"
    write_msd_task(root, n=3)
    kwargs = dict(split_fractions=[0.34, 0.33, 0.33])
    first = msd(root, tmp_path, **kwargs)
    files = sorted(first.cache_dir.glob("*.npy"))
    assert len(files) == 6
    stamps = {p: p.stat().st_mtime_ns for p in files}

    real_load = msd_module.load_case
    decoded = []
    monkeypatch.setattr(msd_module, "load_case", lambda case, *a: decoded.append(case.subject) or real_load(case, *a))
    msd(root, tmp_path, **kwargs)
    assert decoded == [] and {p: p.stat().st_mtime_ns for p in files} == stamps  # no NIfTI decoded again

    image, labels = ras_case((35, 51, 35), 99)  # one source file changes: only its volume is re-decoded
    nib.Nifti1Image(image, np.eye(4)).to_filename(root / "imagesTr" / "hippocampus_001.nii.gz")
    nib.Nifti1Image(labels, np.eye(4)).to_filename(root / "labelsTr" / "hippocampus_001.nii.gz")  # on its grid
    changed = msd(root, tmp_path, **kwargs)
    assert decoded == ["hippocampus_001"]
    assert len(list(changed.cache_dir.glob("hippocampus_001-*.npy"))) == 2  # the stale entry was removed
    assert sorted(changed.cache_dir.glob("hippocampus_000-*")) == sorted(first.cache_dir.glob("hippocampus_000-*"))

    other = msd(root, tmp_path, normalise="minmax", **kwargs)  # a preprocessing setting changes: fresh cache
    assert other.cache_dir != first.cache_dir and len(decoded) == 4
    # settings that only select slices do not re-decode
    msd(root, tmp_path, empty_slice_fraction=1.0, split_seed=3, pad_to=[40, 60], **kwargs)
    assert len(decoded) == 4


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_msd_damaged_cache_is_rebuilt(task3, tmp_path, damage):
    dm = msd(task3, tmp_path, split_fractions=[0.34, 0.33, 0.33])
    path = next(dm.cache_dir.glob("hippocampus_002-*.mask.npy"))
    intact = np.load(path)
    data = path.read_bytes()
    path.write_bytes(b"not numpy" if damage == "garbage" else data[: len(data) // 2])
    again = msd(task3, tmp_path, split_fractions=[0.34, 0.33, 0.33])
    np.testing.assert_array_equal(np.load(path), intact)  # decoded again from the NIfTI source
    assert len(list(again.cache_dir.glob("hippocampus_002-*"))) == 3 and not list(again.cache_dir.glob("*.tmp"))
    split = next(s for s, subjects in again.splits.items() if "hippocampus_002" in subjects)
    assert len(again.datasets[split]) > 0 and again.datasets[split][0]["mask"].shape[-2:] == again.size


def test_msd_errors_name_the_file(tmp_path):
    root = tmp_path / "T"
    with pytest.raises(DataError, match="does not exist"):
        msd(root, tmp_path)
    root.mkdir()
    with pytest.raises(DataError, match=r"T/dataset\.json does not exist"):
        msd(root, tmp_path)
    write_msd_task(root, n=3)
    kwargs = dict(split_fractions=[0.34, 0.33, 0.33])

    good = (root / "imagesTr" / "hippocampus_001.nii.gz").read_bytes()
    (root / "imagesTr" / "hippocampus_001.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"imagesTr/hippocampus_001\.nii\.gz: cannot read NIfTI"):
        msd(root, tmp_path, **kwargs)
    (root / "imagesTr" / "hippocampus_001.nii.gz").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DataError, match=r"imagesTr/hippocampus_001\.nii\.gz: cannot read NIfTI"):
        msd(root, tmp_path, **kwargs)
    (root / "imagesTr" / "hippocampus_001.nii.gz").write_bytes(good)

    label_path = root / "labelsTr" / "hippocampus_002.nii.gz"
    good_label = label_path.read_bytes()
    nib.Nifti1Image(np.zeros((35, 51, 30), np.uint8), np.eye(4)).to_filename(label_path)
    with pytest.raises(DataError, match=r"labelsTr/hippocampus_002\.nii\.gz: label volume shape \(35, 51, 30\) does not match"):
        msd(root, tmp_path, **kwargs)
    bad = np.zeros((35, 51, 35), np.uint8)
    bad[3, 3, 3] = 5
    grid = nib.as_closest_canonical(nib.load(str(root / "imagesTr" / "hippocampus_002.nii.gz"))).affine  # RAS, as bad
    nib.Nifti1Image(bad, grid).to_filename(label_path)
    with pytest.raises(DataError, match=r"labelsTr/hippocampus_002\.nii\.gz: label values \[5\] are not in the class list"):
        msd(root, tmp_path, **kwargs)
    label_path.write_bytes(good_label)

    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/gone.nii.gz", "label": "./labelsTr/gone.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"missing: .*imagesTr/gone\.nii\.gz, .*labelsTr/gone\.nii\.gz"):
        msd(root, tmp_path, **kwargs)


def test_msd_without_training_list_pairs_files_and_skips_macos_metadata(tmp_path):
    write_msd_task(tmp_path / "T", n=3, listed=False)
    (tmp_path / "T" / "imagesTr" / "._hippocampus_000.nii.gz").write_bytes(b"AppleDouble")
    dm = msd(tmp_path / "T", tmp_path, split_fractions=[0.34, 0.33, 0.33])
    assert sorted(s for v in dm.splits.values() for s in v) == [f"hippocampus_{i:03d}" for i in range(3)]
    (tmp_path / "T" / "labelsTr" / "hippocampus_002.nii.gz").unlink()
    with pytest.raises(DataError, match=r"without a partner.*imagesTr/hippocampus_002\.nii\.gz"):
        msd(tmp_path / "T", tmp_path)


# -- augmentation and padding ----------------------------------------------------------


def label_image(h=37, w=29, seed=0):
    rng = np.random.default_rng(seed)
    mask = torch.from_numpy(rng.integers(0, 4, (h, w))).long()
    return mask.float()[None].repeat(2, 1, 1), mask


def test_augment_keeps_image_and_mask_aligned():
    augment = Augment(hflip=0.5, vflip=0.5, rotation=30, scale=[0.7, 1.4], crop_size=[24, 40], interpolation="nearest")
    torch.manual_seed(0)
    changed = 0
    for seed in range(20):
        image, mask = label_image(seed=seed)
        out_image, out_mask = augment(image, mask)
        assert out_image.shape == (2, 24, 40) and out_mask.shape == (24, 40) and out_mask.dtype == torch.int64
        inside = out_mask != IGNORE_INDEX
        assert torch.equal(out_image[0][inside], out_mask[inside].float())  # the image is its mask, moved alike
        assert (out_image[:, ~inside] == 0).all()  # pixels from outside: image 0, mask ignored
        assert set(out_mask.unique().tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}
        changed += not inside.all()
    assert changed > 0
    # flips alone are exact for bilinear images as well
    image, mask = label_image()
    out_image, out_mask = Augment(hflip=1.0)(image, mask)
    assert torch.equal(out_mask, mask.flip(-1)) and torch.equal(out_image, image.flip(-1))


def test_augment_is_deterministic_given_the_seed_and_jitters_intensity():
    augment = Augment(rotation=10, scale=[0.9, 1.1], brightness=0.2, contrast=0.2)
    image, mask = label_image()
    results = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        results.append(augment(image, mask))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][0], results[2][0])
    assert build_augment({"enabled": False}) is None and build_augment(None) is None
    assert isinstance(build_augment({"hflip": 0.2}), Augment)
    with pytest.raises(ValueError, match="augment.hflip"):
        Augment(hflip=2)


def marked(h=9, w=12):
    """A 2-channel image and mask, zero but for one marked pixel (image 5/6, label 3) at (2, 3)."""
    image, mask = torch.zeros(2, h, w), torch.zeros(h, w, dtype=torch.int64)
    image[0, 2, 3], image[1, 2, 3], mask[2, 3] = 5.0, 6.0, 3
    return image, mask


@pytest.mark.parametrize("hflip, vflip, where", [(1.0, 0.0, (2, 8)), (0.0, 1.0, (6, 3)), (1.0, 1.0, (6, 8))])
def test_flips_move_a_marked_pixel_to_its_mirror_in_image_and_mask(hflip, vflip, where):
    image, mask = marked()  # 9 x 12: (2, 3) mirrors to (2, 12-1-3) and (9-1-2, 3)
    out_image, out_mask = Augment(hflip=hflip, vflip=vflip)(image, mask)
    assert type(out_image) is torch.Tensor and type(out_mask) is torch.Tensor  # plain tensors, not tv_tensors
    assert out_mask.dtype == torch.int64 and out_mask.shape == (9, 12)
    assert torch.nonzero(out_mask).tolist() == [list(where)] and out_mask[where] == 3
    assert torch.nonzero(out_image[0]).tolist() == [list(where)] and out_image[:, where[0], where[1]].tolist() == [5.0, 6.0]


def test_rotation_keeps_mask_labels_nearest_even_with_bilinear_images():
    # Labels 0, 7 and 200 side by side: any blending of the mask would make values in between.
    mask = torch.zeros(24, 30, dtype=torch.int64)
    mask[:, 10:20], mask[:, 20:] = 7, 200
    image = mask.float()[None]
    augment = Augment(hflip=0.0, rotation=40, scale=[0.8, 1.3], interpolation="bilinear")
    torch.manual_seed(0)
    values, blended = set(), False
    for _ in range(8):
        out_image, out_mask = augment(image, mask)
        values |= set(out_mask.unique().tolist())
        inner = out_image[0][out_mask != IGNORE_INDEX]
        blended |= bool(((inner > 0) & (inner < 7)).any())  # the image is resampled bilinearly
    assert values <= {0, 7, 200, IGNORE_INDEX} and IGNORE_INDEX in values and {0, 7, 200} <= values
    assert blended


def test_crop_pads_small_images_bottom_right_with_0_and_255():
    image = torch.arange(1, 36, dtype=torch.float32).reshape(1, 5, 7)
    mask = torch.ones(5, 7, dtype=torch.int64)
    torch.manual_seed(0)
    out_image, out_mask = Augment(hflip=0.0, crop_size=[8, 9])(image, mask)
    assert out_image.shape == (1, 8, 9) and out_mask.shape == (8, 9)
    assert torch.equal(out_image[:, :5, :7], image) and torch.equal(out_mask[:5, :7], mask)  # kept whole, in place
    assert (out_image[:, 5:] == 0).all() and (out_image[:, :, 7:] == 0).all()
    assert (out_mask[5:] == IGNORE_INDEX).all() and (out_mask[:, 7:] == IGNORE_INDEX).all()


def test_crop_of_a_larger_image_is_a_random_window_of_image_and_mask_alike():
    image = torch.arange(20 * 16, dtype=torch.float32).reshape(1, 20, 16)  # each value names its pixel
    mask = torch.arange(20 * 16).reshape(20, 16) % 5
    augment = Augment(hflip=0.0, crop_size=[6, 4])
    torch.manual_seed(0)
    corners = set()
    for _ in range(10):
        out_image, out_mask = augment(image, mask)
        top, left = divmod(int(out_image[0, 0, 0]), 16)
        assert torch.equal(out_image, image[:, top : top + 6, left : left + 4])
        assert torch.equal(out_mask, mask[top : top + 6, left : left + 4])
        corners.add((top, left))
    assert len(corners) > 1


def test_fit_to_pads_bottom_right_and_crops_centre():
    image, mask = label_image(5, 7)
    padded_image, padded_mask = fit_to(image, mask, (8, 9))
    assert torch.equal(padded_mask[:5, :7], mask) and (padded_mask[5:] == IGNORE_INDEX).all()
    assert (padded_mask[:, 7:] == IGNORE_INDEX).all() and (padded_image[:, 5:] == 0).all()
    cropped_image, cropped_mask = fit_to(image, mask, (3, 3))
    assert torch.equal(cropped_mask, mask[1:4, 2:5]) and torch.equal(cropped_image, image[:, 1:4, 2:5])


def test_augmentation_draws_from_torch_rng_only_so_seeded_workers_reproduce_it():
    import random

    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    augment = Augment(hflip=0.5, vflip=0.5, rotation=20, scale=[0.8, 1.2], brightness=0.1, contrast=0.1, crop_size=[10, 10])
    image, mask = label_image(12, 14)
    torch.manual_seed(3)
    np.random.seed(0)
    random.seed(0)
    first = augment(image, mask)
    torch.manual_seed(3)
    np.random.seed(1)  # other numpy / python seeds: the same draws
    random.seed(1)
    again = augment(image, mask)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])

    # Workers: torch seeds each one from the main process's torch RNG, which seed_everything sets.
    dataset = ArraySegmentationDataset(image[:1].repeat(8, 1, 1, 1).numpy(), mask.repeat(8, 1, 1).numpy(),
                                       [str(i) for i in range(8)], transform=augment)

    def epoch(seed):
        pl.seed_everything(seed)
        return [b["image"] for b in DataLoader(dataset, batch_size=2, num_workers=2)]

    a, b, c = epoch(7), epoch(7), epoch(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    samples = torch.cat(a)  # the same input in every sample: the two workers draw differently
    assert len({tuple(x.flatten().tolist()) for x in samples}) > 4


def test_augmentation_only_on_the_train_split(task3, tmp_path):
    dm = msd(task3, tmp_path, augment={"hflip": 1.0}, empty_slice_fraction=1.0, split_fractions=[0.34, 0.33, 0.33])
    plain = msd(task3, tmp_path, augment=None, empty_slice_fraction=1.0, split_fractions=[0.34, 0.33, 0.33])
    assert torch.equal(dm.datasets["train"][20]["mask"], plain.datasets["train"][20]["mask"].flip(-1))
    for split in ("val", "test"):
        assert dm.datasets[split].transform is None
        for i in (0, 17):
            assert torch.equal(dm.datasets[split][i]["image"], plain.datasets[split][i]["image"])
            assert torch.equal(dm.datasets[split][i]["mask"], plain.datasets[split][i]["mask"])


# -- predictions align with masks after pad/crop ------------------------------------------


class LabelBackbone(nn.Module):
    """Reads the class off the image (image == label): a perfect 'model' for alignment checks."""

    required_divisor = 16

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, image):
        labels = image[:, 0].round().clamp(0, self.num_classes - 1).long()
        logits = torch.nn.functional.one_hot(labels, self.num_classes).permute(0, 3, 1, 2).float() * self.scale
        return BackboneOutput(logits=logits, features=[logits], feature_strides=(1,), stride=1)


def test_predictions_align_with_masks_after_padding(tmp_path):
    write_msd_task(tmp_path / "T", n=4, shapes=[(35, 51, 35), (33, 47, 35), (36, 50, 35), (31, 49, 35)],
                   image_fn=lambda image, labels: labels.astype(np.float32))
    dm = msd(tmp_path / "T", tmp_path, normalise="none", clip_percentiles=None, empty_slice_fraction=1.0,
             split_fractions=[0.5, 0.25, 0.25], batch_size=64)
    module = SegmentationModule(LabelBackbone(3), NoHead(3), num_classes=3, class_names=dm.class_names)
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert batch["image"].shape[-2:] == (36, 51)  # odd size; the module pads to 48x64 and crops back
        preds = module(batch["image"]).argmax(1)
        assert preds.shape == batch["mask"].shape
        valid = batch["mask"] != IGNORE_INDEX
        assert torch.equal(preds[valid], batch["mask"][valid])
        assert valid.float().mean() < 1  # the padded pixels exist and are ignored


# -- folder ---------------------------------------------------------------------------


def test_folder_pads_mixed_sizes_and_reads_jpeg_and_16bit_tiff(tmp_path):
    root = folder_tree(tmp_path / "data")
    dm = FolderDataModule(root=str(root), num_classes=2, mask_values={0: 0, 255: 1})
    dm.setup()
    assert dm.size == (18, 22)
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (4, 1, 18, 22) and batch["id"] == [f"case{i}" for i in range(4)]
    assert (batch["mask"][0, 16:] == IGNORE_INDEX).all() and set(batch["mask"][0, :16, :20].unique().tolist()) == {0, 1}

    tiff = np.arange(16 * 20, dtype=np.uint16).reshape(16, 20) * 200
    (root / "test" / "img" / "case0.png").unlink()
    Image.fromarray(tiff).save(root / "test" / "img" / "case0.tif")
    (root / "test" / "img" / "case2.png").unlink()
    Image.fromarray(np.full((16, 20, 3), 128, np.uint8)).save(root / "test" / "img" / "case2.jpg")
    dm = FolderDataModule(root=str(root), num_classes=2, mask_values={0: 0, 255: 1}, pad_to=[24, 24])
    dm.setup()
    np.testing.assert_allclose(dm.datasets["test"].images[0, 0, :16, :20].numpy(), tiff / 65535.0, rtol=1e-6)
    assert dm.datasets["test"].images[2, 0, 0, 0] == pytest.approx(128 / 255, abs=2 / 255)
    assert dm.datasets["train"][0]["image"].shape == (1, 24, 24)


def test_folder_empty_or_missing_folders_are_named(tmp_path):
    root = folder_tree(tmp_path / "data")
    for p in (root / "test" / "img").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"test/img holds no images"):
        FolderDataModule(root=str(root), num_classes=2, mask_values={0: 0, 255: 1}).setup()
    with pytest.raises(DataError, match=r"data.root=.*nope.* does not exist"):
        FolderDataModule(root=str(tmp_path / "nope"), num_classes=2).setup()


def test_folder_unknown_mask_value_is_named(tmp_path):
    root = folder_tree(tmp_path / "data", mask_value=128)
    with pytest.raises(DataError, match=r"case\d\.png: mask values \[128\] are not in data\.mask_values"):
        FolderDataModule(root=str(root), num_classes=2, mask_values={0: 0, 255: 1}).setup()


# -- VOC ------------------------------------------------------------------------------


def test_voc_splits_classes_and_fixed_size_batches(tmp_path):
    root = voc_tree(tmp_path / "voc")
    dm = VOCDataModule(root=str(root), val_fraction=0.34, pad_to=[64, 64], augment={"hflip": 0.5, "crop_size": [32, 32]})
    dm.setup()
    assert dm.num_classes == 21 and dm.class_names == VOC_CLASSES and dm.in_channels == 3
    ids = {split: set(ds.ids) for split, ds in dm.datasets.items()}
    assert ids["test"] == {f"2008_{i:06d}" for i in range(3)}  # official val is the test split
    assert ids["val"] == {"2007_000002", "2007_000003"}  # what seed 0 held out before the shared seeded split
    assert ids["train"] | ids["val"] == {f"2007_{i:06d}" for i in range(6)}
    assert not ids["train"] & ids["val"]
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch["image"].shape == (3, 3, 64, 64) and test_batch["mask"].shape == (3, 64, 64)
    assert set(test_batch["mask"].unique().tolist()) == {0, 1, 2, 3, IGNORE_INDEX}
    assert (test_batch["mask"][0, 45:] == IGNORE_INDEX).all() and (test_batch["image"][0, :, 45:] == 0).all()
    train_batch = next(iter(dm.train_dataloader()))
    assert train_batch["image"].shape == (4, 3, 32, 32)
    # also accepted: data.root pointing at VOCdevkit itself
    other = VOCDataModule(root=str(root / "VOCdevkit"), val_fraction=0.5, split_seed=7)
    other.setup()
    assert set(other.datasets["test"].ids) == ids["test"]
    assert other.datasets["val"].ids == ["2007_000000", "2007_000002", "2007_000005"]  # as before, for seed 7
    assert other.datasets["train"].transform is None and other.datasets["train"].size == other.size


def test_voc_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        VOCDataModule(root=str(tmp_path / "none")).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"VOCdevkit/VOC2012 does not exist.*download"):
        VOCDataModule(root=str(tmp_path / "empty")).setup()
    root = voc_tree(tmp_path / "voc")
    base = root / "VOCdevkit" / "VOC2012"
    palette_png(base / "SegmentationClass" / "2008_000001.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match=r"2008_000001\.png: mask shape \(10, 10\) does not match image shape \(40, 50\)"):
        VOCDataModule(root=str(root)).setup()
    bad = np.zeros((40, 50), np.uint8)
    bad[0, 0] = 30
    palette_png(base / "SegmentationClass" / "2008_000001.png", bad)
    dm = VOCDataModule(root=str(root))
    dm.setup()
    with pytest.raises(DataError, match=r"2008_000001\.png: label values \[30\] outside \[0, 21\)"):
        dm.datasets["test"][1]
    (base / "JPEGImages" / "2007_000002.jpg").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"2007_000002\.jpg: cannot read image"):
        VOCDataModule(root=str(root)).setup()
    (base / "JPEGImages" / "2007_000002.jpg").unlink()
    with pytest.raises(DataError, match=r"missing: .*JPEGImages/2007_000002\.jpg"):
        VOCDataModule(root=str(root)).setup()


# -- configs and end-to-end training ----------------------------------------------------------


def test_configs_build_the_datamodules(make_cfg, tmp_path):  # building reads no data: no files needed
    cfg = make_cfg("data=msd", f"data.root={tmp_path / 'T'}")
    dm = instantiate(cfg.data)
    assert isinstance(dm, MSDDataModule) and isinstance(dm.augment, Augment) and dm.augment.hflip == 0.5
    off = cfg.copy()  # as data.augment.enabled=false on the command line (one Hydra compose is costly)
    off.data.augment.enabled = False
    assert instantiate(off.data).augment is None
    off.data.augment = None  # data.augment=null
    assert instantiate(off.data).augment is None
    voc = instantiate(make_cfg("data=voc", f"data.root={tmp_path}").data)
    assert isinstance(voc, VOCDataModule) and voc.pad_to == (512, 512) and voc.augment.crop_size == (320, 320)
    folder = instantiate(make_cfg("data=folder", f"data.root={tmp_path}").data)
    assert isinstance(folder, FolderDataModule) and folder.augment is not None


# The smallest backbone (pspnet lite): these runs test the data wiring, not the model.
TRAIN = ["backbone=pspnet", "data.batch_size=8", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1"]


def check_results(out: Path, ids_pattern: str) -> dict:
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "complete" and "test/iou" in saved["metrics"]
    assert saved["per_image"] and all(re.fullmatch(ids_pattern, row["id"]) for row in saved["per_image"])
    return saved


def test_train_end_to_end_on_msd(make_cfg, tmp_path, data_dir):
    write_msd_task(tmp_path / "T", n=5, shapes=[(35, 51, 35), (33, 47, 35), (35, 51, 35), (31, 49, 35), (35, 51, 35)])
    out = tmp_path / "run"
    train(make_cfg("data=msd", f"data.root={tmp_path / 'T'}", "data.empty_slice_fraction=0",
                   "data.split_fractions=[0.6,0.2,0.2]", *TRAIN, output_dir=out))
    saved = check_results(out, r"hippocampus_\d{3}_z\d{3}")
    test_subjects = {row["id"][:15] for row in saved["per_image"]}
    assert len(test_subjects) == 1 and saved["config"]["data"]["name"] == "msd"
    assert list((data_dir / "cache" / "msd").glob("T-*/hippocampus_000-*.image.npy"))


def test_train_end_to_end_on_folder(make_cfg, tmp_path):
    root = folder_tree(tmp_path / "data", sizes=((16, 20), (18, 15), (16, 20), (12, 22), (17, 17)))
    out = tmp_path / "run"
    train(make_cfg("data=folder", f"data.root={root}", "data.mask_values={0:0,255:1}", *TRAIN, output_dir=out))
    check_results(out, r"case\d")


def test_train_end_to_end_on_voc(make_cfg, tmp_path):
    root = voc_tree(tmp_path / "voc")
    out = tmp_path / "run"
    train(make_cfg("data=voc", f"data.root={root}", "data.pad_to=[64,64]", "data.augment.crop_size=[32,32]",
                   "data.val_fraction=0.34", *TRAIN, output_dir=out))
    check_results(out, r"2008_\d{6}")


def test_msd_task_without_volumes_is_named(tmp_path):
    root = tmp_path / "T"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"labels": LABELS, "training": []}))
    with pytest.raises(DataError, match=r"T holds no training volumes"):
        msd(root, tmp_path)
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "2": "tumour"}}))
    with pytest.raises(DataError, match=r"dataset\.json: label indices must be 0\.\.1 without gaps"):
        msd(root, tmp_path)


def test_folder_masks_of_0_and_255_without_mask_values_are_refused(tmp_path):
    root = folder_tree(tmp_path / "data")  # foreground stored as 255
    with pytest.raises(DataError, match=r"only the values 0 and 255.*data\.mask_values='\{0: 0, 255: 1\}'"):
        FolderDataModule(root=str(root), num_classes=2).setup()
    dm = FolderDataModule(root=str(root), num_classes=2, mask_values={0: 0, 255: 1})  # the named fix works
    dm.setup()
    assert (dm.datasets["test"].masks == 1).sum() == 4 * 6 * 7  # the 6x7 square of each test mask


def test_folder_two_files_with_one_stem_are_an_error(tmp_path):
    root = folder_tree(tmp_path / "data")
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(root / "train" / "img" / "case0.jpg")
    with pytest.raises(DataError, match=r"case0\.jpg and .*case0\.png share the stem 'case0'|case0\.png and .*case0\.jpg share"):
        FolderDataModule(root=str(root), num_classes=2, mask_values={0: 0, 255: 1}).setup()
