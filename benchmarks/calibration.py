"""Calibration of the report's inference, by simulation (not a test; a fast run is in the suite).

Simulates studies from a hierarchical model whose truth is known and runs the report's own
statistics (``segrefine.report.paired_stats``) on each, then prints per seed count n and
pairing kind: the false-positive rate of a star when the true Δ is 0, the coverage of the
95 % interval, and the power at a true Δ of one seed-SD. Each simulated study holds one test
(a Holm family of one), so a star is p < 0.05.

The model, per trained model (seed) s and test image i of subject j(i), in metric units:

    retrained:    Δ_si = Δ + (h_s - b_s) + (u_sj - v_sj) + (e_si - f_si)
    same weights: Δ_si = Δ + g_s + w_sj + c_si

h, b ~ N(0, seed_sd) are two independently trained models' offsets; u, v ~ N(0, subject_sd)
and e, f ~ N(0, image_sd) their subject and image deviations. A post-hoc head on the same
weights changes each model's score by Δ + g_s, g ~ N(0, head_sd) (its gain varies with the
model), with subject and image deviations w ~ N(0, subject_sd), c ~ N(0, image_sd). With n ≥ 2
seeds the truth is Δ; with one seed and the same weights the report's test (†) is about that
model's own Δ + g_s: its null is a model whose own Δ is 0 (a comparison row shows what the
same test would claim about Δ over models).

    .venv/bin/python benchmarks/calibration.py                 # the README's table (about 1 min)
    .venv/bin/python benchmarks/calibration.py --studies 4000  # tighter Monte-Carlo error
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace

import numpy as np

from segrefine.report import ALPHA, ImageDifferences, hierarchical_bootstrap, paired_stats, sign_flip_p


@dataclass(frozen=True)
class Design:
    seed_sd: float = 0.01  # model-to-model SD of a trained model's mean score (1 point)
    image_sd: float = 0.02  # SD of a model's per-image deviations (2 points)
    subject_sd: float = 0.0  # SD of a model's per-subject deviations (clustered images)
    head_sd: float = 0.005  # model-to-model SD of a post-hoc head's gain on the same weights
    images: int = 50
    subjects: int = 0  # 0: images are independent; else images split evenly over subjects


def simulate_seed(design: Design, pairing: str, delta: float, rng: np.random.Generator) -> tuple[ImageDifferences, float]:
    """One seed's per-image differences and that model's own true Δ."""
    subjects = np.arange(design.images) % design.subjects if design.subjects else None
    if pairing == "retrained":
        model = delta + rng.normal(0, design.seed_sd) - rng.normal(0, design.seed_sd)
        image_sd, subject_sd = design.image_sd * math.sqrt(2), design.subject_sd * math.sqrt(2)
    else:
        model = delta + rng.normal(0, design.head_sd)
        image_sd, subject_sd = design.image_sd, design.subject_sd
    values = model + rng.normal(0, image_sd, design.images)
    if subjects is not None:
        values = values + rng.normal(0, subject_sd, design.subjects)[subjects]
    # The model's own Δ over the image population: its offset (the subject draws average out only
    # over infinitely many subjects, so they are part of this test set's error, not of the truth).
    names = None if subjects is None else np.array([f"s{k}" for k in subjects])
    return ImageDifferences(values, names), model


@dataclass
class Rates:
    stars: int = 0
    covered: int = 0
    tested: int = 0
    studies: int = 0

    def star_rate(self) -> float:
        return self.stars / self.studies

    def coverage(self) -> float | None:
        return self.covered / self.tested if self.tested else None


def run_cell(design: Design, pairing: str, seeds: int, delta: float, studies: int, rng: np.random.Generator,
             truth: str = "design") -> Rates:
    """``studies`` simulated studies through ``paired_stats``. ``truth``: "design" (what the
    report's test claims: Δ, or the one model's own Δ for a conditional test) or "population" (Δ)."""
    rates = Rates()
    for _ in range(studies):
        drawn = [simulate_seed(design, pairing, delta, rng) for _ in range(seeds)]
        test = paired_stats([d for d, _ in drawn], pairing)
        rates.studies += 1
        if test["p"] is None:
            continue
        target = drawn[0][1] if test["level"] == "images" and truth == "design" else delta
        rates.stars += test["p"] < ALPHA
        rates.tested += 1
        rates.covered += test["ci_low"] <= target <= test["ci_high"]
    return rates


def run_old_methods(design: Design, seeds: int, studies: int, rng: np.random.Generator) -> tuple[float, float | None]:
    """What the report did before: image-level sign flips on one retrained pair (star rate at
    Δ = 0) and the percentile hierarchical bootstrap across seeds (coverage of Δ = 0)."""
    stars = covered = 0
    for _ in range(studies):
        per_seed = [simulate_seed(design, "retrained", 0.0, rng)[0].values for _ in range(seeds)]
        if seeds == 1:
            stars += sign_flip_p(per_seed[0], resamples=999) < ALPHA
        else:
            low, high = np.percentile(hierarchical_bootstrap(per_seed, samples=2000, seed=int(rng.integers(1 << 30))),
                                      [2.5, 97.5])
            covered += low <= 0.0 <= high
    return stars / studies, (covered / studies if seeds > 1 else None)


def mc_error(rate: float, studies: int) -> float:
    return math.sqrt(max(rate * (1 - rate), 1e-12) / studies)


def calibration_table(studies: int = 2000, seed_counts=(1, 2, 3, 5, 10), seed: int = 0) -> list[dict]:
    """One record per (pairing, clustering, n): star rate at Δ = 0, coverage, power at Δ = seed_sd."""
    rng = np.random.default_rng(seed)
    designs = {"independent images": Design(), "10 subjects x 5 slices": Design(subject_sd=0.01, subjects=10)}
    records = []
    for clustering, design in designs.items():
        for pairing in ("retrained", "same weights"):
            for n in seed_counts:
                # One seed on the same weights: the test (†) is about that model's own Δ, so its
                # null is a model whose Δ is 0 (no head-gain spread); the last comparison row
                # reads the same test as a claim about Δ over models.
                cell = replace(design, head_sd=0.0) if pairing == "same weights" and n == 1 else design
                null = run_cell(cell, pairing, n, 0.0, studies, rng)
                alternative = run_cell(cell, pairing, n, design.seed_sd, studies, rng)
                records.append({"pairing": pairing, "images": clustering, "n": n, "test": _test_name(pairing, n),
                                "fp": null.star_rate(), "fp_se": mc_error(null.star_rate(), studies),
                                "coverage": null.coverage(), "power": alternative.star_rate()})
    return records


def _test_name(pairing: str, n: int) -> str:
    if n > 1:
        return "across seeds: t-interval, exact sign flip"
    return "conditional (†) on the model, over units" if pairing == "same weights" else "no test"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=2000, help="simulated studies per cell (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    records = calibration_table(args.studies, seed=args.seed)
    print(f"{args.studies} simulated studies per cell; seed SD 1 point, image SD 2 points, 50 images, head-gain SD "
          "0.5 points; clustered: 10 subjects x 5 slices, subject SD 1 point. Star = p < 0.05 (one test per study).\n")
    print("| images | pairing | n | test | false-positive stars (Δ = 0) | 95 % interval coverage | "
          "power (Δ = 1 seed-SD) |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        coverage = "–" if r["coverage"] is None else f"{100 * r['coverage']:.1f} %"
        print(f"| {r['images']} | {r['pairing']} | {r['n']} | {r['test']} | {100 * r['fp']:.1f} % "
              f"(± {100 * r['fp_se']:.1f}) | {coverage} | {100 * r['power']:.1f} % |")
    rng = np.random.default_rng(args.seed + 1)
    few = max(200, args.studies // 4)
    print(f"\nFor comparison ({few} studies each; not what the report does now):\n")
    print("| what | value |")
    print("|---|---|")
    old_fp, _ = run_old_methods(Design(), 1, few, rng)
    print(f"| image-level sign-flip test on one retrained pair, false-positive stars at Δ = 0 | {100 * old_fp:.1f} % |")
    for n in (2, 3, 5):
        _, old_cov = run_old_methods(Design(), n, few, rng)
        print(f"| percentile hierarchical bootstrap, {n} seeds, coverage | {100 * old_cov:.1f} % |")
    clustered = Design(subject_sd=0.01, subjects=10)
    population = run_cell(Design(), "same weights", 1, 0.0, few, rng, truth="population")
    print(f"| conditional (†) test read as a claim about Δ over models (one seed, same weights), false-positive stars "
          f"| {100 * population.star_rate():.1f} % |")
    independent = run_cell_as_independent(clustered, few, rng)
    print(f"| slices of 10 subjects tested as independent images (one seed, same weights), false-positive stars "
          f"| {100 * independent:.1f} % |")
    print(f"\n({time.perf_counter() - start:.0f} s)")


def run_cell_as_independent(design: Design, studies: int, rng: np.random.Generator) -> float:
    """Star rate at the model's own Δ = 0 when slices of subjects are tested as if independent."""
    stars = 0
    for _ in range(studies):
        d, model = simulate_seed(design, "same weights", 0.0, rng)
        values = d.values - model  # the model's own Δ set to 0: only subject and slice noise left
        stars += paired_stats([ImageDifferences(values, None)], "same weights")["p"] < ALPHA
    return stars / studies


if __name__ == "__main__":
    main()
