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

from .meanfield import (NORMALIZE_AFTER, check_layer_args, class_softmax, from_flat, iteration_probs, layer_call,
                        layer_kernels, to_flat)
from .params import CRFKernels


class ZhengMeanFieldCRF(nn.Module):
    """Mean field with per-kernel C x C weight matrices and an unsymmetrised compatibility.

    Args mirror :class:`~segrefine.crf.MeanFieldCRF` (widths fixed, never learned); the
    kernels' ``gaussian_compat``/``bilateral_compat`` initialise the matrices to ``w * I``
    (Zheng et al.'s values: :data:`~segrefine.crf.params.CRFRNN_PAPER_KERNELS`). Parameters
    (buffers when ``learnable=False``): ``spatial_weights``, ``bilateral_weights``,
    ``compatibility``. ``normalization`` defaults to "after", as the official code.

    ``forward(unary_logits, image, iterations=None)`` -> log-probabilities ``(B, C, H, W)``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        kernels: CRFKernels = CRFKernels(),
        learnable: bool = True,
        iterations: int = 5,
        eval_iterations: int | None = None,
        normalization: str = NORMALIZE_AFTER,
    ) -> None:
        super().__init__()
        check_layer_args(num_classes, kernels, normalization, iterations, eval_iterations)
        self.num_classes = num_classes
        self.kernels = kernels
        self.iterations = int(iterations)
        self.eval_iterations = None if eval_iterations is None else int(eval_iterations)
        self.normalization = normalization
        eye = torch.eye(num_classes)
        for name, value in (("spatial_weights", kernels.gaussian_compat * eye),
                            ("bilateral_weights", kernels.bilateral_compat * eye), ("compatibility", eye.clone())):
            if learnable:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, kernels={self.kernels}, iterations={self.iterations}, "
            f"eval_iterations={self.eval_iterations}, normalization={self.normalization!r}"
        )

    def forward(self, unary_logits: Tensor, image: Tensor, iterations: int | None = None) -> Tensor:
        B, C, H, W = unary_logits.shape
        iterations, dtype = layer_call(self, unary_logits, image, iterations)
        logits = to_flat(unary_logits.to(dtype))  # (B*N, C)
        S = logits
        if iterations > 0:
            spatial, bilateral = layer_kernels(self, image, B, unary_logits.device)
            weights = (self.spatial_weights.to(dtype), self.bilateral_weights.to(dtype))
            S = zheng_mean_field(logits, (spatial, bilateral), weights, self.compatibility.to(dtype), iterations)
        return from_flat(class_softmax(S, log=True), B, H, W)


def zheng_mean_field(
    logits: Tensor, filters: tuple, weights: tuple[Tensor, ...], compatibility: Tensor, iterations: int
) -> Tensor:
    """The iterations on flat ``(B*N, C)`` logits with built (normalised) kernels; returns ``S``.

    Row-vector layout: per pixel ``m = W q`` is ``q_row W^T``, and ``S = L + m_row M^T``, summed
    per kernel as ``(K Q) (M W)^T``. Only tensor ops: no host synchronisation on CUDA.
    """
    # (K Q) W^T M^T as one product with the small C x C matrix (M W)^T, made once per kernel
    matrices = [(compatibility @ weight).t() for weight in weights]
    S = logits
    for _ in range(iterations):
        Q = iteration_probs(S)
        S = logits
        for kernel, matrix in zip(filters, matrices):
            S = torch.addmm(S, kernel.filter(Q), matrix)
    return S
