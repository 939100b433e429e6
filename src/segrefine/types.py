"""The two data contracts shared by backbones, heads and the training module."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from segrefine.record.protocols import IGNORE_INDEX  # noqa: F401  (re-exported: defined torch-free in record)


class BackboneSpec:
    """What a backbone declares about its outputs: all a head is told about it (compare
    detectron2's ``backbone.output_shape()``), so heads never hold or probe the backbone module.

    feature_channels, feature_strides: each level of ``BackboneOutput.features``, finest first.
    output_stride: the stride of ``BackboneOutput.logits`` (1 = full resolution, no coarse map).
    required_divisor: input sizes must be multiples of it (the training module pads to it).

    A plain immutable value, not a dataclass: Hydra's ``instantiate`` would turn a dataclass
    passed to a constructor into a config node.
    """

    __slots__ = ("feature_channels", "feature_strides", "output_stride", "required_divisor")

    def __init__(self, feature_channels: tuple[int, ...], feature_strides: tuple[int, ...], output_stride: int,
                 required_divisor: int):
        for name, value in (("feature_channels", tuple(int(c) for c in feature_channels)),
                            ("feature_strides", tuple(int(s) for s in feature_strides)),
                            ("output_stride", int(output_stride)), ("required_divisor", int(required_divisor))):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a BackboneSpec is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BackboneSpec) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, k) for k in self.__slots__))

    def __repr__(self) -> str:
        return "BackboneSpec(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"

    @property
    def has_coarse_map(self) -> bool:
        return self.output_stride > 1


@dataclass
class BackboneOutput:
    """What every backbone returns (``segrefine.models.base.Backbone.output`` fills the
    strides from the backbone's declaration).

    logits: ``(B, C, H/stride, W/stride)`` class scores at the backbone's output stride.
    features: encoder pyramid, finest first and coarsest last.
    feature_strides: the stride of each tensor in ``features`` (same order).
    stride: the output stride of ``logits`` (1 = full resolution).
    auxiliary: extra training-only predictions as ``{name: (weight, logits)}`` at any stride
        (e.g. PSPNet's stage-3 classifier, weight 0.4). The training module adds
        ``weight * cross-entropy`` of each, upsampled to the mask, to the head's loss
        (``segrefine.heads.base.auxiliary_losses``); inference ignores them.
    """

    logits: torch.Tensor
    features: list[torch.Tensor]
    feature_strides: tuple[int, ...]
    stride: int
    auxiliary: dict[str, tuple[float, torch.Tensor]] = field(default_factory=dict)

    def feature_at(self, stride: int) -> torch.Tensor:
        """The pyramid level with exactly this stride (for heads that need fine features)."""
        try:
            return self.features[self.feature_strides.index(stride)]
        except ValueError:
            raise ValueError(
                f"no feature level at stride {stride}; this backbone has strides {self.feature_strides}"
            ) from None
