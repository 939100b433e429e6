"""The dense CRF's kernel parameters (one name per quantity) and its probability floor."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["CRFKernels", "PYDENSECRF_KERNELS", "CRFRNN_PAPER_KERNELS", "PROB_FLOOR"]

# Probabilities are clamped to at least this before ``-log p`` (a softmax saturates to exact 0
# and 1): the unary energy stays finite. Every backend uses it (pydensecrf and
# segrefine.crf.dense_crf), so they agree on saturated inputs.
PROB_FLOOR = 1e-8


@dataclass(frozen=True)
class CRFKernels:
    """Widths and weights of the fully connected CRF's two Gaussian kernels.

    The pairwise potential of Krähenbühl & Koltun (2011), for pixels ``i, j`` at positions
    ``p`` with image values ``I``::

        w1 exp(-|p_i - p_j|^2 / 2 θα^2 - |I_i - I_j|^2 / 2 θβ^2)    bilateral (appearance)
      + w2 exp(-|p_i - p_j|^2 / 2 θγ^2)                              spatial ("Gaussian", smoothness)

    ================  ==================================  ======  =====================================
    field             pydensecrf                          paper   meaning
    ================  ==================================  ======  =====================================
    gaussian_sxy      ``addPairwiseGaussian(sxy=)``       θγ      spatial kernel width (pixels)
    gaussian_compat   ``addPairwiseGaussian(compat=)``    w2      spatial kernel weight (Potts)
    bilateral_sxy     ``addPairwiseBilateral(sxy=)``      θα      bilateral kernel position width (pixels)
    bilateral_schan   ``addPairwiseBilateral(srgb=)``     θβ      bilateral kernel intensity width
                                                                  (image units: 0-255 for pydensecrf)
    bilateral_compat  ``addPairwiseBilateral(compat=)``   w1      bilateral kernel weight (Potts)
    ================  ==================================  ======  =====================================

    The field names are the keys of conf/head/densecrf.yaml and conf/head/crfrnn.yaml, and the
    defaults here are those files' values (narrow, weak kernels for small slices); see
    :data:`PYDENSECRF_KERNELS` and :data:`CRFRNN_PAPER_KERNELS` for the published ones. In the
    CRF-as-RNN layers the weights are the initial values of learned parameters; the widths are
    never learned.
    """

    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 5.0
    bilateral_schan: float = 13.0
    bilateral_compat: float = 3.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{field.name}={value!r} is not a number (default {field.default})") from None
            if field.name.endswith("_compat"):
                if not math.isfinite(number):
                    raise ValueError(f"{field.name}={value!r}: a kernel weight must be a finite number "
                                     f"(default {field.default}; 0 turns the kernel off)")
            elif not (number > 0 and math.isfinite(number)):
                raise ValueError(f"{field.name}={value!r}: a kernel width must be a positive finite number "
                                 f"(default {field.default})")
            object.__setattr__(self, field.name, number)  # ints from a config become floats

    def as_dict(self) -> dict[str, float]:
        """``{field: value}``, e.g. as flat head arguments or Hydra overrides."""
        return dataclasses.asdict(self)

    def replace(self, **changes: float) -> "CRFKernels":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


# pydensecrf's README example (for ~500x375 photographs).
PYDENSECRF_KERNELS = CRFKernels(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0, bilateral_schan=13.0,
                                bilateral_compat=10.0)
# Zheng et al.'s (2015) initial CRF-as-RNN values.
CRFRNN_PAPER_KERNELS = CRFKernels(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=160.0, bilateral_schan=3.0,
                                  bilateral_compat=5.0)
