"""Built-in synthetic data and the folder source: determinism, caching, clear errors."""

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from segrefine.data.common import DataError, seeded_split, split_transform
from segrefine.data.folder import FolderDataModule, read_image
from segrefine.data.synthetic import SyntheticDataModule
from segrefine.data.transforms import Augment

SMALL = dict(image_size=32, num_train=6, num_val=2, num_test=2)


def make(tmp_path, **kwargs) -> SyntheticDataModule:
    dm = SyntheticDataModule(root=str(tmp_path), **{**SMALL, **kwargs})
    dm.prepare_data()
    dm.setup()
    return dm


def test_synthetic_is_deterministic_and_seed_dependent(tmp_path):
    a = make(tmp_path / "a").datasets["train"]
    b = make(tmp_path / "b").datasets["train"]
    c = make(tmp_path / "c", generator_seed=99).datasets["train"]
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.images, c.images)


def test_synthetic_samples_are_valid_and_have_every_class(tmp_path):
    dm = make(tmp_path, num_train=20)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 1, 32, 32) and batch["image"].dtype.is_floating_point
    assert batch["mask"].dtype == np.dtype("int64") or str(batch["mask"].dtype) == "torch.int64"
    masks = dm.datasets["train"].masks
    assert set(np.unique(masks.numpy())) == {0, 1, 2}
    assert dm.in_channels == 1 and dm.num_classes == 3 and len(dm.class_names) == 3


def test_synthetic_classes_overlap_in_intensity(tmp_path):
    """A pixel's value alone must not decide its class (otherwise context/edges don't matter)."""
    ds = make(tmp_path, num_train=20).datasets["train"]
    images, masks = ds.images[:, 0].numpy(), ds.masks.numpy()
    lo, hi = np.percentile(images[masks == 1], [5, 95])
    background = images[masks == 0]
    assert ((background > lo) & (background < hi)).mean() > 0.05


def test_cache_is_reused_and_keyed_by_settings(tmp_path):
    dm = make(tmp_path)
    path = dm.split_path("train")
    stamp = path.stat().st_mtime_ns
    assert make(tmp_path).split_path("train").stat().st_mtime_ns == stamp
    assert make(tmp_path, noise_std=0.3).split_path("train") != path


def test_corrupt_cache_is_named(tmp_path):
    dm = make(tmp_path)
    dm.split_path("val").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=r"val\.npz.*delete the file"):
        make(tmp_path)


def test_bad_label_in_cache_names_file_and_sample(tmp_path):
    dm = make(tmp_path)
    path = dm.split_path("test")
    data = dict(np.load(path))
    data["masks"][1, 3, 3] = 7
    np.savez(path, **data)
    with pytest.raises(DataError, match=r"test\.npz \[test_00001\]: label values \[7\] outside \[0, 3\)"):
        make(tmp_path)


def test_hydra_config_builds_the_datamodule(make_cfg):
    dm = instantiate(make_cfg().data)
    assert isinstance(dm, SyntheticDataModule) and dm.num_classes == 3


# -- folder source ----------------------------------------------------------------


def write_pair(root, split, stem, image, mask):
    for sub, array in (("img", image), ("gt", mask)):
        folder = root / split / sub
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"{stem}.png")


def folder_tree(root, mask_value=255, n=4):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for i in range(n):
            mask = np.zeros((16, 20), np.uint8)
            mask[4:10, 5:12] = mask_value
            write_pair(root, split, f"case{i}", rng.integers(0, 255, (16, 20), dtype=np.uint8), mask)
    return root


def test_folder_reads_binary_masks_and_splits_val(tmp_path):
    dm = FolderDataModule(root=str(folder_tree(tmp_path)), num_classes=2, mask_values={0: 0, 255: 1})
    dm.setup()
    assert len(dm.datasets["train"]) == 3 and len(dm.datasets["val"]) == 1
    assert set(np.unique(dm.datasets["test"].masks.numpy())) == {0, 1}
    assert dm.datasets["test"].ids == [f"case{i}" for i in range(4)]


def test_folder_missing_directory_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        FolderDataModule(root=str(tmp_path / "nope"), num_classes=2).setup()
    folder_tree(tmp_path)
    (tmp_path / "test" / "gt").rename(tmp_path / "test" / "labels")
    with pytest.raises(DataError, match=r"test/gt does not exist"):
        FolderDataModule(root=str(tmp_path), num_classes=2).setup()


def test_folder_label_values_outside_classes_name_the_file(tmp_path):
    folder_tree(tmp_path, mask_value=4)
    with pytest.raises(DataError, match=r"case0\.png: label values \[4\] outside \[0, 2\)"):
        FolderDataModule(root=str(tmp_path), num_classes=2).setup()


def test_folder_shape_mismatch_names_the_file(tmp_path):
    folder_tree(tmp_path)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "train" / "gt" / "case2.png")
    with pytest.raises(DataError, match=r"case2\.png: mask shape \(10, 10\) does not match image shape \(16, 20\)"):
        FolderDataModule(root=str(tmp_path), num_classes=2, mask_values={0: 0, 255: 1}).setup()


def test_folder_unmatched_files_are_listed(tmp_path):
    folder_tree(tmp_path)
    (tmp_path / "train" / "gt" / "case3.png").unlink()
    with pytest.raises(DataError, match=r"without a partner.*train/img/case3\.png"):
        FolderDataModule(root=str(tmp_path), num_classes=2, mask_values={0: 0, 255: 1}).setup()


def test_folder_corrupt_image_is_named(tmp_path):
    folder_tree(tmp_path)
    (tmp_path / "test" / "img" / "case1.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"case1\.png: cannot read image"):
        FolderDataModule(root=str(tmp_path), num_classes=2, mask_values={0: 0, 255: 1}).setup()


# -- shared pieces: seeded split, per-split transform, image reading ----------------------
# The expected splits below were computed with the code before the sources shared
# seeded_split (folder, VOC and MSD each drew their own permutation): a seed must keep
# picking the same items.


def test_seeded_split_reproduces_the_splits_of_every_source():
    assert seeded_split(10, [2, 2], 0) == [[0, 1, 3, 5, 8, 9], [4, 6], [2, 7]]  # MSD train/val/test
    assert seeded_split(10, [2, 2], 3) == [[1, 3, 4, 5, 7, 8], [6, 9], [0, 2]]
    assert seeded_split(7, [2], 5) == [[0, 2, 3, 5, 6], [1, 4]]  # folder train/val
    assert seeded_split(6, [2], 2) == [[0, 1, 2, 4], [3, 5]]  # VOC train/val
    assert seeded_split(6, [3], 7) == [[1, 3, 4], [0, 2, 5]]
    assert seeded_split(4, [], 0) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("seed, n, fraction, val", [(0, 4, 0.2, ["case2"]), (1, 4, 0.2, ["case0"]),
                                                     (5, 7, 0.3, ["case1", "case4"]),
                                                     (3, 7, 0.5, ["case1", "case2", "case5", "case6"])])
def test_folder_validation_split_is_unchanged_for_a_seed(tmp_path, seed, n, fraction, val):
    dm = FolderDataModule(root=str(folder_tree(tmp_path, n=n)), num_classes=2, mask_values={0: 0, 255: 1},
                          split_seed=seed, val_fraction=fraction)
    dm.setup()
    assert dm.datasets["val"].ids == val
    assert dm.datasets["train"].ids == [f"case{i}" for i in range(n) if f"case{i}" not in val]


def test_split_transform_augments_and_crops_the_train_split_only():
    crop, plain = Augment(crop_size=[8, 6]), Augment()
    assert split_transform("train", crop, (20, 30)) == (crop, (8, 6))
    assert split_transform("train", plain, (20, 30)) == (plain, (20, 30))
    assert split_transform("train", None, (20, 30)) == (None, (20, 30))
    for split in ("val", "test"):
        assert split_transform(split, crop, (20, 30)) == (None, (20, 30))
        assert split_transform(split, crop, None) == (None, None)


def test_read_image_scales_by_bit_depth_and_converts_to_the_channels(tmp_path):
    gray16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    Image.fromarray(gray16).save(tmp_path / "a.png")
    np.testing.assert_allclose(read_image(tmp_path / "a.png", 1), gray16[None] / 65535.0, rtol=1e-6)
    rgb = read_image(tmp_path / "a.png", 3)  # a 16-bit grayscale image as RGB: the channel repeated
    assert rgb.shape == (3, 3, 4) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb, np.repeat(gray16[None] / 65535.0, 3, axis=0), rtol=1e-6)

    values = np.array([[-1.5, 0.25], [3.0, 1e4]], np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    assert np.array_equal(read_image(tmp_path / "f.tif", 1), values[None])  # float: as stored

    indices = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    palette = Image.frombytes("P", (3, 2), indices.tobytes())
    palette.putpalette([40 * i for i in range(3) for _ in range(3)])  # index i: gray 40*i
    palette.save(tmp_path / "p.png")
    np.testing.assert_allclose(read_image(tmp_path / "p.png", 1), (40.0 * indices)[None] / 255.0, rtol=1e-6)
    colour = np.zeros((2, 3, 3), np.uint8)
    colour[..., 0], colour[..., 2] = 255, 51
    Image.fromarray(colour).save(tmp_path / "c.png")
    assert np.array_equal(read_image(tmp_path / "c.png", 3)[:, 0, 0], np.array([1.0, 0.0, 0.2], np.float32))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"bad\.png: cannot read image"):
        read_image(tmp_path / "bad.png", 1)
