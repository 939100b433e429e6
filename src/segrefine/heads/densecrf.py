"""The ``densecrf`` head: offline fully connected CRF (Krähenbühl & Koltun 2011) on the
backbone's softmax at evaluation, guided by the input image.

Training is exactly ``none``'s (the CRF has no parameters and is not applied in training
mode). At validation/test the softmax of the upsampled logits is refined by mean field
with a spatial Gaussian kernel and a bilateral kernel over positions and image channels,
on the image mapped to the 0-255 scale the default parameters assume.

Two backends: ``pydensecrf`` (the reference C++ code, CPU, one image per call, run in a
pool of worker processes) and ``torch`` (``segrefine.crf.dense_crf``, batched, any device).

``volume=true`` makes it a 3-D CRF (DeepMedic's): on a volumetric source, evaluated per subject
(``segrefine-eval``, tuning), the softmax of every slice is restacked into the subject's volume
(padding removed) and refined at once, with the kernel widths in mm (the voxel spacing from the
data) and the intensities mapped to 0-255 per volume. It is post-hoc only.
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
from segrefine.heads.base import Head, head_kernels, to_255, upsample_logits
from segrefine.types import BackboneOutput

BACKENDS = ("pydensecrf", "torch")


def crf_features(height: int, width: int, image: np.ndarray | None, sxy: float, schan: float = 1.0) -> np.ndarray:
    """``(d, H*W)`` float32 features: ``x/sxy, y/sxy`` (x = column, as DenseCRF2D) then channels/schan."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rows = [x.ravel() / sxy, y.ravel() / sxy]
    if image is not None:
        rows += [channel.ravel().astype(np.float32) / schan for channel in image]
    return np.ascontiguousarray(np.stack(rows), dtype=np.float32)


def pydensecrf_refine(probs: np.ndarray, image: np.ndarray, iterations: int, kernels: CRFKernels,
                      spacing=None) -> np.ndarray:
    """One image through pydensecrf: ``probs`` (C,H,W), ``image`` (K,H,W) on 0-255 -> (C,H,W)
    probabilities; with ``spacing`` (sz, sy, sx) mm, one volume: ``probs`` (C,D,H,W), ``image``
    (K,D,H,W) -> (C,D,H,W), the kernel widths in mm."""
    import pydensecrf.densecrf as dcrf

    num_classes, shape = probs.shape[0], probs.shape[1:]
    unary = np.ascontiguousarray(-np.log(np.maximum(probs, PROB_FLOOR)).reshape(num_classes, -1), dtype=np.float32)
    k = kernels
    if spacing is None:
        def features(sxy, img=None, schan=1.0):
            return crf_features(*shape, img, sxy, schan)
    else:
        def features(sxy, img=None, schan=1.0):
            return volume_features_np(shape, spacing, sxy, img, schan)
    crf = dcrf.DenseCRF(int(np.prod(shape)), num_classes)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseEnergy(features(k.gaussian_sxy), compat=k.gaussian_compat)
    crf.addPairwiseEnergy(features(k.bilateral_sxy, image, k.bilateral_schan), compat=k.bilateral_compat)
    return np.array(crf.inference(iterations), dtype=np.float32).reshape(probs.shape)


def volume_features_np(shape, spacing, sxy: float, image: np.ndarray | None = None, schan: float = 1.0) -> np.ndarray:
    """``(d, D*H*W)`` float32 features for pydensecrf's general ``DenseCRF``: voxel positions
    ``(x, y, z)`` in mm over ``sxy`` (x along W; ``spacing = (sz, sy, sx)``), then the ``(K, D, H,
    W)`` image's channels over ``schan`` (as :func:`segrefine.crf.meanfield.volume_features`)."""
    from segrefine.crf.meanfield import volume_features

    image_t = None if image is None else torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    return np.ascontiguousarray(volume_features(shape, spacing, sxy, image_t, schan).t().numpy())


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


class DenseCRFHead(Head):
    """Offline dense CRF. The kernel arguments are conf/head/densecrf.yaml's flat keys (what
    Hydra passes), held as ``self.kernels`` (:class:`~segrefine.crf.params.CRFKernels`, whose
    defaults these are)."""

    untrained = "none needed (fixed CRF parameters from the config)"
    CONFIG_RULES = {"iterations": (int, 1, ())}

    @classmethod
    def training_problem(cls, config: dict) -> str | None:
        if config.get("volume"):
            return ("head.volume=true (the 3-D CRF per subject volume) is post-hoc only: train with head=none and "
                    "evaluate its checkpoint with segrefine-eval head=densecrf head.volume=true")
        return None

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
        volume: bool = False,
    ):
        super().__init__(num_classes, backbone)
        self.volume = bool(volume)
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

    def refine(self, probs: torch.Tensor, image: torch.Tensor, spacing=None) -> torch.Tensor:
        """CRF-refined probabilities ``(B, C, H, W)`` for softmax ``probs`` and the raw ``image``;
        with ``spacing`` (sz, sy, sx) mm, of volumes ``(B, C, D, H, W)`` (kernel widths in mm)."""
        image255 = to_255(image.float(), self.intensity_range)
        if self.backend == "torch":
            from segrefine.crf import dense_crf

            return dense_crf(probs.float(), image255, kernels=self.kernels, iterations=self.iterations, spacing=spacing)
        probs_np = probs.detach().float().cpu().numpy()
        image_np = image255.detach().cpu().numpy()
        jobs = [(probs_np[i], image_np[i], self.iterations, self.kernels, spacing) for i in range(len(probs_np))]
        if self.num_workers <= 1 or len(jobs) == 1:
            refined = [_refine_job(job) for job in jobs]
        else:
            refined = list(self._executor().map(_refine_job, jobs))
        return torch.from_numpy(np.stack(refined)).to(probs.device)

    def slice_logits(self, out: BackboneOutput, image: torch.Tensor) -> torch.Tensor:
        """The 3-D CRF's per-slice part: the upsampled logits, as ``none``'s; the 2-D CRF's
        forward otherwise."""
        if self.volume:
            return upsample_logits(out, image.shape[-2:])
        return super().slice_logits(out, image)

    def refine_volume(self, logits: torch.Tensor, image: torch.Tensor, spacing, height: int, width: int) -> torch.Tensor:
        """The 3-D CRF on one subject: ``logits`` ``(S, C, H, W)`` of its slices in order, ``image``
        ``(S, K, H, W)``, both padded bottom/right beyond ``height x width``; ``spacing`` ``(sz, sy,
        sx)`` mm. Returns log-probabilities ``(S, C, H, W)`` (the padding keeps the softmax).
        Without a fixed ``intensity_range`` the 0-255 mapping is the min-max of the whole volume
        (padding removed), not of each slice: the volume is one image of ``refine``."""
        with torch.no_grad():
            probs = logits.float().softmax(1)
            inner = probs[..., :height, :width].movedim(0, 1)[None]  # (1, C, S, h, w)
            volume_image = image[..., :height, :width].movedim(0, 1)[None]  # (1, K, S, h, w)
            refined = self.refine(inner, volume_image, tuple(float(v) for v in spacing))
            probs = probs.clone()
            probs[..., :height, :width] = refined[0].movedim(0, 1).to(probs.device)
        return probs.clamp(min=PROB_FLOOR).log()

    def forward(self, out: BackboneOutput, image: torch.Tensor) -> torch.Tensor:
        logits = upsample_logits(out, image.shape[-2:])
        if self.training:
            return logits
        if self.volume:
            raise RuntimeError(
                "head.volume=true refines whole subject volumes and is post-hoc only: evaluate a checkpoint of a "
                "volumetric source (data=msd) with segrefine-eval head=densecrf head.volume=true (training and 2-D "
                "data use head.volume=false)")
        with torch.no_grad():
            refined = self.refine(logits.softmax(1), image)
        return refined.clamp(min=PROB_FLOOR).log()
