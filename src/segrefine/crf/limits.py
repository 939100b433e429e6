"""The float32 limit both lattice builds (``lattice.py`` in torch, ``cpu_lattice.py`` compiled)
share, in a module of its own so that neither build imports the other."""

from __future__ import annotations

# Elevated coordinates (float32, as densecrf) are rounded to lattice points; from 2^22 on their
# spacing approaches 1 and the rounding, ranks and weights stop making sense. Both builds refuse.
EXACT_LIMIT = 2.0**22


def features_too_large(largest: float) -> ValueError:
    return ValueError(
        f"features up to {largest:.3g} are too large for the lattice's float32 coordinates "
        "(elevated values must stay below 2^22): use larger bandwidths")
