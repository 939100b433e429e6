"""Exact dense Gaussian filter (O(N^2) time, chunked memory) and a brute-force dense-CRF
mean field: the references.

Only for small inputs (tests, sanity checks). The filter computes exactly what the
permutohedral lattice approximates:

    out_i = sum_j exp(-1/2 |f_i - f_j|^2) v_j        (j = i included)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .params import CRFKernels

__all__ = ["exact_gaussian_filter", "exact_mean_field"]


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


def exact_mean_field(
    unary_logits: Tensor,
    image: Tensor,
    kernels: CRFKernels,
    *,
    iterations: int,
    normalization: str = "symmetric",
    compatibility: Tensor | None = None,
) -> Tensor:
    """Brute-force dense-CRF mean field with exact ``N x N`` kernel matrices, in float64.

    Written independently of :class:`~segrefine.crf.MeanFieldCRF` (no lattice, no shared
    helpers) with its conventions: features ``(x, y)/gaussian_sxy`` and ``((x, y)/bilateral_sxy,
    I/bilateral_schan)`` (``x`` the column), kernels normalised with ``D = K 1`` (symmetric
    ``D^-1/2 K D^-1/2``, before ``K D^-1``, after ``D^-1 K``, none ``K``); Potts
    (``compatibility=None``): ``S = L + w_s K~_s Q + w_b K~_b Q``; a ``C x C`` matrix ``M``:
    ``S = L - sym(M) (w_s K~_s Q + w_b K~_b Q)``. ``unary_logits`` ``(B, C, H, W)``, ``image``
    ``(B, K, H, W)``; returns float64 log-probabilities ``(B, C, H, W)``, differentiable w.r.t.
    ``unary_logits``. Memory ``O(N^2)``: tiny images only.
    """
    B, C, H, W = unary_logits.shape
    f64 = torch.float64
    rows, cols = torch.meshgrid(torch.arange(H, dtype=f64), torch.arange(W, dtype=f64), indexing="ij")
    pos = torch.stack([cols.flatten(), rows.flatten()], 1)
    sym = None if compatibility is None else 0.5 * (compatibility + compatibility.t()).to(f64)
    out = []
    for b in range(B):
        values = image[b].reshape(image.shape[1], H * W).t().to(f64)
        pairwise = torch.zeros(H * W, H * W, dtype=f64)
        for features, weight in (
            (pos / kernels.gaussian_sxy, kernels.gaussian_compat),
            (torch.cat([pos / kernels.bilateral_sxy, values / kernels.bilateral_schan], 1), kernels.bilateral_compat),
        ):
            k = torch.exp(-0.5 * torch.cdist(features, features).square())
            d = k.sum(1)
            if normalization == "symmetric":
                k = k / d.sqrt()[:, None] / d.sqrt()[None, :]
            elif normalization == "before":
                k = k / d[None, :]
            elif normalization == "after":
                k = k / d[:, None]
            elif normalization != "none":
                raise ValueError(f"normalization must be symmetric, before, after or none, got {normalization!r}")
            pairwise = pairwise + weight * k
        logits = unary_logits[b].reshape(C, H * W).t().to(f64)
        s = logits
        for _ in range(iterations):
            message = pairwise @ torch.softmax(s, 1)
            s = logits + message if sym is None else logits - message @ sym
        out.append(torch.log_softmax(s, 1).t().reshape(C, H, W))
    return torch.stack(out)
