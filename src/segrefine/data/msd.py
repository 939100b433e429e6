"""Medical Segmentation Decathlon tasks as 2D slices: ``data=msd data.root=/path/to/Task04_Hippocampus``.

A task folder holds ``dataset.json`` (its ``labels`` mapping gives the class names, its
``training`` list the image/label pairs), ``imagesTr/*.nii.gz`` and ``labelsTr/*.nii.gz``
(``imagesTs`` has no labels and is not used). Each volume is

1. read with nibabel and brought to the closest canonical (RAS+) orientation, so
   ``axis`` 0/1/2 means sagittal/coronal/axial whatever the file's affine;
2. reduced to the chosen ``modality`` channel(s) (4D multi-modal tasks);
3. normalised per volume and channel: percentile clip, then z-score or min-max;
4. cut into 2D slices along ``axis``, cached as ``.npy`` (memory-mapped when read).

The cache lives in ``cache_dir/<task>-<settings hash>/`` (the hash covers everything that
changes the decoded slices: axis, modality, normalisation); each volume's files are named
by a hash of its source files' paths, sizes and modification times, so editing a volume
re-decodes just that volume and changing a setting starts a fresh folder. Later epochs and
runs never decode NIfTI again.

Subjects (not slices) are split into train/val/test by ``split_seed``, so no subject is in
two splits. Slices without foreground are kept at ``empty_slice_fraction`` (chosen per
subject by ``split_seed``, in every split, so every run sees the same slices). Sample ids
are ``<subject>_<axis letter><slice>``, e.g. ``hippocampus_001_z017``. Slices are padded
(bottom/right; image 0, mask 255 = ignored) or centre-cropped to ``pad_to`` so a batch
shares one size; ``pad_to: null`` uses the largest slice of the task.

Every slice knows its volume: samples carry ``subject``, ``slice`` (index along ``axis``) and
``spacing`` = ``(sz, sy, sx)``, the voxel size in mm along the slicing axis and the slice's rows
and columns, from the affine after reorientation. ``volume_dataloader(split)`` yields whole
subjects for evaluation per volume (``segrefine.module``): one batch per subject with every
slice in order (``scored`` marks the slices the split's slice loader holds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from segrefine.atomic import atomic_open, atomic_write_text
from segrefine.data.common import DataError, SplitDataModule, sample, seeded_split, split_transform
from segrefine.data.transforms import build_augment, fit_to, parse_size
from segrefine.validation import MAX_CLASSES

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
AXES = {"x": 0, "y": 1, "z": 2, "sagittal": 0, "coronal": 1, "axial": 2}
NORMALISATIONS = ("zscore", "minmax", "none")


@dataclass(frozen=True)
class Case:
    subject: str
    image: Path
    label: Path


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_task(root: Path) -> tuple[list[str], dict[str, str], list[Case]]:
    """``(class_names, modalities, cases)`` of an MSD task folder; DataError naming what is wrong."""
    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r} does not exist (expected an MSD task folder with dataset.json)")
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} does not exist; data.root must be an MSD task folder (dataset.json, imagesTr/, labelsTr/)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path}: cannot read JSON ({e})") from e
    class_names = _class_names(meta.get("labels"), meta_path)
    modalities = {str(k): str(v) for k, v in (meta.get("modality") or meta.get("channel_names") or {"0": "image"}).items()}

    if meta.get("training"):
        cases = []
        for i, entry in enumerate(meta["training"]):
            try:
                image, label = root / entry["image"], root / entry["label"]
            except (TypeError, KeyError) as e:
                raise DataError(f"{meta_path}: training[{i}] needs 'image' and 'label' paths, got {entry!r}") from e
            cases.append(Case(_stem(image), image, label))
    else:  # no list: pair imagesTr/labelsTr by name (skipping macOS '._' metadata files)
        images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
        for folder in (images_dir, labels_dir):
            if not folder.is_dir():
                raise DataError(f"data folder {folder} does not exist (expected {root}/{{imagesTr,labelsTr}}/)")
        images = {_stem(p): p for p in images_dir.glob("*.nii*") if not p.name.startswith(".")}
        labels = {_stem(p): p for p in labels_dir.glob("*.nii*") if not p.name.startswith(".")}
        unmatched = sorted(str(images[s]) for s in images.keys() - labels.keys()) + sorted(
            str(labels[s]) for s in labels.keys() - images.keys()
        )
        if unmatched:
            raise DataError(f"files without a partner of the same name in {root}: {', '.join(unmatched)}")
        cases = [Case(s, images[s], labels[s]) for s in sorted(images)]
    if not cases:
        raise DataError(f"{root} holds no training volumes (dataset.json 'training' is empty and imagesTr/ has no .nii.gz)")
    missing = [str(p) for c in cases for p in (c.image, c.label) if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} file(s) listed in {meta_path} are missing: {', '.join(missing[:20])}"
                        + (" ..." if len(missing) > 20 else ""))
    subjects = [c.subject for c in cases]
    if len(set(subjects)) != len(subjects):
        dupes = sorted({s for s in subjects if subjects.count(s) > 1})
        raise DataError(f"{meta_path}: subjects listed more than once: {dupes}")
    return class_names, modalities, sorted(cases, key=lambda c: c.subject)


def _class_names(labels: Any, meta_path: Path) -> list[str]:
    """MSD ``{"0": "background", ...}`` or nnU-Net v2 ``{"background": 0, ...}`` -> names by index."""
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{meta_path}: needs a 'labels' mapping of class index to name, e.g. {{\"0\": \"background\"}}")
    try:
        if all(str(k).strip().isdigit() for k in labels):
            by_index = {int(k): str(v) for k, v in labels.items()}
        else:
            by_index = {int(v): str(k) for k, v in labels.items()}
    except (TypeError, ValueError) as e:
        raise DataError(f"{meta_path}: 'labels' must map class indices to names, got {labels!r}") from e
    if sorted(by_index) != list(range(len(by_index))):
        raise DataError(f"{meta_path}: label indices must be 0..{len(by_index) - 1} without gaps, got {sorted(by_index)}")
    if len(by_index) > MAX_CLASSES:
        raise DataError(f"{meta_path}: {len(by_index)} classes; at most {MAX_CLASSES} are supported (class indices "
                        "must stay below 255, which marks ignored pixels)")
    return [by_index[i] for i in range(len(by_index))]


def source_signature(case: Case) -> str:
    """Hash of the case's source files: resolved paths, sizes and modification times."""
    parts = []
    for path in (case.image, case.label):
        stat = path.stat()
        parts += [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:12]


def _read_nifti(path: Path):
    import nibabel as nib

    try:
        return nib.as_closest_canonical(nib.load(str(path)))
    except Exception as e:  # nibabel raises many types for damaged files
        raise DataError(f"{path}: cannot read NIfTI volume ({type(e).__name__}: {e})") from e


def _data(img, path: Path, index=None, dtype=np.float32) -> np.ndarray:
    try:
        proxy = img.dataobj if index is None else img.dataobj[index]
        return np.asarray(proxy, dtype=dtype)
    except Exception as e:  # truncated gzip, short data, ...
        raise DataError(f"{path}: cannot read NIfTI volume data ({type(e).__name__}: {e})") from e


def _voxel_sizes(affine: np.ndarray, path: Path) -> np.ndarray:
    """Voxel sizes in mm along the affine's three axes: its column lengths, so an oblique affine
    gives true sizes."""
    from nibabel.affines import voxel_sizes

    sizes = voxel_sizes(np.asarray(affine, dtype=np.float64))
    if not (np.isfinite(sizes).all() and (sizes > 0).all()):
        raise DataError(f"{path}: the affine gives voxel sizes {sizes.tolist()} mm; positive finite sizes are needed "
                        "to measure distances in mm")
    return sizes


def _spacing(canonical_affine: np.ndarray, axis: int, path: Path) -> list[float]:
    """``[sz, sy, sx]`` in mm of a volume cut along ``axis``, from its affine after canonical
    reorientation: the voxel size along the slicing axis, then along the slice's rows and columns
    (the other two axes in order)."""
    return _slicing_order(_voxel_sizes(canonical_affine, path), axis)


def _slicing_order(sizes: np.ndarray, axis: int) -> list[float]:
    return [float(sizes[axis]), *(float(sizes[a]) for a in range(3) if a != axis)]


def slice_spacing(path: Path, axis: int) -> list[float]:
    """``_spacing`` of a NIfTI file from its header alone: the stored axes' voxel sizes taken in
    the order canonical reorientation (``nibabel.as_closest_canonical``) puts those axes, which
    only permutes and flips them."""
    import nibabel as nib
    from nibabel.orientations import io_orientation

    try:
        affine = nib.load(str(path)).affine
    except Exception as e:  # nibabel raises many types for damaged files
        raise DataError(f"{path}: cannot read NIfTI header ({type(e).__name__}: {e})") from e
    stored = _voxel_sizes(affine, path)
    target_axis = io_orientation(affine)[:, 0]  # stored axis i becomes canonical axis target_axis[i]
    if np.isnan(target_axis).any():
        raise DataError(f"{path}: the affine has no closest canonical orientation (its axes are degenerate)")
    sizes = np.empty(3)
    sizes[target_axis.astype(int)] = stored
    return _slicing_order(sizes, axis)


def normalise(volume: np.ndarray, method: str, clip: Sequence[float] | None) -> np.ndarray:
    """Percentile clip (``clip=[low, high]`` percentiles, or None) then z-score / min-max / none."""
    volume = volume.astype(np.float32, copy=False)
    if clip is not None:
        low, high = np.percentile(volume, [float(clip[0]), float(clip[1])])
        volume = np.clip(volume, low, high)
    if method == "zscore":
        volume = (volume - volume.mean()) / max(float(volume.std()), 1e-8)
    elif method == "minmax":
        low, high = float(volume.min()), float(volume.max())
        volume = (volume - low) / max(high - low, 1e-8)
    return volume.astype(np.float32, copy=False)


# Affines (voxel -> world, mm) of an image and its label may differ by header rounding, not more.
AFFINE_TOLERANCE = 1e-3


def check_same_grid(image_affine: np.ndarray, label_affine: np.ndarray, image: Path, label: Path) -> None:
    """A label lies on its image's voxel grid: after reorientation to RAS both affines agree
    within ``AFFINE_TOLERANCE`` (mm) plus float32 rounding. Otherwise its voxels would be
    paired with other image voxels (a flipped affine: mirrored), so it is refused."""
    image_affine, label_affine = np.asarray(image_affine, float), np.asarray(label_affine, float)
    if not np.allclose(image_affine, label_affine, rtol=1e-5, atol=AFFINE_TOLERANCE):
        difference = float(np.abs(image_affine - label_affine).max())
        raise DataError(f"{label} and its image {image} are on different voxel grids (their affines differ by up to "
                        f"{difference:.3g} mm; a flipped or shifted label header): fix the label's header (affine) "
                        "to its image's, or resample the label onto the image")


def load_case(case: Case, settings: dict, num_classes: int) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Image slices ``(S, K, H, W)`` float32, mask slices ``(S, H, W)`` uint8 and the slices'
    spacing ``[sz, sy, sx]`` mm (``_spacing``) of one volume."""
    axis, modality = settings["axis"], settings["modality"]
    img = _read_nifti(case.image)
    spatial = img.shape[:3]
    if len(img.shape) == 3 or (len(img.shape) == 4 and img.shape[3] == 1 and modality == [0]):
        if modality != [0]:
            raise DataError(f"{case.image}: a single-modality volume, but data.modality={modality}")
        channels = [_data(img, case.image, (slice(None),) * 3 + ((0,) if len(img.shape) == 4 else ()))]
    elif len(img.shape) == 4:
        bad = [m for m in modality if not 0 <= m < img.shape[3]]
        if bad:
            raise DataError(f"{case.image}: has {img.shape[3]} modalities, data.modality={modality} asks for {bad}")
        channels = [_data(img, case.image, (Ellipsis, m)) for m in modality]
    else:
        raise DataError(f"{case.image}: expected a 3D or 4D volume, got shape {img.shape}")
    for k, volume in enumerate(channels):
        if not np.isfinite(volume).all():
            raise DataError(f"{case.image}: modality {modality[k]} contains NaN or infinite values")
    image = np.stack([normalise(v, settings["normalise"], settings["clip_percentiles"]) for v in channels])  # K,X,Y,Z

    lab = _read_nifti(case.label)
    if tuple(lab.shape[:3]) != tuple(spatial) or (len(lab.shape) == 4 and lab.shape[3] != 1) or len(lab.shape) > 4:
        raise DataError(f"{case.label}: label volume shape {tuple(lab.shape)} does not match image "
                        f"{case.image.name} shape {tuple(spatial)} (after canonical reorientation)")
    check_same_grid(img.affine, lab.affine, case.image, case.label)
    labels = _data(lab, case.label, dtype=None)
    labels = labels.reshape(spatial)
    if not np.issubdtype(labels.dtype, np.integer):
        rounded = np.rint(labels)
        if not np.allclose(labels, rounded, atol=1e-3):
            raise DataError(f"{case.label}: label volume holds non-integer values")
        labels = rounded
    values = np.unique(labels)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise DataError(f"{case.label}: label values {[int(v) for v in bad]} are not in the class list "
                        f"(dataset.json labels 0..{num_classes - 1})")
    image = np.ascontiguousarray(np.moveaxis(image, axis + 1, 0))  # S,K,H,W
    mask = np.ascontiguousarray(np.moveaxis(labels.astype(np.uint8), axis, 0))  # S,H,W
    return image, mask, _spacing(img.affine, axis, case.image)


def _check_cached(paths: dict[str, Path], shape: list[int]) -> None:
    """Raise unless both cached arrays open (header and full length) with the shapes of their entry."""
    for key, expected in (("image.npy", shape), ("mask.npy", [shape[0], *shape[2:]])):
        array = np.load(paths[key], mmap_mode="r")  # a truncated file fails here (mmap needs every byte)
        if list(array.shape) != list(expected):
            raise ValueError(f"{paths[key].name}: shape {list(array.shape)} differs from its index {expected}")


class SliceDataset(Dataset):
    """2D slices of cached volumes, read from memory-mapped ``.npy`` files on demand.

    ``index`` lists ``(volume, slice)`` pairs; ``transform`` (train only) and ``size`` as in
    ``segrefine.data.common.sample``.
    """

    def __init__(self, files: list[tuple[Path, Path]], index: list[tuple[int, int]], ids: list[str],
                 transform=None, size=None, subjects: list[str] | None = None,
                 spacings: list[list[float]] | None = None):
        self.files, self.index, self.ids = files, index, ids
        self.transform, self.size = transform, size
        # per volume: its subject and voxel spacing (sz, sy, sx) in mm
        self.subjects, self.spacings = subjects, spacings
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict:  # worker processes re-open the memory maps themselves
        return {**self.__dict__, "_arrays": {}}

    def arrays(self, volume: int) -> tuple[np.ndarray, np.ndarray]:
        if volume not in self._arrays:
            pair = []
            for path in self.files[volume]:
                try:
                    pair.append(np.load(path, mmap_mode="r"))
                except Exception as e:
                    raise DataError(f"{path}: cannot read the cached volume ({e}); rerun: a damaged cache entry is rebuilt when the data is set up") from e
            self._arrays[volume] = (pair[0], pair[1])
        return self._arrays[volume]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        volume, s = self.index[i]
        images, masks = self.arrays(volume)
        image = torch.from_numpy(np.array(images[s], dtype=np.float32))
        mask = torch.from_numpy(masks[s].astype(np.int64))
        item = sample(image, mask, self.ids[i], self.transform, self.size)
        if self.subjects is not None:
            item.update(subject=self.subjects[volume], slice=s,
                        spacing=torch.tensor(self.spacings[volume], dtype=torch.float64))
        return item


class VolumeDataset(Dataset):
    """Whole subjects of a split, for evaluation per volume: item ``i`` is subject ``i`` with
    every slice in order, as one batch (use with ``DataLoader(batch_size=None)``).

    ``image (S, K, H, W)``, ``mask (S, H, W)``: the slices padded bottom/right to at least
    ``size`` (never cropped, so the volume is whole; slices that fit ``size`` look exactly as
    the slice loader gives them), ``height``/``width`` the slices' own size (the volume is
    ``[..., :height, :width]``), ``id`` the S slice ids, ``scored`` which slices the split's
    slice loader holds (``empty_slice_fraction``), ``subject``, ``spacing`` ``(sz, sy, sx)`` mm,
    ``batch_size`` how many slices the model sees at once, ``size`` the slice loader's size.
    """

    def __init__(self, slices: SliceDataset, keep: list[np.ndarray], letter: str, size, batch_size: int):
        self.slices, self.keep, self.letter, self.size, self.batch_size = slices, keep, letter, size, int(batch_size)

    def __len__(self) -> int:
        return len(self.slices.files)

    def __getitem__(self, volume: int) -> dict:
        images, masks = self.slices.arrays(volume)
        image = torch.from_numpy(np.array(images, dtype=np.float32))
        mask = torch.from_numpy(masks.astype(np.int64))
        height, width = mask.shape[-2:]
        if self.size is not None:
            image, mask = fit_to(image, mask, (max(height, self.size[0]), max(width, self.size[1])))
        subject = self.slices.subjects[volume]
        return {
            "image": image.contiguous(), "mask": mask.contiguous(),
            "id": [f"{subject}_{self.letter}{s:03d}" for s in range(len(mask))],
            "scored": torch.from_numpy(np.asarray(self.keep[volume], dtype=bool)),
            "subject": subject, "height": int(height), "width": int(width),
            "spacing": tuple(float(v) for v in self.slices.spacings[volume]),
            "batch_size": self.batch_size,  # slices the model sees at once (data.batch_size)
            "size": None if self.size is None else tuple(int(v) for v in self.size),  # the slice loader's size
        }


def split_subjects(subjects: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Disjoint train/val/test subject lists, deterministic given ``seed`` and the subject set."""
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"data.split_fractions must be three fractions (train, val, test) summing to 1, got {fractions}")
    subjects = sorted(subjects)
    n = len(subjects)
    n_val = max(1, round(fractions[1] * n)) if fractions[1] > 0 else 0
    n_test = max(1, round(fractions[2] * n)) if fractions[2] > 0 else 0
    if n - n_val - n_test < 1:
        raise DataError(f"{n} subject(s) cannot be split into train/val/test with data.split_fractions={fractions}")
    parts = seeded_split(n, [n_val, n_test], seed)
    return {split: [subjects[i] for i in part] for split, part in zip(SPLITS, parts)}


class MSDDataModule(SplitDataModule):
    def __init__(
        self,
        root: str,
        name: str = "msd",
        cache_dir: str | None = None,
        axis: int | str = 2,
        modality: int | Sequence[int] = 0,
        normalise: str = "zscore",
        clip_percentiles: Sequence[float] | None = (0.5, 99.5),
        empty_slice_fraction: float = 0.1,
        split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
        split_seed: int = 0,
        pad_to: Sequence[int] | None = None,
        augment: Any = None,
        batch_size: int = 16,
        num_workers: int = 0,
    ):
        super().__init__()
        self.root, self.name = Path(root), name
        if isinstance(axis, str):
            if axis.lower() not in AXES:
                raise DataError(f"data.axis must be 0/1/2 or one of {sorted(AXES)}, got {axis!r}")
            axis = AXES[axis.lower()]
        if axis not in (0, 1, 2):
            raise DataError(f"data.axis must be 0 (sagittal), 1 (coronal) or 2 (axial), got {axis}")
        modality = [int(modality)] if isinstance(modality, (int, str)) else [int(m) for m in modality]
        if not modality:
            raise DataError("data.modality must name at least one channel")
        if normalise not in NORMALISATIONS:
            raise DataError(f"data.normalise must be one of {NORMALISATIONS}, got {normalise!r}")
        clip = None if clip_percentiles is None else [float(p) for p in clip_percentiles]
        if clip is not None and not (len(clip) == 2 and 0 <= clip[0] < clip[1] <= 100):
            raise DataError(f"data.clip_percentiles must be [low, high] with 0 <= low < high <= 100, got {clip}")
        if not 0.0 <= empty_slice_fraction <= 1.0:
            raise DataError(f"data.empty_slice_fraction must be in [0, 1], got {empty_slice_fraction}")
        self.settings = {"version": FORMAT_VERSION, "axis": axis, "modality": modality,
                         "normalise": normalise, "clip_percentiles": clip}
        self.axis, self.in_channels = axis, len(modality)
        self.empty_slice_fraction = float(empty_slice_fraction)
        self.split_fractions, self.split_seed = list(split_fractions), int(split_seed)
        self.pad_to = parse_size(pad_to, "data.pad_to")
        self.augment = build_augment(augment)
        self.batch_size, self.num_workers = batch_size, num_workers
        digest = hashlib.sha1(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]
        self.cache_root = Path(cache_dir) if cache_dir else self.root / ".segrefine-cache"
        self.cache_dir = self.cache_root / f"{self.root.resolve().name}-{digest}"
        self.num_classes: int | None = None
        self.class_names: list[str] | None = None
        self.modalities: dict[str, str] = {}
        self.splits: dict[str, list[str]] = {}
        self.size: tuple[int, int] | None = None
        self.datasets: dict[str, SliceDataset] = {}
        self.volume_datasets: dict[str, VolumeDataset] = {}

    # -- cache ---------------------------------------------------------------------
    def _paths(self, case: Case, signature: str) -> dict[str, Path]:
        base = f"{case.subject}-{signature}"
        return {k: self.cache_dir / f"{base}.{k}" for k in ("image.npy", "mask.npy", "json")}

    def _cache(self) -> dict[str, dict]:
        """Decode every volume not yet cached (with a progress bar); return each subject's cache entry."""
        class_names, self.modalities, cases = read_task(self.root)
        self.class_names, self.num_classes = class_names, len(class_names)
        entries, todo = {}, []
        for case in cases:
            paths = self._paths(case, source_signature(case))
            if paths["json"].is_file():
                try:
                    entry = json.loads(paths["json"].read_text())
                    _check_cached(paths, entry["shape"])
                    if "spacing" not in entry:  # cached before slices knew their spacing: the header suffices
                        entry["spacing"] = slice_spacing(case.image, self.axis)
                        atomic_write_text(paths["json"], json.dumps(entry))
                    entries[case.subject] = {**entry, "paths": paths, "case": case}
                    continue
                except (ValueError, KeyError, OSError, TypeError) as e:
                    log.warning("cached volume of %s is damaged (%s): rebuilding it", case.subject, e)
            todo.append((case, paths))
        if todo:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            settings_file = self.cache_dir / "settings.json"
            if not settings_file.exists():
                atomic_write_text(settings_file, json.dumps({**self.settings, "root": str(self.root.resolve())}, indent=2))
            for case, paths in tqdm(todo, desc=f"caching {self.name}/{self.root.name} slices", unit="volume", leave=False):
                entries[case.subject] = {**self._write(case, paths), "paths": paths, "case": case}
        return entries

    def _write(self, case: Case, paths: dict[str, Path]) -> dict:
        image, mask, spacing = load_case(case, self.settings, self.num_classes)
        # Files of this subject from older sources go first (same-length hash, so no prefix clashes).
        for old in self.cache_dir.glob(f"{case.subject}-{'[0-9a-f]' * 12}.*"):
            if old not in paths.values():
                old.unlink(missing_ok=True)
        for key, array in (("image.npy", image), ("mask.npy", mask)):
            with atomic_open(paths[key], "wb") as f:
                np.save(f, array)
        entry = {
            "subject": case.subject,
            "image": str(case.image),
            "label": str(case.label),
            "shape": list(image.shape),
            "foreground": [bool(m.any()) for m in mask],
            "label_values": [int(v) for v in np.unique(mask)],
            "spacing": spacing,
        }
        atomic_write_text(paths["json"], json.dumps(entry))  # last: its presence marks a complete entry
        return entry

    # -- LightningDataModule -----------------------------------------------------------
    def prepare_data(self) -> None:
        self._cache()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        entries = self._cache()  # a no-op when prepare_data ran; needed when it did not
        for entry in entries.values():
            bad = [v for v in entry["label_values"] if v >= self.num_classes]
            if bad:
                raise DataError(f"{entry['label']}: label values {bad} are not in the class list "
                                f"(dataset.json labels 0..{self.num_classes - 1})")
        self.splits = split_subjects(list(entries), self.split_fractions, self.split_seed)
        shapes = [e["shape"][2:] for e in entries.values()]
        self.size = self.pad_to or (max(s[0] for s in shapes), max(s[1] for s in shapes))
        if self.pad_to:
            cropped = sum(1 for s in shapes if s[0] > self.size[0] or s[1] > self.size[1])
            if cropped:
                log.warning("%d volume(s) have slices larger than data.pad_to=%s; they are centre-cropped", cropped, list(self.size))
        letter = "xyz"[self.axis]
        for split, subjects in self.splits.items():
            files, index, ids, kept = [], [], [], []
            for subject in subjects:
                entry = entries[subject]
                foreground = np.asarray(entry["foreground"], dtype=bool)
                rng = np.random.default_rng([self.split_seed, zlib.crc32(subject.encode())])
                keep = foreground | (rng.random(len(foreground)) < self.empty_slice_fraction)
                kept.append(keep)
                volume = len(files)
                files.append((entry["paths"]["image.npy"], entry["paths"]["mask.npy"]))
                for s in np.flatnonzero(keep):
                    index.append((volume, int(s)))
                    ids.append(f"{subject}_{letter}{s:03d}")
            if not index:
                raise DataError(f"split {split!r} of {self.root} has no slices "
                                f"(subjects {subjects}; raise data.empty_slice_fraction?)")
            transform, size = split_transform(split, self.augment, self.size)
            dataset = SliceDataset(files, index, ids, transform=transform, size=size, subjects=list(subjects),
                                   spacings=[entries[subject]["spacing"] for subject in subjects])
            for volume in range(len(files)):  # fail now, naming the file, if the cache is damaged
                images, masks = dataset.arrays(volume)
                expected = entries[subjects[volume]]["shape"]
                if list(images.shape) != expected or list(masks.shape) != [expected[0], *expected[2:]]:
                    raise DataError(f"{files[volume][0]}: cached shape {list(images.shape)} differs from its "
                                    f"index {expected}; delete {self.cache_dir} to rebuild it")
            self.datasets[split] = dataset
            self.volume_datasets[split] = VolumeDataset(dataset, kept, letter, self.size, self.batch_size)

    def volume_dataloader(self, split: str) -> DataLoader:
        """Whole subjects of ``split`` in order, one per batch (see :class:`VolumeDataset`)."""
        return DataLoader(self.volume_datasets[split], batch_size=None, shuffle=False, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)
