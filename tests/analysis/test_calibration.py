"""The report's stars and intervals are calibrated: a fast run of benchmarks/calibration.py,
studies simulated from a hierarchical model whose truth is known (a few hundred per cell, so the
bounds allow 3 Monte-Carlo standard errors)."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

SPEC = importlib.util.spec_from_file_location("calibration", Path(__file__).parents[2] / "benchmarks" / "calibration.py")
calibration = importlib.util.module_from_spec(SPEC)
sys.modules["calibration"] = calibration  # dataclasses look their module up there
SPEC.loader.exec_module(calibration)

STUDIES = 400
NOMINAL_FP, NOMINAL_COVERAGE = 0.05, 0.95
FP_BOUND = NOMINAL_FP + 3 * math.sqrt(NOMINAL_FP * (1 - NOMINAL_FP) / STUDIES)  # 8.3 %
COVERAGE_BOUND = NOMINAL_COVERAGE - 3 * math.sqrt(NOMINAL_COVERAGE * (1 - NOMINAL_COVERAGE) / STUDIES)  # 91.7 %
CLUSTERED = calibration.Design(subject_sd=0.01, subjects=10)


@pytest.mark.parametrize("design, pairing, seeds", [
    (calibration.Design(), "retrained", 3),
    (calibration.Design(), "retrained", 10),
    (calibration.Design(), "same weights", 2),
    (calibration.Design(head_sd=0.0), "same weights", 1),  # conditional: the one model's own Δ is the truth
    (calibration.Design(head_sd=0.0, subject_sd=0.01, subjects=10), "same weights", 1),  # subjects as the unit
])
def test_stars_are_false_at_most_5_percent_and_intervals_cover_95(design, pairing, seeds):
    rng = np.random.default_rng(seeds)
    null = calibration.run_cell(design, pairing, seeds, 0.0, STUDIES, rng)
    assert null.tested == STUDIES  # every study had a test
    assert null.star_rate() <= FP_BOUND
    assert null.coverage() >= COVERAGE_BOUND


def test_one_retrained_model_per_side_is_never_starred():
    null = calibration.run_cell(calibration.Design(), "retrained", 1, 0.0, 200, np.random.default_rng(0))
    strong = calibration.run_cell(calibration.Design(), "retrained", 1, 0.05, 200, np.random.default_rng(1))
    assert null.tested == strong.tested == 0 and null.stars == strong.stars == 0


def test_the_simulation_catches_what_the_report_used_to_claim():
    # The same bounds fail the old methods: image-level tests of a retrained pair, a percentile
    # bootstrap over 3 seeds, and slices of 10 subjects taken as independent images.
    rng = np.random.default_rng(7)
    old_fp, _ = calibration.run_old_methods(calibration.Design(), 1, 200, rng)
    _, old_coverage = calibration.run_old_methods(calibration.Design(), 3, 200, rng)
    assert old_fp > 0.3 and old_coverage < COVERAGE_BOUND
    assert calibration.run_cell_as_independent(CLUSTERED, 300, rng) > FP_BOUND
