"""What every data source shares: image reading, sample checks, the seeded held-out split,
the per-split transform, and a tensor-backed dataset."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from segrefine.data.transforms import Augment, fit_to
from segrefine.types import IGNORE_INDEX


class DataError(ValueError):
    """Bad input data; the message names the file or sample at fault."""


def open_image(path, mode: str | Callable[[str], str | None] | None = None, orient: bool = False) -> np.ndarray:
    """An image file as an array; DataError naming the file.

    ``mode``: the PIL mode to convert to, or a function of the file's own mode giving it
    (``None``: as stored). ``orient``: turned as its EXIF orientation says (as a viewer
    shows it); see ``exif_orientation``."""
    try:
        with Image.open(path) as img:
            target = mode(img.mode) if callable(mode) else mode
            shown = ImageOps.exif_transpose(img) if orient else img
            return np.array(shown.convert(target) if target else shown)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from e


EXIF_ORIENTATION = 0x0112  # 1 = as stored; 2-8 = mirrored and/or turned; 5-8 swap width and height


def exif_orientation(path) -> tuple[int, tuple[int, int]]:
    """``(EXIF orientation, (H, W) as stored)`` of an image file; orientation 1 without a tag."""
    try:
        with Image.open(path) as img:
            return int(img.getexif().get(EXIF_ORIENTATION, 1) or 1), (img.height, img.width)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from e


def check_sample(image: np.ndarray, mask: np.ndarray, num_classes: int, where: str) -> None:
    """Raise DataError unless ``image`` (K,H,W) and ``mask`` (H,W) fit together and labels are valid."""
    if image.ndim != 3:
        raise DataError(f"{where}: image must have shape (channels, H, W), got {tuple(image.shape)}")
    if mask.shape != image.shape[1:]:
        raise DataError(
            f"{where}: mask shape {tuple(mask.shape)} does not match image shape {tuple(image.shape[1:])}"
        )
    if not np.isfinite(image).all():
        raise DataError(f"{where}: image contains NaN or infinite values")
    values = np.unique(mask)
    bad = values[((values < 0) | (values >= num_classes)) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DataError(
            f"{where}: label values {bad.tolist()} outside [0, {num_classes}) "
            f"(only {IGNORE_INDEX} may mark ignored pixels)"
        )


def seeded_split(n: int, held_out: Sequence[int], seed: int) -> list[list[int]]:
    """Indices ``0..n-1`` split by one permutation drawn from ``seed``: ``[rest, part_1, ...]``,
    where part k takes the next ``held_out[k]`` positions of the permutation and ``rest`` the
    remaining ones; each list sorted.

    Every source holds out its validation (and MSD its test) split through this one function,
    so a seed picks the same items whichever source asks."""
    order = np.random.default_rng(seed).permutation(n)
    parts, start = [], 0
    for size in held_out:
        parts.append(sorted(order[start : start + size].tolist()))
        start += size
    return [sorted(order[start:].tolist()), *parts]


def split_transform(split: str, augment: Augment | None, size):
    """``(transform, size)`` for a split's samples: train is augmented and, when ``augment``
    crops, cropped to ``augment.crop_size``; val/test get no transform and keep ``size``."""
    if split != "train" or augment is None:
        return None, size
    return augment, augment.crop_size or size


def sample(image: torch.Tensor, mask: torch.Tensor, sample_id: str, transform=None, size=None) -> dict:
    """One DataModule sample: ``transform`` (train-time augmentation) then ``fit_to(size)``."""
    if transform is not None:
        image, mask = transform(image, mask)
    image, mask = fit_to(image, mask, size)
    return {"image": image.contiguous(), "mask": mask.contiguous(), "id": sample_id}


class ArraySegmentationDataset(Dataset):
    """Images ``(N,K,H,W)`` float32 and masks ``(N,H,W)`` integer held in memory.

    ``transform(image, mask)`` (e.g. ``Augment``, train split only) runs on each sample, then
    ``fit_to(size)`` pads/crops it to a fixed ``(H, W)`` (``None``: as stored).
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, ids: list[str], transform=None, size=None):
        self.images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        self.masks = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.int64))
        self.ids = list(ids)
        self.transform, self.size = transform, size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        if self.transform is None and self.size is None:
            return {"image": self.images[index], "mask": self.masks[index], "id": self.ids[index]}
        return sample(self.images[index], self.masks[index], self.ids[index], self.transform, self.size)


def evaluation_loader(datamodule: pl.LightningDataModule, split: str) -> DataLoader:
    """The loader a split is tested on: whole subjects, one per batch, for a volumetric source
    (one with ``volume_dataloader``, e.g. msd: scored per volume and per slice), else the
    split's own loader."""
    volumes = getattr(datamodule, "volume_dataloader", None)
    if volumes is not None:
        return volumes(split)
    return datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()


class SplitDataModule(pl.LightningDataModule):
    """Loaders over ``self.datasets[split]`` (set in ``setup``): train shuffled, val/test in order.

    Subclasses set ``datasets``, ``batch_size`` and ``num_workers``.
    """

    datasets: dict[str, Dataset]
    batch_size: int
    num_workers: int

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
