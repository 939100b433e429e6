"""Mean-field inference for the fully connected (dense) CRF.

Reproduces Krähenbühl's densecrf v2.2 / ``pydensecrf`` mean field
(``DenseCRF2D`` with ``addPairwiseGaussian`` + ``addPairwiseBilateral``) and
extends it to a trainable CRF-as-RNN layer (Zheng et al. 2015):

    Q <- softmax(L)                     L: unary logits (= -U, U the energy)
    repeat T times:
        m <- w_s K~_s(Q) + w_b K~_b(Q)  kernels normalised as below
        S <- L + m                      Potts compatibility
          or L - ((M + M^T)/2) m        learned compatibility matrix M
        Q <- softmax(S)

Kernels (widths and weights: :class:`~segrefine.crf.params.CRFKernels`;
features as in ``DenseCRF2D``: ``x`` = column index, ``y`` = row index, order
``(x, y, channels...)``):

* spatial ("Gaussian"): ``(x/gaussian_sxy, y/gaussian_sxy)``;
* bilateral: ``(x/bilateral_sxy, y/bilateral_sxy, I_1/bilateral_schan, ...,
  I_K/bilateral_schan)`` for an image with any number ``K`` of channels, on
  whatever scale ``bilateral_schan`` is meant for (``pydensecrf`` users pass
  0-255 images).

Normalisation of a kernel ``K`` with ``D = K 1`` (all-ones filtered):
``"symmetric"`` (default, densecrf's ``NORMALIZE_SYMMETRIC``):
``D^-1/2 K D^-1/2``; ``"before"``: ``K D^-1``; ``"after"``: ``D^-1 K``;
``"none"``: ``K`` unscaled (densecrf's ``NO_NORMALIZATION``).

Sign conventions follow densecrf: a Potts weight ``w`` *adds* ``w K~Q`` to the
logits; a compatibility matrix ``M`` *subtracts* ``sym(M) K~Q``. A learned
matrix initialised to Potts (``1 - I``) gives the same probabilities as the
Potts model (they differ by a per-pixel constant).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lattice import PermutohedralLattice
from .params import PROB_FLOOR, CRFKernels

__all__ = [
    "NORMALIZE_SYMMETRIC",
    "NORMALIZE_BEFORE",
    "NORMALIZE_AFTER",
    "NO_NORMALIZATION",
    "MeanFieldCRF",
    "dense_crf",
    "spatial_features",
    "bilateral_features",
    "volume_features",
    "clear_spatial_cache",
]

NORMALIZE_SYMMETRIC = "symmetric"
NORMALIZE_BEFORE = "before"
NORMALIZE_AFTER = "after"
NO_NORMALIZATION = "none"
_NORMALIZATIONS = (NORMALIZE_SYMMETRIC, NORMALIZE_BEFORE, NORMALIZE_AFTER, NO_NORMALIZATION)


# --------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------


def _positions(height: int, width: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    x = torch.arange(width, dtype=torch.float32, device=device).repeat(height)
    y = torch.arange(height, dtype=torch.float32, device=device).repeat_interleave(width)
    return x, y


def spatial_features(height: int, width: int, sxy: float, device: torch.device | str | None = None) -> Tensor:
    """``(H*W, 2)`` float32 features ``(x/sxy, y/sxy)``, row-major pixels."""
    x, y = _positions(height, width, device)
    th = torch.tensor(float(sxy), dtype=torch.float32, device=device)
    return torch.stack([x / th, y / th], 1)


def bilateral_features(image: Tensor, sxy: float, schan: float) -> Tensor:
    """``(B, H*W, 2+K)`` float32 features ``(x/sxy, y/sxy, I_k/schan ...)``.

    ``image`` is ``(B, K, H, W)``; it is cast to float32 (as densecrf does)
    and detached.
    """
    if image.dim() != 4:
        raise ValueError(f"image must be (B, K, H, W), got shape {tuple(image.shape)}")
    B, K, H, W = image.shape
    dev = image.device
    x, y = _positions(H, W, dev)
    th = torch.tensor(float(sxy), dtype=torch.float32, device=dev)
    tv = torch.tensor(float(schan), dtype=torch.float32, device=dev)
    pos = torch.stack([x / th, y / th], 1).expand(B, H * W, 2)
    val = image.detach().to(torch.float32).reshape(B, K, H * W).transpose(1, 2) / tv
    return torch.cat([pos, val], 2).contiguous()


def volume_features(shape: tuple[int, int, int], spacing, sxy: float, image: Tensor | None = None,
                    schan: float = 1.0, device: torch.device | str | None = None) -> Tensor:
    """``(D*H*W, 3[+K])`` float32 features of a volume, row-major voxels: ``(x, y, z)`` positions in
    mm divided by ``sxy`` (mm), x along W, y along H, z along D (``spacing = (sz, sy, sx)``), then
    the ``(K, D, H, W)`` ``image``'s channels divided by ``schan``."""
    D, H, W = (int(n) for n in shape)
    sz, sy, sx = (float(s) for s in spacing)
    width = torch.tensor(float(sxy), dtype=torch.float32, device=device)

    def axis(n: int, step: float) -> Tensor:
        return torch.arange(n, dtype=torch.float32, device=device) * torch.tensor(step, dtype=torch.float32, device=device) / width

    x = axis(W, sx).repeat(D * H)
    y = axis(H, sy).repeat_interleave(W).repeat(D)
    z = axis(D, sz).repeat_interleave(H * W)
    columns = [x, y, z]
    if image is not None:
        values = image.detach().to(device=device, dtype=torch.float32).reshape(image.shape[0], -1)
        columns += list(values / torch.tensor(float(schan), dtype=torch.float32, device=device))
    return torch.stack(columns, 1).contiguous()


# --------------------------------------------------------------------------
# Normalised kernels and the mean-field loop
# --------------------------------------------------------------------------


def _normalized(lattice: PermutohedralLattice, normalization: str) -> PermutohedralLattice:
    """The kernel with densecrf's normalisation folded into its weights, in place (``lattice``
    is a fresh build nobody else holds: no second copy of its weights at the peak).

    ``D = K 1`` (float32, as densecrf); symmetric: ``D^-1/2 K D^-1/2``,
    before: ``K D^-1``, after: ``D^-1 K``, none: ``K``. The ``1e-20`` and
    the reciprocal square root are computed in float64, as in densecrf.
    """
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    if normalization == NO_NORMALIZATION:
        return lattice
    D = lattice.ones_response().to(torch.float64).unsqueeze(1).add_(1e-20)  # in place: one N-sized temporary
    if normalization == NORMALIZE_SYMMETRIC:
        n = D.sqrt_().reciprocal_().to(torch.float32)
        return lattice.scale_(n, n)
    n = D.reciprocal_().to(torch.float32)
    if normalization == NORMALIZE_BEFORE:
        return lattice.scale_(pre=n)
    return lattice.scale_(post=n)


_SPATIAL_CACHE: "OrderedDict[tuple, PermutohedralLattice]" = OrderedDict()
_SPATIAL_CACHE_SIZE = 4


def _spatial_filter(
    batch: int,
    height: int,
    width: int,
    sxy: float,
    normalization: str,
    device: torch.device,
    cache: bool,
    transposes: bool = True,
) -> PermutohedralLattice:
    """Normalised spatial kernel for ``batch`` images of ``height x width``.

    Its lattice depends only on the image size, so the single-image version
    is kept in a small process-wide LRU cache (``cache=True``) and repeated
    over the batch (index arithmetic, no re-sorting). ``transposes=False``:
    the inference-only lattice (cached separately).
    """
    key = (height, width, float(sxy), normalization, str(device), transposes)
    single = _SPATIAL_CACHE.get(key) if cache else None
    if single is None:
        lattice = PermutohedralLattice(spatial_features(height, width, sxy, device), transposes=transposes)
        single = _normalized(lattice, normalization)
        if cache:
            _SPATIAL_CACHE[key] = single
            while len(_SPATIAL_CACHE) > _SPATIAL_CACHE_SIZE:
                _SPATIAL_CACHE.popitem(last=False)
    elif cache:
        _SPATIAL_CACHE.move_to_end(key)
    return single.repeat(batch)


def clear_spatial_cache() -> None:
    """Drop the cached spatial lattices (see :func:`dense_crf`)."""
    _SPATIAL_CACHE.clear()


def class_softmax(S: Tensor, log: bool = False) -> Tensor:
    """Softmax over classes of flat ``(B*N, C)`` logits, contiguous result.

    torch's CPU kernel along a short last dimension (C < 16) is several
    times slower than along the first; use the transposed view then, and for two
    classes ``sigmoid(+-(S_1 - S_0))``.
    """
    if S.shape[1] == 2:  # two classes: a sigmoid of the difference each (one cheap pass)
        diff = S[:, 1] - S[:, 0]
        fn = F.logsigmoid if log else torch.sigmoid
        return torch.stack([fn(-diff), fn(diff)], 1)
    fn = torch.log_softmax if log else torch.softmax
    if S.shape[1] < 16:
        return fn(S.t(), 0).t().contiguous()
    return fn(S, 1)


# Mean field's probabilities are kept at or above this (a probability of 1e-20 and an exact
# 1e-40 weigh the same in every message: both far below float32 resolution of the sums).
Q_FLOOR = 1e-20


def iteration_probs(S: Tensor) -> Tensor:
    """The probabilities one mean-field iteration filters: ``softmax(S) + Q_FLOOR``. Why:
    confident logits drive unlikely classes below float32's smallest normal number (1.2e-38),
    and x86 CPUs compute on such subnormal numbers 10-50x slower, in every filter pass that
    follows. Adding 1e-20 leaves every probability above ~1e-12 bit-identical, changes no
    message beyond float32 round-off, and keeps the gradient exact (the derivative of ``+ c``
    is 1)."""
    Q = class_softmax(S)
    return Q + Q_FLOOR if Q.requires_grad else Q.add_(Q_FLOOR)


def _mean_field(
    logits: Tensor,
    filters: list[PermutohedralLattice],
    weights: list[Tensor],
    compatibility: Tensor | None,
    iterations: int,
) -> Tensor:
    """Mean field on flat ``(B*N, C)`` logits; returns the final logits ``S``."""
    grad = torch.is_grad_enabled() and (
        logits.requires_grad
        or any(w.requires_grad for w in weights)
        or (compatibility is not None and compatibility.requires_grad)
    )
    if not grad and compatibility is None and iterations > 0:
        # inference only: update one logits buffer in place (fewer large
        # allocations, which matter on CPU: fresh pages cost page faults)
        S = logits.clone()
        for _ in range(iterations):
            Q = iteration_probs(S)
            first = True
            for f, w in zip(filters, weights):
                if first:  # S = L + w K~Q in one pass (no separate copy of L)
                    torch.addcmul(logits, f.filter(Q), w, out=S)
                    first = False
                else:
                    S.addcmul_(f.filter(Q), w)
        return S
    # learned compatibility: S = L - sum_m (K~_m Q) (w_m sym(M)), the weights in the small C x C
    # matrices (made once), so neither pass over the pixels nor its gradient multiplies by them
    matrices = None if compatibility is None else [compatibility * -w for w in weights]
    S = logits
    for _ in range(iterations):
        Q = iteration_probs(S)
        S = logits
        if matrices is None:  # Potts: S = L + sum_m w_m K~_m Q
            for f, w in zip(filters, weights):
                S = torch.addcmul(S, f.filter(Q), w)
        else:
            for f, m in zip(filters, matrices):
                S = torch.addmm(S, f.filter(Q), m)
    return S


def _check_inputs(unary: Tensor, image: Tensor) -> None:
    if unary.dim() != 4:
        raise ValueError(f"unary must be (B, C, H, W), got shape {tuple(unary.shape)}")
    if image.dim() != 4:
        raise ValueError(f"image must be (B, K, H, W), got shape {tuple(image.shape)}")
    if unary.shape[0] != image.shape[0] or unary.shape[2:] != image.shape[2:]:
        raise ValueError(
            f"unary {tuple(unary.shape)} and image {tuple(image.shape)} must share batch size and H, W"
        )
    if unary.device != image.device:
        raise ValueError(f"unary on {unary.device} but image on {image.device}")


def to_flat(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> row-major ``(B*H*W, C)``. Always a contiguous copy: for one image the
    permuted reshape is a column-major view, and every op mixing it with the row-major filter
    outputs would run as a strided transpose (several times slower on CPU)."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).contiguous().view(B * H * W, C)


def from_flat(x: Tensor, B: int, H: int, W: int) -> Tensor:
    """Row-major ``(B*H*W, C)`` -> contiguous ``(B, C, H, W)``. With many classes torch's 2-D
    transpose is ~3x faster than the 4-D permuted copy, so each image is transposed alone."""
    C = x.shape[1]
    if C < 8:
        return x.view(B, H, W, C).permute(0, 3, 1, 2).contiguous()
    images = [xb.t().contiguous() for xb in x.view(B, H * W, C).unbind(0)]
    out = images[0].unsqueeze(0) if B == 1 else torch.stack(images)
    return out.view(B, C, H, W)


# --------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------


def layer_call(layer: nn.Module, unary_logits: Tensor, image: Tensor, iterations: int | None) -> tuple[int, torch.dtype]:
    """What a mean-field layer's forward checks and decides first: the inputs, the iteration
    count (training vs evaluation) and the working dtype (float32 unless float64 is given)."""
    _check_inputs(unary_logits, image)
    if unary_logits.shape[1] != layer.num_classes:
        raise ValueError(f"unary has {unary_logits.shape[1]} classes, module built for {layer.num_classes}")
    if iterations is None:
        iterations = layer.iterations if (layer.training or layer.eval_iterations is None) else layer.eval_iterations
    dtype = unary_logits.dtype if unary_logits.dtype in (torch.float32, torch.float64) else torch.float32
    return iterations, dtype


def check_layer_args(num_classes: int, kernels: CRFKernels, normalization: str, iterations: int,
                     eval_iterations: int | None) -> None:
    """The argument checks every mean-field layer shares (the kernels validate themselves)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not isinstance(kernels, CRFKernels):
        raise TypeError(f"kernels must be a segrefine.crf.CRFKernels, got {type(kernels).__name__}; "
                        "build one with CRFKernels(**values)")
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    if iterations < 0 or (eval_iterations is not None and eval_iterations < 0):
        raise ValueError("iterations must be >= 0")


def layer_kernels(layer: nn.Module, image: Tensor, batch: int, device: torch.device) -> tuple:
    """A layer's normalised (spatial, bilateral) kernels for ``image``: the spatial one from the
    process-wide cache, the bilateral one built for this forward."""
    k, (height, width) = layer.kernels, image.shape[2:]
    spatial = _spatial_filter(batch, height, width, k.gaussian_sxy, layer.normalization, device, True)
    bilateral = PermutohedralLattice(bilateral_features(image, k.bilateral_sxy, k.bilateral_schan))
    return spatial, _normalized(bilateral, layer.normalization)


class MeanFieldCRF(nn.Module):
    """Dense-CRF mean field as a differentiable layer (CRF-as-RNN core).

    Before any training step it computes exactly what ``pydensecrf`` computes
    with ``DenseCRF2D(W, H, C)``, ``setUnaryEnergy(-unary_logits)``,
    ``addPairwiseGaussian(sxy=kernels.gaussian_sxy, compat=kernels.gaussian_compat)``,
    ``addPairwiseBilateral(sxy=kernels.bilateral_sxy, srgb=kernels.bilateral_schan,
    rgbim=image, compat=kernels.bilateral_compat)`` and ``inference(iterations)``
    (for any number of image channels, i.e. ``DenseCRF.addPairwiseEnergy`` on
    the same features), up to float32 round-off.

    Args:
        num_classes: ``C``.
        kernels: widths and (initial) weights of the two kernels
            (:class:`~segrefine.crf.params.CRFKernels`; CRF-RNN's usual
            initial values are :data:`~segrefine.crf.params.CRFRNN_PAPER_KERNELS`).
            The weights become the parameters ``spatial_weight`` and
            ``bilateral_weight``; the widths are never learned.
        compatibility: ``"potts"`` (message ``+ w K~Q``), ``"learned"`` (a
            ``C x C`` matrix ``M`` initialised to Potts ``1 - I``, message
            ``- sym(M) (w_s K~_s Q + w_b K~_b Q)``), or a ``C x C`` tensor used
            as the initial ``M``.
        learnable: make the kernel weights (and ``M`` for a matrix
            compatibility) ``nn.Parameter``; otherwise they are buffers.
        iterations: mean-field iterations (CRF-RNN: 5 when training).
        eval_iterations: iterations in eval mode (CRF-RNN: 10); defaults to
            ``iterations``.
        normalization: ``"symmetric"`` (default), ``"before"``, ``"after"``
            or ``"none"`` (see module docstring).

    ``forward(unary_logits, image, iterations=None)``:
        ``unary_logits`` ``(B, C, H, W)``: logits (any per-pixel offset is
        irrelevant). To start from an energy ``U`` (= ``-log p``) pass
        ``-U``; from probabilities ``p`` pass ``log p``.
        ``image`` ``(B, K, H, W)`` float (any ``K``; not differentiated).
        Returns **log-probabilities** ``(B, C, H, W)`` (``log_softmax`` of the
        last iteration's logits); ``.exp()`` gives ``pydensecrf``'s ``Q``.

    The spatial lattice depends only on ``(H, W)`` and is cached between
    calls (process-wide LRU, see :func:`clear_spatial_cache`); the bilateral
    lattice is built once per forward and reused by the normalisation and
    every iteration.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        kernels: CRFKernels = CRFKernels(),
        compatibility: str | Tensor = "potts",
        learnable: bool = True,
        iterations: int = 5,
        eval_iterations: int | None = None,
        normalization: str = NORMALIZE_SYMMETRIC,
    ) -> None:
        super().__init__()
        check_layer_args(num_classes, kernels, normalization, iterations, eval_iterations)
        self.num_classes = num_classes
        self.kernels = kernels
        self.iterations = int(iterations)
        self.eval_iterations = None if eval_iterations is None else int(eval_iterations)
        self.normalization = normalization
        self.learnable = learnable

        def _register(name: str, value: Tensor) -> None:
            if learnable:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

        # parameter names kept as they are: they are the keys of saved checkpoints
        _register("spatial_weight", torch.tensor(kernels.gaussian_compat))
        _register("bilateral_weight", torch.tensor(kernels.bilateral_compat))
        if isinstance(compatibility, str):
            if compatibility == "potts":
                self.compatibility = None
            elif compatibility == "learned":
                _register("compatibility", 1.0 - torch.eye(num_classes))
            else:
                raise ValueError(f"compatibility must be 'potts', 'learned' or a CxC tensor, got {compatibility!r}")
        else:
            m = torch.as_tensor(compatibility, dtype=torch.float32).clone()
            if m.shape != (num_classes, num_classes):
                raise ValueError(f"compatibility matrix must be ({num_classes}, {num_classes}), got {tuple(m.shape)}")
            _register("compatibility", m)

    def extra_repr(self) -> str:
        comp = "potts" if self.compatibility is None else "matrix"
        return (
            f"num_classes={self.num_classes}, kernels={self.kernels}, compatibility={comp}, "
            f"iterations={self.iterations}, eval_iterations={self.eval_iterations}, "
            f"normalization={self.normalization!r}"
        )

    def forward(self, unary_logits: Tensor, image: Tensor, iterations: int | None = None) -> Tensor:
        B, C, H, W = unary_logits.shape
        iterations, dtype = layer_call(self, unary_logits, image, iterations)
        logits = to_flat(unary_logits.to(dtype))
        if iterations > 0:
            spatial, bilateral = layer_kernels(self, image, B, unary_logits.device)
            weights = [self.spatial_weight.to(dtype), self.bilateral_weight.to(dtype)]
            comp = None
            if self.compatibility is not None:
                m = self.compatibility.to(dtype)
                comp = 0.5 * (m + m.t())
            S = _mean_field(logits, [spatial, bilateral], weights, comp, iterations)
        else:
            S = logits
        return from_flat(class_softmax(S, log=True), B, H, W)


# --------------------------------------------------------------------------
# Offline post-processing (pydensecrf drop-in)
# --------------------------------------------------------------------------


@torch.no_grad()
def dense_crf(
    probs: Tensor,
    image: Tensor,
    *,
    kernels: CRFKernels = CRFKernels(),
    iterations: int = 5,
    cache_spatial: bool = True,
    spacing: tuple[float, float, float] | None = None,
) -> Tensor:
    """``pydensecrf``'s README recipe, batched, on any device; in 2-D or, on ``(B, C, D, H, W)``
    volumes with ``spacing``, in 3-D.

    Equivalent to, per image, ``d = DenseCRF2D(W, H, C)``,
    ``d.setUnaryEnergy(-log(max(probs, PROB_FLOOR)))``,
    ``d.addPairwiseGaussian(sxy=kernels.gaussian_sxy, compat=kernels.gaussian_compat)``,
    ``d.addPairwiseBilateral(sxy=kernels.bilateral_sxy, srgb=kernels.bilateral_schan,
    rgbim=image, compat=kernels.bilateral_compat)``, ``d.inference(iterations)``
    (for ``K != 3`` channels: ``DenseCRF`` + ``addPairwiseEnergy`` on the same
    features).

    Args:
        probs: ``(B, C, H, W)`` class probabilities (clamped below at
            :data:`~segrefine.crf.params.PROB_FLOOR` before the log, as the
            densecrf head's pydensecrf backend does).
        image: ``(B, K, H, W)`` float, 0-255 scale (``pydensecrf`` takes
            uint8, so integer-valued images reproduce it exactly).
        kernels: widths and weights (:class:`~segrefine.crf.params.CRFKernels`;
            pydensecrf's README values are
            :data:`~segrefine.crf.params.PYDENSECRF_KERNELS`).
        cache_spatial: reuse the spatial (Gaussian) kernel's lattice across
            calls with the same image size (it does not depend on the image);
            ``False`` rebuilds it, like ``pydensecrf`` does every call.

        spacing: for 5-D inputs only, and required there: the voxel size
            ``(sz, sy, sx)`` in mm along D, H and W. The kernel widths
            ``gaussian_sxy`` and ``bilateral_sxy`` are then in mm (the
            intensity width ``bilateral_schan`` stays on the image's scale).

    Returns:
        ``(B, C, H, W)`` (or ``(B, C, D, H, W)``) float32 probabilities ``Q``.

    **Volumes** (3-D, DeepMedic's fully connected CRF): per volume this equals pydensecrf's
    general ``DenseCRF(D*H*W, C)`` with ``setUnaryEnergy(-log(max(probs, PROB_FLOOR)))``,
    ``addPairwiseEnergy(f_s, compat=gaussian_compat)`` and ``addPairwiseEnergy(f_b,
    compat=bilateral_compat)`` (diagonal kernels, symmetric normalisation), ``inference``, where
    ``f_s`` are the voxel positions ``(x, y, z)`` in mm over ``gaussian_sxy`` and ``f_b`` the
    positions over ``bilateral_sxy`` followed by the image channels over ``bilateral_schan``
    (:func:`volume_features`; x along W). Both lattices are built per call (volumes differ in
    size; ``cache_spatial`` applies to 2-D images only).
    """
    if not isinstance(kernels, CRFKernels):
        raise TypeError(f"kernels must be a segrefine.crf.CRFKernels, got {type(kernels).__name__}; "
                        "build one with CRFKernels(**values)")
    if probs.dim() == 5:
        return _dense_crf_volume(probs, image, kernels, iterations, spacing)
    if spacing is not None:
        raise ValueError("spacing is for (B, C, D, H, W) volumes; 2-D images take widths in pixels")
    _check_inputs(probs, image)
    B, C, H, W = probs.shape
    k = kernels

    def filters() -> list:
        # one lattice after the other (each build uses all threads): their build peaks never add up
        spatial = _spatial_filter(B, H, W, k.gaussian_sxy, NORMALIZE_SYMMETRIC, probs.device, cache_spatial, False)
        bilateral = PermutohedralLattice(bilateral_features(image, k.bilateral_sxy, k.bilateral_schan),
                                         transposes=False)
        return [spatial, _normalized(bilateral, NORMALIZE_SYMMETRIC)]

    logits = to_flat(torch.log(probs.to(torch.float32).clamp_min(PROB_FLOOR)))
    return from_flat(class_softmax(_offline_mean_field(logits, filters, kernels, iterations)), B, H, W)


def _offline_mean_field(logits: Tensor, filters, kernels: CRFKernels, iterations: int) -> Tensor:
    """``dense_crf``'s inference on flat ``(N, C)`` log-probabilities: Potts weights from
    ``kernels``, the spatial and bilateral ``filters()`` built only when there are iterations."""
    if iterations <= 0:
        return logits
    weights = [torch.tensor(w, device=logits.device) for w in (kernels.gaussian_compat, kernels.bilateral_compat)]
    return _mean_field(logits, filters(), weights, None, iterations)


def _dense_crf_volume(probs: Tensor, image: Tensor, kernels: CRFKernels, iterations: int, spacing) -> Tensor:
    """:func:`dense_crf` on ``(B, C, D, H, W)`` volumes with voxel ``spacing`` (mm)."""
    if image.dim() != 5 or image.shape[0] != probs.shape[0] or image.shape[2:] != probs.shape[2:]:
        raise ValueError(f"a volume's probs {tuple(probs.shape)} need an image (B, K, D, H, W) of the same B, D, H, W; "
                         f"got {tuple(image.shape)}")
    if image.device != probs.device:
        raise ValueError(f"probs on {probs.device} but image on {image.device}")
    if spacing is None:
        raise ValueError("dense_crf on (B, C, D, H, W) volumes needs spacing=(sz, sy, sx), the voxel size in mm "
                         "(the kernel widths are then in mm)")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 and s < float("inf") for s in spacing):
        raise ValueError(f"spacing must be three positive voxel sizes (sz, sy, sx) in mm, got {spacing}")
    B, C, D, H, W = probs.shape
    k, device = kernels, probs.device

    def filters() -> list:
        spatial = PermutohedralLattice(volume_features((D, H, W), spacing, k.gaussian_sxy, device=device),
                                       transposes=False)
        spatial = _normalized(spatial, NORMALIZE_SYMMETRIC).repeat(B)  # the same for every volume of the batch
        bilateral = PermutohedralLattice(
            torch.stack([volume_features((D, H, W), spacing, k.bilateral_sxy, image[b], k.bilateral_schan, device)
                         for b in range(B)]),
            transposes=False)
        return [spatial, _normalized(bilateral, NORMALIZE_SYMMETRIC)]

    logits = torch.log(probs.to(torch.float32).movedim(1, -1).reshape(B * D * H * W, C).clamp_min(PROB_FLOOR))
    S = _offline_mean_field(logits, filters, kernels, iterations)
    return class_softmax(S).view(B, D, H, W, C).movedim(-1, 1).contiguous()
