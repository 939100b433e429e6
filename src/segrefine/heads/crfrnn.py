"""The ``crfrnn`` head: CRF-as-RNN (Zheng et al., ICCV 2015), trained end to end.

Mean-field inference of the fully connected CRF unrolled as layers on the backbone's
upsampled logits, guided by the input image (on the 0-255 scale, as the densecrf head).
Kernel weights and the C x C compatibility are learned; bandwidths are fixed. With the
same parameters and before training it computes exactly what the ``densecrf`` head does
(``segrefine.crf.MeanFieldCRF`` reproduces pydensecrf). 5 iterations in training and 10
at evaluation by default, as in the paper. Returns log-probabilities.

``parametrisation``: ``potts`` (default; scalar kernel weights, a symmetrised compatibility,
kernels normalised symmetrically as pydensecrf, hence the parity above) or ``zheng``
(Zheng et al.'s layer, ``segrefine.crf.ZhengMeanFieldCRF``: a C x C weight matrix per kernel
initialised ``w * I``, an unsymmetrised compatibility initialised ``I``, kernels normalised
"after" (D^-1 K), as the official CRF-as-RNN code). Before training, ``zheng`` equals the
Potts CRF with "after" normalisation, which differs slightly from pydensecrf's default.
"""

from __future__ import annotations

import torch

from segrefine.crf import CRFKernels, MeanFieldCRF, ZhengMeanFieldCRF
from segrefine.heads.base import Head, head_kernels, to_255, upsample_logits
from segrefine.types import BackboneOutput


PARAMETRISATIONS = ("potts", "zheng")


class CRFRNNHead(Head):
    """CRF-as-RNN head. The kernel arguments are conf/head/crfrnn.yaml's flat keys (what Hydra
    passes), defaulting to :class:`~segrefine.crf.params.CRFKernels`'s values (the yaml's);
    the weights are initial values."""

    untrained = "untrained: initialised from the config (equal to densecrf with the same parameters)"
    CONFIG_RULES = {"iterations": (int, 1, ()), "eval_iterations": (int, 1, ())}

    def __init__(
        self,
        num_classes: int,
        backbone=None,
        iterations: int = 5,
        eval_iterations: int = 10,
        gaussian_sxy: float = CRFKernels.gaussian_sxy,
        gaussian_compat: float = CRFKernels.gaussian_compat,
        bilateral_sxy: float = CRFKernels.bilateral_sxy,
        bilateral_schan: float = CRFKernels.bilateral_schan,
        bilateral_compat: float = CRFKernels.bilateral_compat,
        compatibility: str = "learned",
        learnable: bool = True,
        intensity_range: tuple[float, float] | None = None,
        parametrisation: str = "potts",
    ):
        super().__init__(num_classes, backbone)
        if parametrisation not in PARAMETRISATIONS:
            raise ValueError(f"head.parametrisation={parametrisation!r} is not one of {list(PARAMETRISATIONS)}")
        self.parametrisation = parametrisation
        self.intensity_range = tuple(intensity_range) if intensity_range is not None else None
        layer_args = dict(
            kernels=head_kernels(gaussian_sxy=gaussian_sxy, gaussian_compat=gaussian_compat,
                                 bilateral_sxy=bilateral_sxy, bilateral_schan=bilateral_schan,
                                 bilateral_compat=bilateral_compat),
            learnable=learnable,
            iterations=iterations,
            eval_iterations=eval_iterations,
        )
        if parametrisation == "zheng":
            if compatibility != "learned":
                raise ValueError(
                    f"head.compatibility={compatibility!r} does not apply to head.parametrisation=zheng, whose "
                    "compatibility is always a learned C x C matrix; drop the override or use parametrisation=potts"
                )
            self.crf = ZhengMeanFieldCRF(num_classes, **layer_args)
        else:
            self.crf = MeanFieldCRF(num_classes, compatibility=compatibility, **layer_args)

    def forward(self, out: BackboneOutput, image: torch.Tensor) -> torch.Tensor:
        logits = upsample_logits(out, image.shape[-2:])
        return self.crf(logits, to_255(image.float(), self.intensity_range))

    def extra_metrics(self) -> dict[str, float]:
        crf = self.crf
        if self.parametrisation == "zheng":
            m = crf.compatibility.detach()
            return {
                "spatial_weights_diag_mean": float(crf.spatial_weights.detach().diagonal().mean()),
                "bilateral_weights_diag_mean": float(crf.bilateral_weights.detach().diagonal().mean()),
                "compat_diag_mean": float(m.diagonal().mean()),
                "compat_asymmetry": float((m - m.t()).abs().max()),
            }
        # detached: float() of a tensor that requires grad warns
        values = {"spatial_weight": float(crf.spatial_weight.detach()),
                  "bilateral_weight": float(crf.bilateral_weight.detach())}
        if crf.compatibility is not None:
            m = crf.compatibility.detach()
            off_diagonal = ~torch.eye(len(m), dtype=torch.bool, device=m.device)
            values["compat_diag_mean"] = float(m.diagonal().mean())
            values["compat_offdiag_mean"] = float(m[off_diagonal].mean())
        return values
