"""The head contract: full-resolution logits out, training losses on request."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segrefine.crf.params import CRFKernels
from segrefine.types import IGNORE_INDEX, BackboneOutput, BackboneSpec


def upsample_logits(out: BackboneOutput, size: tuple[int, int]) -> torch.Tensor:
    """Backbone logits resized bilinearly to ``size`` (no-op at stride 1 and matching size)."""
    if tuple(out.logits.shape[-2:]) == tuple(size):
        return out.logits
    return F.interpolate(out.logits, size=size, mode="bilinear", align_corners=False)


def auxiliary_losses(out: BackboneOutput, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"loss_<name>": weight * CE}`` for each of the backbone's auxiliary predictions
    (upsampled bilinearly to the mask), e.g. PSPNet's deep supervision. Empty for most backbones."""
    losses = {}
    for name, (weight, logits) in out.auxiliary.items():
        if tuple(logits.shape[-2:]) != tuple(mask.shape[-2:]):
            logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        total = F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX, reduction="sum")
        losses[f"loss_{name}"] = weight * total / (mask != IGNORE_INDEX).sum().clamp(min=1)
    return losses


class Head(nn.Module):
    """Base head. Subclasses override ``forward`` and, if they train differently, ``losses``.

    ``forward(out, image)`` returns ``(B, C, H, W)`` logits or log-probabilities at the size of
    ``image``. ``losses(out, image, mask)`` returns named scalar losses; ``"loss"`` is optimised.
    ``backbone``: the ``segrefine.types.BackboneSpec`` of the backbone the head follows
    (``Backbone.spec()``: its declared channels, strides and output stride), for heads that
    build layers from it; None where a head needs nothing of it. Never the backbone module.
    """

    # Whether ``segrefine-eval head=<this>`` may run on a checkpoint trained with another
    # head: None = no (its parameters need training and would be random); otherwise what
    # its parameters then are, recorded as results.json "head_weights".
    untrained: str | None = None
    # Types and ranges of this head's own config keys (segrefine.validation.rule_problems),
    # checked by segrefine.build.build_component before the head is built.
    CONFIG_RULES: dict = {}
    # A volume head refines a whole subject volume at once (``refine_volume(logits, image,
    # spacing, height, width)`` on the restacked ``slice_logits``); see
    # SegmentationModule.volume_logits.
    volume: bool = False

    @classmethod
    def training_problem(cls, config: dict) -> str | None:
        """Why this head's config (``cfg.head``) cannot be trained, naming the fix; None if it can."""
        return None

    def __init__(self, num_classes: int, backbone: BackboneSpec | None = None):
        super().__init__()
        if backbone is not None and not isinstance(backbone, BackboneSpec):
            raise TypeError(
                f"{type(self).__name__} was given a {type(backbone).__name__} as its backbone; heads take the "
                "backbone's declaration, segrefine.types.BackboneSpec (Backbone.spec())"
            )
        self.num_classes = num_classes

    def forward(self, out: BackboneOutput, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def slice_logits(self, out: BackboneOutput, image: torch.Tensor) -> torch.Tensor:
        """The head's output for the slices of a subject volume: its forward, unless it is a
        volume head (``volume``), whose per-slice part comes before ``refine_volume``."""
        return self(out, image)

    def losses(self, out: BackboneOutput, image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self(out, image)
        return {"loss": F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX)}

    def extra_metrics(self) -> dict[str, float]:
        """Scalars worth logging about the head itself (e.g. learned CRF weights)."""
        return {}


# -- shared by the CRF heads (densecrf, crfrnn) --------------------------------------------


def to_255(image: torch.Tensor, intensity_range: tuple[float, float] | None) -> torch.Tensor:
    """Image intensities on the 0-255 scale: a fixed ``[lo, hi]`` range, or per-image min-max when None."""
    if intensity_range is not None:
        lo, hi = intensity_range
        return ((image - lo) / (hi - lo)).clamp(0, 1) * 255
    flat = image.flatten(1)
    lo = flat.min(1).values[:, None, None, None]
    hi = flat.max(1).values[:, None, None, None]
    return (image - lo) / (hi - lo).clamp(min=1e-8) * 255


def head_kernels(**values: float) -> CRFKernels:
    """The CRF heads' flat config keys (conf/head/*.yaml) as CRFKernels; a bad value is named as
    its config key."""
    try:
        return CRFKernels(**values)
    except ValueError as error:
        raise ValueError(f"head.{error}") from None
