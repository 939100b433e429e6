"""Training-time augmentation and fixed-size batching, applied to an image and its mask together.

``Augment`` runs in a Dataset's ``__getitem__`` for the train split only (val/test get no
augmentation). Geometry (``torchvision.transforms.v2`` on a ``tv_tensors.Image`` and its
``tv_tensors.Mask``) is shared by image and mask: the image is resampled bilinearly (or
nearest), the mask always nearest, and pixels that come from outside the image are 0 in
the image and ``IGNORE_INDEX`` (255) in the mask, so they are never trained on.
Randomness comes from torch's global RNG only (v2 draws its parameters with torch, as does
the intensity jitter here; seeded by ``pl.seed_everything``, and DataLoader workers get
derived torch seeds), so a run is reproducible given its seed.

``fit_to`` pads (bottom/right, 0 / 255) or centre-crops a sample to a fixed size, so the
samples of a batch share one size.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

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


# Where geometry brings in pixels from outside the image: image 0, mask ignored.
_FILL = {tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE_INDEX}
_INTERPOLATION = {"bilinear": v2.InterpolationMode.BILINEAR, "nearest": v2.InterpolationMode.NEAREST}


def _apply(step: v2.Transform, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A v2 transform on an image and its mask together (one parameter draw for both)."""
    image, mask = step(tv_tensors.Image(image), tv_tensors.Mask(mask))
    return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


class Augment:
    """Random intensity jitter, flips, rotation/scale and crop for one ``(K,H,W)`` image + ``(H,W)`` mask.

    Args:
        enabled: ``False`` makes this a no-op (keeps the config block, switches it off).
        hflip, vflip: probability of a left-right / up-down flip.
        rotation: maximum rotation in degrees (uniform in ``[-rotation, rotation]``).
        scale: ``[low, high]`` zoom factor range (>1 zooms in), about the image centre.
        brightness: maximum additive shift of the image intensities (in image units).
        contrast: maximum relative contrast change (factor in ``[1-c, 1+c]`` about the image mean).
        crop_size: ``[H, W]`` random crop; where the image is smaller it is first padded at the
            bottom/right (0 / 255), so it is kept whole; ``None`` keeps the size.
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
        if interpolation not in _INTERPOLATION:
            raise ValueError(f"augment.interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
        if rotation < 0 or brightness < 0 or not 0 <= contrast < 1:
            raise ValueError("augment.rotation and augment.brightness must be >= 0 and augment.contrast in [0, 1)")
        self.enabled = bool(enabled)
        self.hflip, self.vflip, self.rotation, self.scale = float(hflip), float(vflip), float(rotation), scale
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.crop_size = parse_size(crop_size, "augment.crop_size")
        self.interpolation = interpolation
        # Only the steps that can change something: an inactive one would still draw random numbers.
        steps: list[v2.Transform] = []
        if self.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(self.hflip))
        if self.vflip > 0:
            steps.append(v2.RandomVerticalFlip(self.vflip))
        if self.rotation > 0 or self.scale != (1.0, 1.0):
            steps.append(v2.RandomAffine(degrees=self.rotation, scale=self.scale,
                                         interpolation=_INTERPOLATION[interpolation], fill=_FILL))
        self._geometry = v2.Compose(steps) if steps else None
        self._crop = v2.RandomCrop(self.crop_size) if self.crop_size is not None else None

    def __repr__(self) -> str:
        fields = ("enabled", "hflip", "vflip", "rotation", "scale", "brightness", "contrast", "crop_size", "interpolation")
        return f"Augment({', '.join(f'{k}={getattr(self, k)!r}' for k in fields)})"

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.enabled:
            return image, mask
        image = self._intensity(image)
        if self._geometry is not None:
            image, mask = _apply(self._geometry, image, mask)
        if self._crop is not None:
            # Pad bottom/right (0 / 255) where smaller than the crop: a small image is kept whole.
            h, w = mask.shape[-2:]
            image, mask = fit_to(image, mask, (max(h, self.crop_size[0]), max(w, self.crop_size[1])))
            image, mask = _apply(self._crop, image, mask)
        return image, mask

    def _intensity(self, image: torch.Tensor) -> torch.Tensor:
        if self.contrast > 0:
            mean = image.mean(dim=(-2, -1), keepdim=True)
            image = (image - mean) * _uniform(1 - self.contrast, 1 + self.contrast) + mean
        if self.brightness > 0:
            image = image + _uniform(-self.brightness, self.brightness)
        return image


def build_augment(augment) -> Augment | None:
    """An ``Augment``, a dict of its arguments (from a config), or ``None`` -> ``Augment | None``."""
    if augment is None or isinstance(augment, Augment):
        return augment if augment is None or augment.enabled else None
    if hasattr(augment, "items"):
        built = Augment(**{k: v for k, v in augment.items() if k != "_target_"})
        return built if built.enabled else None
    raise TypeError(f"data.augment must be a mapping of Augment arguments or null, got {type(augment).__name__}")
