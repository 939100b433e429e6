"""PointRend (Kirillov et al., CVPR 2020): segmentation as rendering.

A backbone's coarse prediction (stride >= 2) is refined at adaptively chosen points by a
small MLP (the *point head*) that sees fine-grained backbone features and the coarse logits
sampled at those points.

- **Training** (``losses``): per image ``N`` points, of which ``beta * N`` are the most
  uncertain among ``k * N`` uniform random candidates (uncertainty on the bilinearly sampled
  coarse logits) and ``(1 - beta) * N`` are uniform (``sample_training_points``). Loss =
  cross-entropy of the coarse logits upsampled bilinearly to the mask size (exactly what the
  ``none`` head trains on) + cross-entropy of the point head at the points, whose labels are
  read from the mask with nearest sampling (``ignore_index`` 255 respected).
- **Inference** (``forward`` in eval mode): ``ceil(log2(stride))`` subdivision steps; each
  upsamples the current map 2x bilinearly (the last step lands exactly on the image size,
  intermediate sizes are ``ceil(H / 2**k)``), takes the ``M`` most uncertain grid points
  (``M`` = ``subdivision_num_points`` clipped to the map size), re-predicts them with the
  point head and scatters them back. Every other pixel is the bilinear upsampling.
- ``forward`` in training mode returns the coarse logits upsampled bilinearly, like ``none``.

Point coordinates are ``(x, y)`` in ``[0, 1]``; pixel ``(i, j)`` of an ``H x W`` map has
its centre at ``((j + 0.5) / W, (i + 0.5) / H)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from segrefine.heads.base import Head, upsample_logits
from segrefine.layers import PointHead
from segrefine.types import IGNORE_INDEX, BackboneOutput, BackboneSpec


def point_sample(features: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Values of ``features`` ``(B, C, H, W)`` at ``coords`` ``(B, P, 2)`` -> ``(B, C, P)``.

    ``coords`` are ``(x, y)`` in ``[0, 1]`` over the whole map (pixel centres at
    ``(j + 0.5) / W``), i.e. ``grid_sample`` with ``align_corners=False``. Points in the outer
    half pixel are clamped to the border (``padding_mode="border"``), which makes bilinear
    sampling at the pixel centres of a finer grid equal to ``F.interpolate(...,
    mode="bilinear", align_corners=False)``. Use ``mode="nearest"`` for labels: integer
    tensors are sampled as float and returned in their own dtype, so 255 survives.
    """
    if features.dim() != 4 or coords.dim() != 3 or coords.shape[-1] != 2:
        raise ValueError(
            f"point_sample expects features (B, C, H, W) and coords (B, P, 2); got {tuple(features.shape)} "
            f"and {tuple(coords.shape)}"
        )
    dtype = features.dtype
    if not dtype.is_floating_point:
        if mode != "nearest":
            raise ValueError(f"point_sample of integer tensors (labels) needs mode='nearest', got mode={mode!r}")
        features = features.float()
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(features.dtype)  # (B, P, 1, 2) in [-1, 1]
    values = F.grid_sample(features, grid, mode=mode, padding_mode="border", align_corners=False)[..., 0]
    return values if values.dtype == dtype else values.round().to(dtype)


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """``-(top-1 - top-2)`` over the class dim 1 (higher = less certain); ``-|logit|`` for one class."""
    if logits.shape[1] == 1:
        return -logits[:, 0].abs()
    top2 = logits.topk(2, dim=1).values
    return top2[:, 1] - top2[:, 0]


def sample_training_points(
    coarse_logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The paper's training points: ``(B, num_points, 2)`` coordinates in ``[0, 1]``.

    Draws ``int(oversample_ratio * num_points)`` uniform candidates (``torch.rand`` with
    ``generator``), computes the uncertainty of the coarse logits bilinearly sampled there,
    and keeps the ``int(importance_sample_ratio * num_points)`` most uncertain (first in the
    result, most uncertain first); the remaining points are fresh uniform draws (a second
    ``torch.rand`` call). No gradient flows through the selection.
    """
    if oversample_ratio < 1:
        raise ValueError(f"head.oversample_ratio={oversample_ratio!r} must be >= 1")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"head.importance_sample_ratio={importance_sample_ratio!r} must be in [0, 1]")
    batch, device = coarse_logits.shape[0], coarse_logits.device
    num_candidates = max(int(oversample_ratio * num_points), 1)
    num_uncertain = int(importance_sample_ratio * num_points)
    with torch.no_grad():
        candidates = torch.rand(batch, num_candidates, 2, device=device, generator=generator)
        scores = uncertainty(point_sample(coarse_logits.detach(), candidates).unsqueeze(-1))[..., 0]
        index = scores.topk(num_uncertain, dim=1).indices
        uncertain = candidates.gather(1, index.unsqueeze(-1).expand(-1, -1, 2))
        uniform = torch.rand(batch, num_points - num_uncertain, 2, device=device, generator=generator)
    return torch.cat([uncertain, uniform], dim=1)


def grid_point_coords(index: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centres ``(B, P, 2)`` of the pixels with flat indices ``index`` ``(B, P)`` in a map of ``size``."""
    height, width = size
    x = (index % width).to(torch.float32).add_(0.5).div_(width)
    y = torch.div(index, width, rounding_mode="floor").to(torch.float32).add_(0.5).div_(height)
    return torch.stack([x, y], dim=-1)


def subdivision_sizes(image_size: tuple[int, int], stride: int) -> list[tuple[int, int]]:
    """Map sizes after each 2x subdivision step: ``ceil(H / 2**k)`` for ``k = steps-1 .. 0``.

    ``steps = ceil(log2(stride))``; the last size is the image size, odd sizes included.
    """
    steps = max(math.ceil(math.log2(stride)), 0)
    height, width = image_size
    return [(-(-height // 2**k), -(-width // 2**k)) for k in reversed(range(steps))]


def _stop_at_stride_one() -> ValueError:
    return ValueError(
        "head=pointrend needs a coarse prediction (backbone stride >= 2) but the backbone outputs full "
        "resolution (stride 1). For U-Net set backbone.output_stride=4 (conf/backbone/unet.yaml takes "
        "head.coarse_stride, 4 in conf/head/pointrend.yaml, unless backbone.output_stride is overridden)"
    )


class PointRendHead(Head):
    """PointRend over any backbone with a coarse map (stride >= 2). See the module docstring.

    num_classes: classes of the backbone's logits.
    backbone: the backbone's declaration (``BackboneSpec``): its feature channels and strides
        (and its output stride, to refuse a map without a coarse stride).
    feature_stride: the pyramid level whose features the point head sees (4 = the paper's res2).
    train_num_points: points per image in training; an int is a count clipped to H*W, a float
        in (0, 1] a fraction of H*W (at least 1 point). Default 1/16: one point per cell of a
        stride-4 map (256 points at 64x64, 6400 at 320x320).
    oversample_ratio, importance_sample_ratio: the paper's k = 3 and beta = 0.75.
    subdivision_num_points: points re-predicted per subdivision step, clipped to the map size;
        an int is a count (the paper's 8096 for 1024x2048 images), a float in (0, 1] a fraction
        of the image's H*W. Default 1/256: the cells of a stride-16 map, which is how the paper
        chose 8096 for its image size; it scales the refinement's cost with the image.
    subdivision_min_points: floor on that count (small images need a few hundred points per
        step to cover their boundaries; 1/256 of a 64x64 image would be only 16).
    hidden_channels, num_layers, coarse_pred_each_layer: the point head MLP (3 x 256, coarse
        logits concatenated before every layer).
    point_loss_weight: weight of the point loss relative to the coarse loss.
    coarse_stride: not used by the head; conf/backbone/unet.yaml reads it to truncate U-Net.
    budget, budgets: the named point budget conf/head/pointrend.yaml resolved the five sampling
        arguments from (recorded, and checked to be a known name); not read otherwise.
   
    """

    def __init__(
        self,
        num_classes: int,
        backbone: BackboneSpec | None = None,
        feature_stride: int = 4,
        train_num_points: int | float = 0.0625,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        subdivision_num_points: int | float = 1 / 256,
        subdivision_min_points: int = 1024,
        hidden_channels: int = 256,
        num_layers: int = 3,
        coarse_pred_each_layer: bool = True,
        point_loss_weight: float = 1.0,
        coarse_stride: int | None = None,
        budget: str | None = None,
        budgets: dict | None = None,
    ):
        super().__init__(num_classes, backbone)
        if budget is not None and budgets is not None and budget not in budgets:
            raise ValueError(f"head.budget={budget!r} is not one of {sorted(budgets)} (conf/head/pointrend.yaml budgets)")
        self.budget = budget
        if backbone is None:
            raise ValueError("head=pointrend needs the backbone's declaration (for its feature channels)")
        if not backbone.has_coarse_map:
            raise _stop_at_stride_one()
        channels, strides = backbone.feature_channels, backbone.feature_strides
        if feature_stride not in strides:
            raise ValueError(f"head.feature_stride={feature_stride!r} is not a level of this backbone; it has strides {strides}")
        if isinstance(train_num_points, float) and not 0 < train_num_points <= 1:
            raise ValueError(f"head.train_num_points={train_num_points!r}: a float must be a fraction of H*W in (0, 1]")
        if isinstance(train_num_points, int) and train_num_points < 1:
            raise ValueError(f"head.train_num_points={train_num_points!r} must be >= 1")
        if isinstance(subdivision_num_points, float) and not 0 < subdivision_num_points <= 1:
            raise ValueError(
                f"head.subdivision_num_points={subdivision_num_points!r}: a float must be a fraction of H*W in (0, 1]"
            )
        if isinstance(subdivision_num_points, int) and subdivision_num_points < 1:
            raise ValueError(f"head.subdivision_num_points={subdivision_num_points!r} must be >= 1")
        if oversample_ratio < 1:
            raise ValueError(f"head.oversample_ratio={oversample_ratio!r} must be >= 1")
        if not 0 <= importance_sample_ratio <= 1:
            raise ValueError(f"head.importance_sample_ratio={importance_sample_ratio!r} must be in [0, 1]")
        self.feature_stride = feature_stride
        self.fine_channels = channels[strides.index(feature_stride)]
        self.train_num_points = train_num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.subdivision_num_points = subdivision_num_points
        self.subdivision_min_points = int(subdivision_min_points)
        self.point_loss_weight = point_loss_weight
        self.point_head = PointHead(self.fine_channels, num_classes, hidden_channels, num_layers, coarse_pred_each_layer)

    # -- helpers -------------------------------------------------------------------
    def _fine_features(self, out: BackboneOutput) -> torch.Tensor:
        fine = out.feature_at(self.feature_stride)
        if fine.shape[1] != self.fine_channels:
            raise ValueError(
                f"head=pointrend was built for {self.fine_channels} feature channels at stride "
                f"{self.feature_stride} but the backbone gave {fine.shape[1]}"
            )
        return fine

    def num_training_points(self, height: int, width: int) -> int:
        return _count(self.train_num_points, height * width)

    def num_subdivision_points(self, image_size: tuple[int, int], map_size: tuple[int, int]) -> int:
        """Points re-predicted at a step whose map has ``map_size``, for an image of ``image_size``."""
        wanted = max(_count(self.subdivision_num_points, image_size[0] * image_size[1]), self.subdivision_min_points)
        return min(wanted, map_size[0] * map_size[1])

    def point_logits(self, out: BackboneOutput, coords: torch.Tensor) -> torch.Tensor:
        """Point head predictions ``(B, C, P)`` at ``coords`` ``(B, P, 2)``."""
        fine = point_sample(self._fine_features(out), coords)
        coarse = point_sample(out.logits, coords)
        return self.point_head(fine, coarse)

    # -- the head contract -----------------------------------------------------------
    def forward(self, out: BackboneOutput, image: torch.Tensor) -> torch.Tensor:
        size = tuple(image.shape[-2:])
        if self.training:
            return upsample_logits(out, size)
        return self.render(out, size)

    def render(self, out: BackboneOutput, size: tuple[int, int]) -> torch.Tensor:
        """Subdivision inference: coarse logits refined step by step up to ``size``."""
        if out.stride <= 1:
            raise _stop_at_stride_one()
        logits = out.logits
        for height, width in subdivision_sizes(size, out.stride):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            num_points = self.num_subdivision_points(size, (height, width))
            index = uncertainty(logits).flatten(1).topk(num_points, dim=1).indices  # (B, M)
            coords = grid_point_coords(index, (height, width))
            refined = self.point_logits(out, coords).to(logits.dtype)
            batch, classes = logits.shape[:2]
            # In place: ``logits`` is the fresh output of interpolate (whose backward does not need it).
            logits = (
                logits.reshape(batch, classes, height * width)
                .scatter_(2, index.unsqueeze(1).expand(-1, classes, -1), refined)
                .view(batch, classes, height, width)
            )
        if tuple(logits.shape[-2:]) != tuple(size):  # stride 1 never gets here; defensive for exotic strides
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def losses(self, out: BackboneOutput, image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if out.stride <= 1:
            raise _stop_at_stride_one()
        height, width = mask.shape[-2:]
        coarse = upsample_logits(out, (height, width))
        loss_coarse = _cross_entropy(coarse, mask)
        coords = sample_training_points(
            out.logits, self.num_training_points(height, width), self.oversample_ratio, self.importance_sample_ratio
        )
        labels = point_sample(mask.unsqueeze(1), coords, mode="nearest")[:, 0]  # (B, P) long
        loss_points = _cross_entropy(self.point_logits(out, coords), labels)
        return {
            "loss": loss_coarse + self.point_loss_weight * loss_points,
            "loss_coarse": loss_coarse,
            "loss_points": loss_points,
        }


def _count(value: int | float, pixels: int) -> int:
    """An int is a count clipped to ``pixels``; a float a fraction of ``pixels`` (at least 1)."""
    if isinstance(value, float):
        return max(int(value * pixels), 1)
    return min(value, pixels)


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over non-ignored targets; 0 (not NaN) when every target is ignored."""
    total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)
