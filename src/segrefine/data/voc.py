"""Pascal VOC 2012 segmentation through ``torchvision.datasets.VOCSegmentation``, from a local copy.

``data.root`` is the folder holding ``VOCdevkit/VOC2012/`` (``VOCdevkit`` or ``VOC2012``
itself is accepted too), with ``JPEGImages/``, ``SegmentationClass/`` (palette PNGs: class
index per pixel, 255 on object boundaries = ignored) and ``ImageSets/Segmentation/{train,val}.txt``.
Get it once with ``data.download=true`` (torchvision fetches the 2 GB VOCtrainval_11-May-2012.tar)
or unpack that tar yourself; nothing is downloaded by default.

VOC has no public test labels, so the official ``val`` list is the test split here, and a
validation split (``val_fraction`` of ``train``, chosen by ``split_seed``) is held out of
``train`` for model selection. 21 classes (background + 20), RGB, normalised with
``mean``/``std`` (ImageNet's by default). Images are at most 500x500: every split is padded
(bottom/right; image 0, mask 255) to ``pad_to``; training samples are augmented and
randomly cropped to ``augment.crop_size`` when set.

Images are decoded lazily per sample (nothing is cached); ``setup`` reads only the file
headers, so missing files, unreadable headers and image/mask size mismatches fail early,
naming the file. Label values are checked as each mask is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from segrefine.data.common import DataError, SplitDataModule, check_sample, open_image, sample, seeded_split, split_transform
from segrefine.data.transforms import build_augment, parse_size

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _voc_parent(root: Path, year: str) -> Path:
    """The folder that holds ``VOCdevkit/VOC<year>`` (torchvision's ``root``); ``root`` may also be
    ``VOCdevkit`` or ``VOC<year>`` itself."""
    if root.name == f"VOC{year}" and root.parent.name == "VOCdevkit":
        return root.parent.parent
    if root.name == "VOCdevkit":
        return root.parent
    return root


class VOCFiles(Dataset):
    """Image/mask file pairs decoded on demand into the DataModule sample format."""

    def __init__(self, images: list[str], masks: list[str], ids: list[str], mean, std, num_classes: int,
                 transform=None, size=None):
        self.images, self.masks, self.ids = images, masks, ids
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.num_classes, self.transform, self.size = num_classes, transform, size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        image = open_image(self.images[i], "RGB")
        mask = open_image(self.masks[i])
        if mask.ndim != 2:
            raise DataError(f"{self.masks[i]}: mask must be a palette (index) PNG, got shape {mask.shape}")
        image = image.transpose(2, 0, 1)
        check_sample(image, mask, self.num_classes, self.masks[i])
        tensor = (torch.from_numpy(image.astype(np.float32) / 255.0) - self.mean) / self.std
        return sample(tensor, torch.from_numpy(mask.astype(np.int64)), self.ids[i], self.transform, self.size)


def _header_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from e


class VOCDataModule(SplitDataModule):
    def __init__(
        self,
        root: str,
        name: str = "voc",
        year: str = "2012",
        download: bool = False,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        pad_to: Sequence[int] | None = (512, 512),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: Any = None,
        batch_size: int = 8,
        num_workers: int = 0,
    ):
        super().__init__()
        self.root, self.name, self.year, self.download = Path(root), name, str(year), download
        self.num_classes, self.in_channels, self.class_names = len(VOC_CLASSES), 3, list(VOC_CLASSES)
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise DataError(f"data.mean and data.std must have 3 values (RGB), std > 0; got {list(mean)}, {list(std)}")
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.pad_to = parse_size(pad_to, "data.pad_to")
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.augment = build_augment(augment)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.size: tuple[int, int] | None = None
        self.datasets: dict[str, VOCFiles] = {}

    def _official(self, image_set: str):
        from torchvision.datasets import VOCSegmentation

        parent = _voc_parent(self.root, self.year)
        base = parent / "VOCdevkit" / f"VOC{self.year}"
        if not self.root.exists():
            raise DataError(f"data.root={str(self.root)!r} does not exist (expected a folder holding VOCdevkit/VOC{self.year}/)")
        if not base.is_dir():
            raise DataError(f"{base} does not exist: data.root must hold VOCdevkit/VOC{self.year}/ "
                            "(unpack VOCtrainval_11-May-2012.tar there, or set data.download=true)")
        listing = base / "ImageSets" / "Segmentation" / f"{image_set}.txt"
        if not listing.is_file():
            raise DataError(f"{listing} does not exist (the official {image_set} list of VOC{self.year} segmentation)")
        try:
            dataset = VOCSegmentation(str(parent), year=self.year, image_set=image_set, download=False)
        except (RuntimeError, OSError) as e:
            raise DataError(f"{base}: cannot index VOC {image_set} ({e})") from e
        ids = [Path(p).stem for p in dataset.images]
        if not ids:
            raise DataError(f"{base}/ImageSets/Segmentation/{image_set}.txt lists no images")
        return list(dataset.images), list(dataset.masks), ids

    def _check(self, split: str, images: list[str], masks: list[str]) -> list[tuple[int, int]]:
        """Existence, readable headers and equal image/mask sizes; returns the (H, W) sizes."""
        missing = [p for p in (*images, *masks) if not Path(p).is_file()]
        if missing:
            raise DataError(f"{len(missing)} file(s) of VOC {split} are missing: {', '.join(missing[:20])}"
                            + (" ..." if len(missing) > 20 else ""))
        sizes = []
        for image, mask in tqdm(list(zip(images, masks)), desc=f"indexing {self.name}/{split}", leave=False):
            w, h = _header_size(image)
            mw, mh = _header_size(mask)
            if (mh, mw) != (h, w):
                raise DataError(f"{mask}: mask shape {(mh, mw)} does not match image shape {(h, w)}")
            sizes.append((h, w))
        return sizes

    def prepare_data(self) -> None:
        if self.download:  # torchvision skips the download when the tar is there, and unpacks it
            from torchvision.datasets import VOCSegmentation

            parent = _voc_parent(self.root, self.year)
            parent.mkdir(parents=True, exist_ok=True)
            try:
                VOCSegmentation(str(parent), year=self.year, image_set="train", download=True)
            except Exception as e:  # network errors vary
                raise DataError(f"cannot download VOC{self.year} into {parent} ({e})") from e

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        train_images, train_masks, train_ids = self._official("train")
        test_images, test_masks, test_ids = self._official("val")
        n_val = max(1, round(self.val_fraction * len(train_ids)))
        if n_val >= len(train_ids):
            raise DataError(f"VOC train lists {len(train_ids)} image(s): too few to hold out data.val_fraction={self.val_fraction}")
        keep, held_out = seeded_split(len(train_ids), [n_val], self.split_seed)
        pick = lambda idx: tuple([seq[i] for i in idx] for seq in (train_images, train_masks, train_ids))  # noqa: E731
        splits = {"train": pick(keep), "val": pick(held_out), "test": (test_images, test_masks, test_ids)}
        sizes = {split: self._check(split, images, masks) for split, (images, masks, _) in splits.items()}
        every = [s for split_sizes in sizes.values() for s in split_sizes]
        self.size = self.pad_to or (max(h for h, _ in every), max(w for _, w in every))
        for split, (images, masks, ids) in splits.items():
            transform, size = split_transform(split, self.augment, self.size)
            self.datasets[split] = VOCFiles(images, masks, ids, self.mean, self.std, self.num_classes,
                                            transform=transform, size=size)
