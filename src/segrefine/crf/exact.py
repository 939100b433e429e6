"""Exact dense Gaussian filter (O(N^2) time, chunked memory): the reference.

Only for small inputs (tests, sanity checks). It computes exactly what the
permutohedral lattice approximates:

    out_i = sum_j exp(-1/2 |f_i - f_j|^2) v_j        (j = i included)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["exact_gaussian_filter"]


def exact_gaussian_filter(features: Tensor, values: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """Brute-force Gaussian filter.

    Args:
        features: ``(N, d)`` or ``(B, N, d)``, already divided by bandwidths.
        values: ``(N, C)`` or ``(B, N, C)`` (same leading shape as features).
        chunk_size: rows of the ``N x N`` kernel materialised at a time
            (memory ``O(chunk_size * N)`` per image).

    Returns:
        ``(N, C)`` / ``(B, N, C)`` in the dtype of ``values`` (features are
        cast to it). Differentiable w.r.t. ``values`` (and ``features``).
    """
    squeeze = features.dim() == 2
    if squeeze:
        features, values = features.unsqueeze(0), values.unsqueeze(0)
    if features.dim() != 3 or values.dim() != 3 or features.shape[:2] != values.shape[:2]:
        raise ValueError(
            f"features {tuple(features.shape)} and values {tuple(values.shape)} must be (B, N, d) and (B, N, C)"
        )
    f = features.to(values.dtype)
    sq = (f * f).sum(-1)  # (B, N)
    outs = []
    for start in range(0, f.shape[1], chunk_size):
        fi = f[:, start : start + chunk_size]
        d2 = sq[:, start : start + chunk_size, None] + sq[:, None, :] - 2 * fi @ f.transpose(1, 2)
        k = torch.exp(-0.5 * d2.clamp_min(0))
        outs.append(k @ values)
    out = torch.cat(outs, 1)
    return out.squeeze(0) if squeeze else out
