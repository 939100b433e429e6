"""CRF-as-RNN with Zheng et al.'s parametrisation (ICCV 2015, and the official code).

Where :class:`~segrefine.crf.MeanFieldCRF` ("potts") learns one scalar weight per kernel and a
symmetrised compatibility, Zheng et al.'s layer learns, per kernel, a C x C weight matrix
(initialised ``w * I``), and one unsymmetrised C x C compatibility matrix (initialised ``I``,
as the official crfasrnn_pytorch/Caffe code does), with kernels normalised "after" (D^-1 K):

    Q <- softmax(L)
    repeat T times:
        m <- W_s K~_s(Q) + W_b K~_b(Q)    per pixel, m and K~Q are C-vectors
        S <- L + M m
        Q <- softmax(S)

With ``W_s = w_s I``, ``W_b = w_b I`` and ``M = I`` this is the Potts model
``S = L + w_s K~_s Q + w_b K~_b Q`` of densecrf with the same normalisation. Kernels and
features are those of segrefine.crf.meanfield (same lattice, same features).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .lattice import PermutohedralLattice
from .meanfield import (
    NORMALIZE_AFTER,
    _from_flat,
    _normalized,
    _softmax,
    _spatial_filter,
    _to_flat,
    bilateral_features,
    check_layer_args,
    layer_call,
)


class ZhengMeanFieldCRF(nn.Module):
    """Mean field with per-kernel C x C weight matrices and an unsymmetrised compatibility.

    Args mirror :class:`~segrefine.crf.MeanFieldCRF` (bandwidths fixed, never learned);
    ``spatial_weight``/``bilateral_weight`` initialise the matrices to ``w * I``. Parameters
    (buffers when ``learnable=False``): ``spatial_weights``, ``bilateral_weights``,
    ``compatibility``. ``normalization`` defaults to "after", as the official code.

    ``forward(unary_logits, image, iterations=None)`` -> log-probabilities ``(B, C, H, W)``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        theta_alpha: float = 160.0,
        theta_beta: float = 3.0,
        theta_gamma: float = 3.0,
        spatial_weight: float = 3.0,
        bilateral_weight: float = 5.0,
        learnable: bool = True,
        iterations: int = 5,
        eval_iterations: int | None = None,
        normalization: str = NORMALIZE_AFTER,
    ) -> None:
        super().__init__()
        check_layer_args(num_classes, (theta_alpha, theta_beta, theta_gamma), normalization, iterations, eval_iterations)
        self.num_classes = num_classes
        self.theta_alpha, self.theta_beta, self.theta_gamma = float(theta_alpha), float(theta_beta), float(theta_gamma)
        self.iterations = int(iterations)
        self.eval_iterations = None if eval_iterations is None else int(eval_iterations)
        self.normalization = normalization
        eye = torch.eye(num_classes)
        for name, value in (("spatial_weights", float(spatial_weight) * eye), ("bilateral_weights", float(bilateral_weight) * eye),
                            ("compatibility", eye.clone())):
            if learnable:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, theta_alpha={self.theta_alpha}, theta_beta={self.theta_beta}, "
            f"theta_gamma={self.theta_gamma}, iterations={self.iterations}, "
            f"eval_iterations={self.eval_iterations}, normalization={self.normalization!r}"
        )

    def forward(self, unary_logits: Tensor, image: Tensor, iterations: int | None = None) -> Tensor:
        B, C, H, W = unary_logits.shape
        iterations, dtype = layer_call(self, unary_logits, image, iterations)
        logits = _to_flat(unary_logits.to(dtype))  # (B*N, C)
        S = logits
        if iterations > 0:
            spatial = _spatial_filter(B, H, W, self.theta_gamma, self.normalization, unary_logits.device, True)
            bilateral = _normalized(
                PermutohedralLattice(bilateral_features(image, self.theta_alpha, self.theta_beta)), self.normalization
            )
            weights = (self.spatial_weights.to(dtype), self.bilateral_weights.to(dtype))
            S = zheng_mean_field(logits, (spatial, bilateral), weights, self.compatibility.to(dtype), iterations)
        return _from_flat(_softmax(S, log=True), B, H, W)


def zheng_mean_field(
    logits: Tensor, filters: tuple, weights: tuple[Tensor, ...], compatibility: Tensor, iterations: int
) -> Tensor:
    """The iterations on flat ``(B*N, C)`` logits with built (normalised) kernels; returns ``S``.

    Row-vector layout: per pixel ``m = W q`` is ``q_row W^T``, and ``S = L + m_row M^T``. Only
    tensor ops: no host synchronisation on CUDA.
    """
    S = logits
    for _ in range(iterations):
        Q = _softmax(S)
        message = None
        for kernel, weight in zip(filters, weights):
            term = kernel.filter(Q) @ weight.t()
            message = term if message is None else message + term
        S = torch.addmm(logits, message, compatibility.t())
    return S
