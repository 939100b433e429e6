"""The ``densecrf`` head: offline fully connected CRF (Krähenbühl & Koltun 2011) on the
backbone's softmax at evaluation, guided by the input image.

Training is exactly ``none``'s (the CRF has no parameters and is not applied in training
mode). At validation/test the softmax of the upsampled logits is refined by mean field
with a spatial Gaussian kernel and a bilateral kernel over positions and image channels,
on the image mapped to the 0-255 scale the default parameters assume.

Two backends: ``pydensecrf`` (the reference C++ code, CPU, one image per call, run in a
pool of worker processes) and ``torch`` (``segrefine.crf.dense_crf``, batched, any device).
"""

from __future__ import annotations

import os
import weakref
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch

from segrefine.crf.params import PROB_FLOOR, CRFKernels
from segrefine.hardware import available_cpus
from segrefine.heads.base import Head, upsample_logits
from segrefine.types import BackboneOutput

BACKENDS = ("pydensecrf", "torch")


def crf_features(height: int, width: int, image: np.ndarray | None, sxy: float, schan: float = 1.0) -> np.ndarray:
    """``(d, H*W)`` float32 features: ``x/sxy, y/sxy`` (x = column, as DenseCRF2D) then channels/schan."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rows = [x.ravel() / sxy, y.ravel() / sxy]
    if image is not None:
        rows += [channel.ravel().astype(np.float32) / schan for channel in image]
    return np.ascontiguousarray(np.stack(rows), dtype=np.float32)


def pydensecrf_refine(probs: np.ndarray, image: np.ndarray, iterations: int, kernels: CRFKernels) -> np.ndarray:
    """One image through pydensecrf: ``probs`` (C,H,W), ``image`` (K,H,W) on 0-255 -> (C,H,W) probabilities."""
    import pydensecrf.densecrf as dcrf

    num_classes, height, width = probs.shape
    unary = np.ascontiguousarray(-np.log(np.maximum(probs, PROB_FLOOR)).reshape(num_classes, -1), dtype=np.float32)
    k = kernels
    crf = dcrf.DenseCRF(height * width, num_classes)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseEnergy(crf_features(height, width, None, k.gaussian_sxy), compat=k.gaussian_compat)
    crf.addPairwiseEnergy(crf_features(height, width, image, k.bilateral_sxy, k.bilateral_schan),
                          compat=k.bilateral_compat)
    q = np.array(crf.inference(iterations), dtype=np.float32)
    return q.reshape(num_classes, height, width)


def default_workers() -> int:
    """pydensecrf pool size: the CPUs this process may use (affinity, ``SLURM_CPUS_PER_TASK``)
    shared among the processes of one node (``LOCAL_WORLD_SIZE``, set by torchrun and
    Lightning's DDP), so several ranks do not each start a pool the size of the machine."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    try:
        ranks = max(1, int(local)) if local else 1
    except ValueError:
        raise ValueError(f"LOCAL_WORLD_SIZE={local!r} is not an integer") from None
    return max(1, available_cpus() // ranks)


def _refine_job(args: tuple) -> np.ndarray:
    return pydensecrf_refine(*args)


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


class DenseCRFHead(Head):
    """Offline dense CRF. The kernel arguments are conf/head/densecrf.yaml's flat keys (what
    Hydra passes), held as ``self.kernels`` (:class:`~segrefine.crf.params.CRFKernels`, whose
    defaults these are)."""

    untrained = "none needed (fixed CRF parameters from the config)"

    def __init__(
        self,
        num_classes: int,
        backbone=None,
        backend: str = "pydensecrf",
        iterations: int = 5,
        gaussian_sxy: float = CRFKernels.gaussian_sxy,
        gaussian_compat: float = CRFKernels.gaussian_compat,
        bilateral_sxy: float = CRFKernels.bilateral_sxy,
        bilateral_schan: float = CRFKernels.bilateral_schan,
        bilateral_compat: float = CRFKernels.bilateral_compat,
        intensity_range: tuple[float, float] | None = None,
        num_workers: int | None = None,
    ):
        super().__init__(num_classes, backbone)
        if backend not in BACKENDS:
            raise ValueError(f"head.backend={backend!r} must be one of {BACKENDS}")
        self.backend = backend
        self.iterations = iterations
        self.kernels = head_kernels(gaussian_sxy=gaussian_sxy, gaussian_compat=gaussian_compat,
                                    bilateral_sxy=bilateral_sxy, bilateral_schan=bilateral_schan,
                                    bilateral_compat=bilateral_compat)
        self.intensity_range = tuple(intensity_range) if intensity_range is not None else None
        self.num_workers = default_workers() if num_workers is None else int(num_workers)
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the parent holds torch/wandb threads that must not be copied mid-state.
            self._pool = ProcessPoolExecutor(self.num_workers, mp_context=get_context("spawn"))
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        return self._pool

    def refine(self, probs: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """CRF-refined probabilities ``(B, C, H, W)`` for softmax ``probs`` and the raw ``image``."""
        image255 = to_255(image.float(), self.intensity_range)
        if self.backend == "torch":
            from segrefine.crf import dense_crf

            return dense_crf(probs.float(), image255, kernels=self.kernels, iterations=self.iterations)
        probs_np = probs.detach().float().cpu().numpy()
        image_np = image255.detach().cpu().numpy()
        jobs = [(probs_np[i], image_np[i], self.iterations, self.kernels) for i in range(len(probs_np))]
        if self.num_workers <= 1 or len(jobs) == 1:
            refined = [_refine_job(job) for job in jobs]
        else:
            refined = list(self._executor().map(_refine_job, jobs))
        return torch.from_numpy(np.stack(refined)).to(probs.device)

    def forward(self, out: BackboneOutput, image: torch.Tensor) -> torch.Tensor:
        logits = upsample_logits(out, image.shape[-2:])
        if self.training:
            return logits
        with torch.no_grad():
            refined = self.refine(logits.softmax(1), image)
        return refined.clamp(min=PROB_FLOOR).log()
