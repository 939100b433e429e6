"""The built-in dataset: medical-like grayscale slices, generated, never downloaded.

Each image holds a bright elliptical "body" on a dark field (both background, class 0)
and star-shaped blobs of the foreground classes. Class intensity distributions overlap
(noise, bias field, per-image contrast jitter), so a pixel's value alone is ambiguous;
label boundaries coincide with intensity edges, softened by partial-volume blur, so a
model that uses edges and context does better than one that thresholds.

``boundary_contrast`` (1 by default: the data above) moves the classes' difference from
mean intensity into texture: class means are spread by ``boundary_contrast * class_contrast``,
and each structure class gets an oriented grating (period 6 px, class-specific orientation,
random phase) of amplitude ``(1 - boundary_contrast) * class_contrast``, whose mean over a
region is ~0. The label maps are the same at every setting (texture draws use a spawned
generator), so runs at different settings see the same shapes. At 0 a structure's boundary is not an intensity edge at all (only a change of
texture), so a CRF whose pairwise term follows intensity edges gets no help from the data.

Generated once per setting and cached as ``.npz`` under ``root/<settings hash>/``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm

from segrefine.atomic import atomic_open, atomic_write_text
from segrefine.data.common import ArraySegmentationDataset, DataError, SplitDataModule, check_sample

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
TEXTURE_PERIOD = 6.0  # pixels; a change here changes the data: bump FORMAT_VERSION


def _smooth_field(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean smooth random field scaled to [-1, 1]."""
    field = gaussian_filter(rng.standard_normal((size, size)), sigma, mode="reflect")
    field -= field.mean()
    return field / (np.abs(field).max() + 1e-8)


def _star_blob(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, centre, radius: float) -> np.ndarray:
    """Boolean mask of a star-shaped region r < radius * (1 + low-order angular wobble)."""
    dy, dx = yy - centre[0], xx - centre[1]
    angle = np.arctan2(dy, dx)
    wobble = sum(
        rng.uniform(0.0, 0.25 / k) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)
    )
    stretch = rng.uniform(0.6, 1.0)
    rotation = rng.uniform(0, np.pi)
    u = dx * np.cos(rotation) + dy * np.sin(rotation)
    v = (-dx * np.sin(rotation) + dy * np.cos(rotation)) / stretch
    return np.sqrt(u**2 + v**2) < radius * (1.0 + wobble)


def generate_sample(
    rng: np.random.Generator,
    image_size: int,
    num_classes: int,
    noise_std: float,
    class_contrast: float,
    bias_field: float,
    partial_volume_sigma: float,
    boundary_contrast: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One ``(1, S, S)`` float32 image in roughly [0, 1] and its ``(S, S)`` uint8 label map.

    At ``boundary_contrast=1`` the random draws and arithmetic are exactly those of the
    original generator (same data); below 1 texture draws are added (module docstring)."""
    s = image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) / s
    labels = np.zeros((s, s), dtype=np.uint8)
    body = _star_blob(rng, yy, xx, rng.uniform(0.4, 0.6, 2), rng.uniform(0.36, 0.46))
    for c in range(1, num_classes):
        for _ in range(rng.integers(1, 3)):
            centre = rng.uniform(0.28, 0.72, 2)
            labels[_star_blob(rng, yy, xx, centre, rng.uniform(0.09, 0.19)) & body] = c
    # Clean intensities: field 0.05, body 0.25, class c at 0.25 + c * contrast (jittered per image).
    if boundary_contrast == 1.0:
        means = 0.25 + class_contrast * np.arange(num_classes) + rng.normal(0, 0.03, num_classes)
    else:  # the per-image jitter of class means shrinks with the contrast: none at 0
        jitter = rng.normal(0, 0.03, num_classes)
        means = 0.25 + jitter[0] + boundary_contrast * (class_contrast * np.arange(num_classes) + jitter - jitter[0])
    clean = np.where(body, means[labels], 0.05)
    if boundary_contrast < 1.0:
        # Texture draws come from a spawned child generator: the parent's stream, hence every
        # label map of the dataset, is the same at every boundary_contrast.
        texture_rng = rng.spawn(1)[0]
        amplitude = (1.0 - boundary_contrast) * class_contrast
        for c in range(1, num_classes):
            # Orientations spread over half a turn, so every structure class has its own texture.
            angle = np.pi * (c - 1) / max(num_classes - 1, 1) + texture_rng.uniform(-0.1, 0.1)
            phase = texture_rng.uniform(0, 2 * np.pi)
            along = (xx * np.cos(angle) + yy * np.sin(angle)) * s  # pixels
            grating = amplitude * np.sin(2 * np.pi * along / TEXTURE_PERIOD + phase)
            clean = np.where(labels == c, clean + grating, clean)
    clean = clean + 0.04 * _smooth_field(rng, s, s / 16)  # tissue texture
    clean = gaussian_filter(clean, partial_volume_sigma) if partial_volume_sigma > 0 else clean
    clean = clean * (1.0 + bias_field * _smooth_field(rng, s, s / 3))
    # Rician-like magnitude noise, as in MRI.
    real = clean + rng.normal(0, noise_std, (s, s))
    imag = rng.normal(0, noise_std, (s, s))
    image = np.sqrt(real**2 + imag**2)
    return image[None].astype(np.float32), labels


class SyntheticDataModule(SplitDataModule):
    def __init__(
        self,
        root: str,
        name: str = "synthetic",
        num_classes: int = 3,
        image_size: int = 64,
        num_train: int = 192,
        num_val: int = 32,
        num_test: int = 32,
        generator_seed: int = 1234,
        noise_std: float = 0.12,
        class_contrast: float = 0.22,
        bias_field: float = 0.25,
        partial_volume_sigma: float = 0.8,
        boundary_contrast: float = 1.0,
        batch_size: int = 16,
        num_workers: int = 0,
    ):
        super().__init__()
        if num_classes < 2:
            raise DataError(f"data.num_classes must be at least 2 (background + one class), got {num_classes}")
        if image_size < 16:
            raise DataError(f"data.image_size must be at least 16, got {image_size}")
        if not 0.0 <= boundary_contrast <= 1.0:
            raise DataError(f"data.boundary_contrast must be in [0, 1], got {boundary_contrast}")
        self.name = name
        self.num_classes = num_classes
        self.in_channels = 1
        self.class_names = ["background"] + [f"structure{c}" for c in range(1, num_classes)]
        self.batch_size, self.num_workers = batch_size, num_workers
        self.settings = {
            "version": FORMAT_VERSION,
            "num_classes": num_classes,
            "image_size": image_size,
            "counts": {"train": num_train, "val": num_val, "test": num_test},
            "generator_seed": generator_seed,
            "noise_std": noise_std,
            "class_contrast": class_contrast,
            "bias_field": bias_field,
            "partial_volume_sigma": partial_volume_sigma,
            "boundary_contrast": float(boundary_contrast),
        }
        digest = hashlib.sha1(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]
        self.cache_dir = Path(root) / digest
        self.datasets: dict[str, ArraySegmentationDataset] = {}

    def split_path(self, split: str) -> Path:
        return self.cache_dir / f"{split}.npz"

    def prepare_data(self) -> None:
        missing = [s for s in SPLITS if not self.split_path(s).exists()]
        if not missing:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.cache_dir / "settings.json", json.dumps(self.settings, indent=2))
        for split in missing:
            self._generate(split)

    def _generate(self, split: str) -> None:
        count = self.settings["counts"][split]
        rng = np.random.default_rng([self.settings["generator_seed"], SPLITS.index(split)])
        args = {k: self.settings[k] for k in ("image_size", "num_classes", "noise_std", "class_contrast", "bias_field", "partial_volume_sigma", "boundary_contrast")}
        pairs = [generate_sample(rng, **args) for _ in tqdm(range(count), desc=f"generating synthetic/{split}", leave=False)]
        images = np.stack([p[0] for p in pairs])
        masks = np.stack([p[1] for p in pairs])
        ids = np.array([f"{split}_{i:05d}" for i in range(count)])
        with atomic_open(self.split_path(split), "wb") as f:  # an interrupted run never leaves a half file
            np.savez(f, images=images, masks=masks, ids=ids)

    def _load(self, split: str) -> ArraySegmentationDataset:
        path = self.split_path(split)
        if not path.exists():
            raise DataError(f"{path}: cached split missing; call prepare_data() first")
        try:
            with np.load(path) as data:
                images, masks, ids = data["images"], data["masks"], [str(i) for i in data["ids"]]
        except Exception as e:  # zip/pickle errors vary by how the file is damaged
            raise DataError(f"{path}: cannot read the cached dataset ({e}); delete the file to regenerate it") from e
        if len(images) != len(masks):
            raise DataError(f"{path}: {len(images)} images but {len(masks)} masks")
        for image, mask, sample_id in zip(images, masks, ids):
            check_sample(image, mask, self.num_classes, f"{path} [{sample_id}]")
        return ArraySegmentationDataset(images, masks, ids)

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split not in self.datasets:
                self.datasets[split] = self._load(split)
