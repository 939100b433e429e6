"""Image/mask pairs from folders: ``root/{train,val,test}/{img,gt}/`` (the layout of the
original U-Net/CRF-RNN code). Pairs are matched by file stem; ``val`` is optional and is
then split off ``train`` by seed. Masks hold class indices, or any values mapped to
classes with ``mask_values`` (e.g. ``{0: 0, 255: 1}`` for 0/255 binary masks).

Images may be PNG, JPEG, TIFF or BMP: 8-bit images are scaled by 1/255, 16-bit by 1/65535,
float (TIFF mode ``F``) kept as stored. Images may differ in size: every sample is padded
(bottom/right; image 0, mask 255 = ignored) or centre-cropped to ``pad_to``, by default the
largest image of the dataset, so a batch shares one size. ``augment`` (train split only)
is an ``Augment`` or its arguments; see ``segrefine.data.transforms``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from segrefine.data.common import (ArraySegmentationDataset, DataError, SplitDataModule, check_sample, exif_orientation,
                                   open_image, seeded_split, split_transform)
from segrefine.data.transforms import build_augment, fit_to, parse_size
from segrefine.types import IGNORE_INDEX

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def _files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in files:  # pairs match by stem: which of the two is meant?
            raise DataError(f"{files[path.stem]} and {path} share the stem {path.stem!r}; keep one of them")
        files[path.stem] = path
    return files


MASK_ROUNDING = 1e-3  # the farthest a float mask value may be from a whole class index


def round_mask(values: np.ndarray, path: Path) -> np.ndarray:
    """A float mask as integers, rounded to the nearest; refused when a value is not within
    ``MASK_ROUNDING`` of one (a resampled or soft mask is not a label map)."""
    if not np.isfinite(values).all():
        raise DataError(f"{path}: mask holds NaN or infinite values")
    rounded = np.rint(values)
    off = np.abs(values - rounded)
    if off.max() > MASK_ROUNDING:
        worst = values.flat[int(off.argmax())]
        raise DataError(f"{path}: float mask value {worst:g} is {off.max():.3g} from the nearest whole class index "
                        f"(at most {MASK_ROUNDING:g} is rounded): save masks as integer class indices")
    return rounded.astype(np.int64)


def check_orientations(image_path: Path, mask_path: Path) -> None:
    """Image and mask are read turned as their EXIF orientation says (as a viewer shows them,
    which is what a mask is drawn on). Refused when that leaves it open which way the mask
    was drawn: different orientations, except an untagged mask whose shape fits only the
    image as shown (turned by 90 degrees) and not as stored."""
    image_tag, stored = exif_orientation(image_path)
    mask_tag, mask_shape = exif_orientation(mask_path)
    if image_tag == mask_tag:
        return
    shown = stored[::-1] if image_tag >= 5 else stored
    if mask_tag == 1 and mask_shape == shown != stored:
        return
    raise DataError(
        f"{mask_path} has EXIF orientation {mask_tag} but its image {image_path} has {image_tag}: it cannot be told "
        "whether the mask was drawn on the image as stored or as shown. Save both the same way (e.g. write the "
        "image's rotation into its pixels and drop its EXIF orientation)")


def read_image(path: Path, channels: int) -> np.ndarray:
    """``(channels, H, W)`` float32: 8-bit / 255, 16-bit / 65535, float as stored."""

    def keep_or_convert(mode: str) -> str | None:  # 16/32-bit integer (I*) and float (F) grayscale: as stored
        return None if mode.startswith("I") or mode == "F" else ("L" if channels == 1 else "RGB")

    array = open_image(path, keep_or_convert, orient=True)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    else:
        if np.issubdtype(array.dtype, np.integer):
            array = array.astype(np.float32) / 65535.0
        array = array.astype(np.float32)[None]
        array = array if channels == 1 else np.repeat(array, 3, axis=0)
    return np.ascontiguousarray(array)


class FolderDataModule(SplitDataModule):
    def __init__(
        self,
        root: str,
        num_classes: int,
        name: str = "folder",
        channels: int = 1,
        class_names: list[str] | None = None,
        mask_values: dict[int, int] | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        pad_to: Sequence[int] | None = None,
        augment: Any = None,
        batch_size: int = 8,
        num_workers: int = 0,
    ):
        super().__init__()
        if channels not in (1, 3):
            raise DataError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.root = Path(root)
        self.name, self.num_classes, self.in_channels = name, num_classes, channels
        self.class_names = list(class_names) if class_names else ["background"] + [f"class{c}" for c in range(1, num_classes)]
        if len(self.class_names) != num_classes:
            raise DataError(f"data.class_names has {len(self.class_names)} names but data.num_classes={num_classes}")
        self.mask_values = {int(k): int(v) for k, v in (mask_values or {}).items()}
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.pad_to = parse_size(pad_to, "data.pad_to")
        self.augment = build_augment(augment)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.size: tuple[int, int] | None = None
        self.datasets: dict[str, ArraySegmentationDataset] = {}

    def _pairs(self, split: str) -> list[tuple[str, Path, Path]]:
        img_dir, gt_dir = self.root / split / "img", self.root / split / "gt"
        for folder in (img_dir, gt_dir):
            if not folder.is_dir():
                raise DataError(f"data folder {folder} does not exist (expected {self.root}/{split}/{{img,gt}}/)")
        images, masks = _files(img_dir), _files(gt_dir)
        if not images:
            raise DataError(f"data folder {img_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        unmatched = sorted(str(images[s]) for s in images.keys() - masks.keys()) + sorted(
            str(masks[s]) for s in masks.keys() - images.keys()
        )
        if unmatched:
            raise DataError(f"files without a partner of the same stem in {self.root / split}: {', '.join(unmatched)}")
        return [(stem, images[stem], masks[stem]) for stem in sorted(images)]

    def _mask(self, path: Path) -> np.ndarray:
        raw = open_image(path, orient=True)
        if raw.ndim != 2:
            raise DataError(f"{path}: mask must be a single-channel image, got shape {raw.shape}")
        if np.issubdtype(raw.dtype, np.floating):  # float TIFF: round, never truncate (0.9999 is class 1)
            raw = round_mask(raw, path)
        if not self.mask_values:
            return raw.astype(np.int64)
        mask = np.full(raw.shape, -1, dtype=np.int64)
        for value, cls in self.mask_values.items():
            mask[raw == value] = cls
        if IGNORE_INDEX not in self.mask_values:
            mask[raw == IGNORE_INDEX] = IGNORE_INDEX
        unknown = np.unique(raw[mask == -1])
        if unknown.size:
            raise DataError(f"{path}: mask values {unknown.tolist()} are not in data.mask_values {self.mask_values}")
        return mask

    def _read(self, split: str, pairs: list[tuple[str, Path, Path]]) -> list[tuple[np.ndarray, np.ndarray]]:
        samples = []
        for stem, img_path, gt_path in tqdm(pairs, desc=f"reading {self.name}/{split}", leave=False):
            check_orientations(img_path, gt_path)
            image = read_image(img_path, self.in_channels)
            mask = self._mask(gt_path)
            check_sample(image, mask, self.num_classes, str(gt_path))
            samples.append((image, mask))
        return samples

    def _check_not_binary_255(self, samples: dict[str, list[tuple[np.ndarray, np.ndarray]]]) -> None:
        """Masks saved as 0/255 read as class indices would make every foreground pixel
        "ignored" (255) and train on background alone: refuse, naming the fix."""
        if self.mask_values:
            return
        values = set()
        for split_samples in samples.values():
            for _, mask in split_samples:
                values.update(np.unique(mask).tolist())
        if values == {0, IGNORE_INDEX}:
            raise DataError(
                f"every mask under {self.root} holds only the values 0 and {IGNORE_INDEX}: read as class indices all "
                f"foreground would be ignored. For 0/255 masks pass data.mask_values='{{0: 0, 255: 1}}'"
            )

    def _dataset(self, split: str, pairs, samples, size: tuple[int, int]) -> ArraySegmentationDataset:
        padded = [fit_to(torch.from_numpy(image), torch.from_numpy(mask), size) for image, mask in samples]
        transform, crop = split_transform(split, self.augment, None)  # already padded to ``size``
        return ArraySegmentationDataset(
            torch.stack([p[0] for p in padded]).numpy(),
            torch.stack([p[1] for p in padded]).numpy(),
            [stem for stem, _, _ in pairs],
            transform=transform,
            size=crop,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if not self.root.is_dir():
            raise DataError(f"data.root={str(self.root)!r} does not exist")
        train = self._pairs("train")
        if (self.root / "val").exists():
            val = self._pairs("val")
        else:
            if len(train) < 2:
                raise DataError(f"{self.root / 'train'} holds {len(train)} pair(s): too few to split off a validation set "
                                f"(add {self.root / 'val'}/{{img,gt}}/)")
            n_val = min(len(train) - 1, max(1, round(self.val_fraction * len(train))))
            keep, held_out = seeded_split(len(train), [n_val], self.split_seed)
            train, val = [train[i] for i in keep], [train[i] for i in held_out]
        splits = {"train": train, "val": val, "test": self._pairs("test")}
        samples = {split: self._read(split, pairs) for split, pairs in splits.items()}
        self._check_not_binary_255(samples)
        shapes = {m.shape for split_samples in samples.values() for _, m in split_samples}
        self.size = self.pad_to or (max(h for h, _ in shapes), max(w for _, w in shapes))
        if len(shapes) > 1 or self.pad_to:
            log.info("%s: images of %d sizes, padded/cropped to %s", self.root, len(shapes), list(self.size))
        self.datasets = {split: self._dataset(split, splits[split], samples[split], self.size) for split in splits}
