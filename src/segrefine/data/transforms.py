"""Training-time augmentation and fixed-size batching, applied to an image and its mask together.

``Augment`` runs in a Dataset's ``__getitem__`` for the train split only (val/test get no
augmentation). Geometry is shared by image and mask: the image is resampled bilinearly
(or nearest), the mask always nearest, and pixels that come from outside the image are
0 in the image and ``IGNORE_INDEX`` (255) in the mask, so they are never trained on.
Randomness comes from torch's global RNG (seeded by ``pl.seed_everything``; DataLoader
workers get derived seeds), so a run is reproducible given its seed.

``fit_to`` pads (bottom/right, 0 / 255) or centre-crops a sample to a fixed size, so the
samples of a batch share one size.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from segrefine.types import IGNORE_INDEX


def parse_size(value, key: str) -> tuple[int, int] | None:
    """``None``, an int, or ``[H, W]`` -> ``(H, W)``."""
    if value is None:
        return None
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise ValueError(f"{key} must be [H, W] with positive sizes, got {value}")
    return value  # type: ignore[return-value]


def fit_to(image: torch.Tensor, mask: torch.Tensor, size: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right (image 0, mask 255) and centre-crop to ``size`` = (H, W); ``None`` = as is.

    Padding at the bottom/right keeps pixel (0, 0) where it was, so predictions on the padded
    sample crop back to the original by ``[:H, :W]``.
    """
    if size is None:
        return image, mask
    height, width = int(size[0]), int(size[1])
    h, w = mask.shape[-2:]
    if h > height or w > width:
        top, left = max(0, (h - height) // 2), max(0, (w - width) // 2)
        image = image[..., top : top + height, left : left + width]
        mask = mask[..., top : top + height, left : left + width]
        h, w = mask.shape[-2:]
    if h < height or w < width:
        image = F.pad(image, (0, width - w, 0, height - h), value=0.0)
        mask = F.pad(mask, (0, width - w, 0, height - h), value=IGNORE_INDEX)
    return image, mask


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


class Augment:
    """Random intensity jitter, flips, rotation/scale and crop for one ``(K,H,W)`` image + ``(H,W)`` mask.

    Args:
        enabled: ``False`` makes this a no-op (keeps the config block, switches it off).
        hflip, vflip: probability of a left-right / up-down flip.
        rotation: maximum rotation in degrees (uniform in ``[-rotation, rotation]``).
        scale: ``[low, high]`` zoom factor range (>1 zooms in), about the image centre.
        brightness: maximum additive shift of the image intensities (in image units).
        contrast: maximum relative contrast change (factor in ``[1-c, 1+c]`` about the image mean).
        crop_size: ``[H, W]`` random crop (padded with 0 / 255 where the image is smaller);
            ``None`` keeps the size.
        interpolation: image resampling for rotation/scale: ``bilinear`` or ``nearest``.
    """

    def __init__(
        self,
        enabled: bool = True,
        hflip: float = 0.5,
        vflip: float = 0.0,
        rotation: float = 0.0,
        scale: Sequence[float] = (1.0, 1.0),
        brightness: float = 0.0,
        contrast: float = 0.0,
        crop_size: Sequence[int] | int | None = None,
        interpolation: str = "bilinear",
    ):
        for key, p in (("hflip", hflip), ("vflip", vflip)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"augment.{key} is a probability in [0, 1], got {p}")
        scale = tuple(float(s) for s in scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"augment.scale must be [low, high] with 0 < low <= high, got {list(scale)}")
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"augment.interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
        if rotation < 0 or brightness < 0 or not 0 <= contrast < 1:
            raise ValueError("augment.rotation and augment.brightness must be >= 0 and augment.contrast in [0, 1)")
        self.enabled = bool(enabled)
        self.hflip, self.vflip, self.rotation, self.scale = float(hflip), float(vflip), float(rotation), scale
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.crop_size = parse_size(crop_size, "augment.crop_size")
        self.interpolation = interpolation

    def __repr__(self) -> str:
        fields = ("enabled", "hflip", "vflip", "rotation", "scale", "brightness", "contrast", "crop_size", "interpolation")
        return f"Augment({', '.join(f'{k}={getattr(self, k)!r}' for k in fields)})"

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.enabled:
            return image, mask
        image = self._intensity(image)
        image, mask = self._geometry(image, mask)
        if self.crop_size is not None:
            image, mask = self._crop(image, mask)
        return image, mask

    def _intensity(self, image: torch.Tensor) -> torch.Tensor:
        if self.contrast > 0:
            mean = image.mean(dim=(-2, -1), keepdim=True)
            image = (image - mean) * _uniform(1 - self.contrast, 1 + self.contrast) + mean
        if self.brightness > 0:
            image = image + _uniform(-self.brightness, self.brightness)
        return image

    def _geometry(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flip_x = self.hflip > 0 and float(torch.rand(())) < self.hflip
        flip_y = self.vflip > 0 and float(torch.rand(())) < self.vflip
        angle = math.radians(_uniform(-self.rotation, self.rotation)) if self.rotation > 0 else 0.0
        zoom = _uniform(*self.scale) if self.scale[0] != self.scale[1] else self.scale[0]
        if angle == 0.0 and zoom == 1.0:  # flips only: exact, no resampling
            dims = [d for d, on in ((-1, flip_x), (-2, flip_y)) if on]
            return (image.flip(dims), mask.flip(dims)) if dims else (image, mask)
        # Output pixel (normalised coords, align_corners=False) -> input pixel: flip o rotate o 1/zoom,
        # in pixel units so the rotation is a true rotation on non-square images.
        h, w = mask.shape[-2:]
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        sx, sy = (-1.0 if flip_x else 1.0), (-1.0 if flip_y else 1.0)
        theta = torch.tensor(
            [[sx * cos, -sy * sin * h / w, 0.0], [sx * sin * w / h, sy * cos, 0.0]], dtype=torch.float32
        )
        grid = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False)
        out = F.grid_sample(image[None].float(), grid, mode=self.interpolation, padding_mode="zeros", align_corners=False)[0]
        # Mask values shifted by one so that 0 marks "outside the image" after zero padding.
        shifted = (mask.to(torch.float32) + 1)[None, None]
        sampled = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0, 0]
        sampled = sampled.round().to(mask.dtype)
        new_mask = torch.where(sampled == 0, torch.full_like(sampled, IGNORE_INDEX), sampled - 1)
        return out.to(image.dtype), new_mask

    def _crop(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ch, cw = self.crop_size  # type: ignore[misc]
        h, w = mask.shape[-2:]
        image, mask = fit_to(image, mask, (max(h, ch), max(w, cw)))  # pad where smaller
        h, w = mask.shape[-2:]
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return image[..., top : top + ch, left : left + cw], mask[..., top : top + ch, left : left + cw]


def build_augment(augment) -> Augment | None:
    """An ``Augment``, a dict of its arguments (from a config), or ``None`` -> ``Augment | None``."""
    if augment is None or isinstance(augment, Augment):
        return augment if augment is None or augment.enabled else None
    if hasattr(augment, "items"):
        built = Augment(**{k: v for k, v in augment.items() if k != "_target_"})
        return built if built.enabled else None
    raise TypeError(f"data.augment must be a mapping of Augment arguments or null, got {type(augment).__name__}")
