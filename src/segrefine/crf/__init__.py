"""Fully connected (dense) CRF in torch: lattice filter, mean field.

* :class:`PermutohedralLattice` — permutohedral-lattice Gaussian filter
  (densecrf v2.2 semantics), batched, differentiable w.r.t. the values; built
  on the CPU by compiled code (:mod:`segrefine.crf.cpu_lattice`, numba),
  elsewhere in torch ops.
* :func:`exact_gaussian_filter` — brute-force O(N^2) reference filter;
  :func:`exact_mean_field` — brute-force dense-CRF mean field (tiny images).
* :class:`MeanFieldCRF` — trainable mean-field layer (CRF-as-RNN core),
  returns log-probabilities; equals ``pydensecrf`` before training.
* :func:`dense_crf` — ``pydensecrf`` drop-in post-processing, returns
  probabilities.
* :class:`ZhengMeanFieldCRF` — CRF-as-RNN with Zheng et al.'s parametrisation
  (per-kernel C x C weights, unsymmetrised compatibility, "after" normalisation).
* :class:`CRFKernels` — the kernels' widths and weights, one name each (with
  pydensecrf's and the paper's names in its docstring); :data:`PYDENSECRF_KERNELS`,
  :data:`CRFRNN_PAPER_KERNELS`; :data:`PROB_FLOOR`, the probability floor before
  ``-log p`` that every backend shares.
* Normalisation modes: :data:`NORMALIZE_SYMMETRIC` (default),
  :data:`NORMALIZE_BEFORE`, :data:`NORMALIZE_AFTER`, :data:`NO_NORMALIZATION`.
"""

from .exact import exact_gaussian_filter, exact_mean_field
from .lattice import PermutohedralLattice
from .meanfield import (
    NO_NORMALIZATION,
    NORMALIZE_AFTER,
    NORMALIZE_BEFORE,
    NORMALIZE_SYMMETRIC,
    MeanFieldCRF,
    bilateral_features,
    clear_spatial_cache,
    dense_crf,
    spatial_features,
)
from .params import CRFRNN_PAPER_KERNELS, PROB_FLOOR, PYDENSECRF_KERNELS, CRFKernels
from .zheng import ZhengMeanFieldCRF

__all__ = [
    "CRFKernels",
    "PYDENSECRF_KERNELS",
    "CRFRNN_PAPER_KERNELS",
    "PROB_FLOOR",
    "PermutohedralLattice",
    "exact_gaussian_filter",
    "exact_mean_field",
    "MeanFieldCRF",
    "ZhengMeanFieldCRF",
    "dense_crf",
    "spatial_features",
    "bilateral_features",
    "clear_spatial_cache",
    "NORMALIZE_SYMMETRIC",
    "NORMALIZE_BEFORE",
    "NORMALIZE_AFTER",
    "NO_NORMALIZATION",
]
