"""data.boundary_contrast: class differences move from mean intensity into texture."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, binary_erosion, gaussian_filter

from segrefine.data.common import DataError
from segrefine.data.synthetic import SyntheticDataModule, generate_sample

ARGS = dict(image_size=64, num_classes=3, noise_std=0.12, class_contrast=0.22, bias_field=0.25, partial_volume_sigma=0.8)


def test_default_reproduces_the_original_generator_exactly():
    # Values recorded from the generator before boundary_contrast existed (same seed, size 48).
    rng = np.random.default_rng([1234, 0])
    out = [generate_sample(rng, 48, 3, 0.12, 0.22, 0.25, 0.8) for _ in range(3)]
    labels = hashlib.sha256(b"".join(mask.tobytes() for _, mask in out)).hexdigest()
    assert labels == "b1fe494b1d619f796cca520e9f7b94a4dcf7ebb7a05060104091f63c8b5a3f04"
    sums = [float(image.astype(np.float64).sum()) for image, _ in out]
    assert sums == pytest.approx([647.2506135823205, 599.9721640860662, 564.8752631712705], rel=1e-12)


def _boundary_statistics(boundary_contrast: float) -> tuple[float, float, np.ndarray]:
    """Median over structures of (inside - surrounding ring) median intensity, the median
    ratio of band-pass (texture-scale) energy inside vs the ring, and the label maps."""
    rng = np.random.default_rng(7)
    steps, texture, labels = [], [], []
    for _ in range(24):
        image, label = generate_sample(rng, boundary_contrast=boundary_contrast, **ARGS)
        image = image[0].astype(np.float64)
        labels.append(label)
        band = (gaussian_filter(image, 1.0) - gaussian_filter(image, 3.0)) ** 2
        for c in (1, 2):
            region = label == c
            inner = binary_erosion(region, iterations=2)  # away from the partial-volume edge
            ring = binary_dilation(region, iterations=5) & ~binary_dilation(region, iterations=2) & (label == 0)
            if inner.sum() < 20 or ring.sum() < 20:
                continue
            steps.append(np.median(image[inner]) - np.median(image[ring]))
            texture.append(band[inner].mean() / band[ring].mean())
    assert len(steps) >= 30  # enough structures measured for the medians to mean something
    return float(np.median(steps)), float(np.median(texture)), np.stack(labels)


def test_boundary_contrast_moves_class_differences_from_intensity_to_texture():
    step_1, texture_1, labels_1 = _boundary_statistics(1.0)
    step_0, texture_0, labels_0 = _boundary_statistics(0.0)
    step_half, _, _ = _boundary_statistics(0.5)
    assert np.array_equal(labels_0, labels_1)  # same shapes: only the appearance changes
    # At 1 a structure is ~0.22-0.44 brighter than its surroundings; at 0 the step is (almost) gone.
    assert step_1 > 0.25 and abs(step_0) < 0.15 * step_1
    assert 0.35 * step_1 < step_half < 0.65 * step_1
    # ... and the difference is carried by texture instead.
    assert texture_0 > 2.0 * texture_1


def test_cache_key_includes_boundary_contrast_and_range_is_checked(tmp_path):
    a = SyntheticDataModule(str(tmp_path), boundary_contrast=1.0)
    b = SyntheticDataModule(str(tmp_path), boundary_contrast=0.0)
    assert a.cache_dir != b.cache_dir and b.settings["boundary_contrast"] == 0.0
    with pytest.raises(DataError, match="data.boundary_contrast must be in"):
        SyntheticDataModule(str(tmp_path), boundary_contrast=1.5)
