"""The 3-D dense CRF (``dense_crf`` on (B, C, D, H, W) volumes with a voxel spacing in mm):
parity with pydensecrf's general ``DenseCRF(N, C)`` + ``addPairwiseEnergy`` on the same
features (built here by hand, in numpy), and the spacing acting as its features say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segrefine.crf import CRFKernels, dense_crf
from test_parity_pydensecrf import assert_parity as parity_bound

dcrf = pytest.importorskip("pydensecrf.densecrf")

pytestmark = pytest.mark.usefixtures("single_thread")

KERNELS = CRFKernels(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=12.0, bilateral_schan=13.0,
                     bilateral_compat=5.0)


def mri_like(shape, seed):
    """(D, H, W) 0-255 integer intensities: an ellipsoid brighter than its background, shading, noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    centre = [n / 2 for n in shape]
    blob = ((z - centre[0]) / (shape[0] / 3)) ** 2 + ((y - centre[1]) / (shape[1] / 3)) ** 2 + \
        ((x - centre[2]) / (shape[2] / 4)) ** 2 < 1
    image = 60 + 2 * y + 90 * blob + rng.normal(0, 6, shape)
    return np.clip(np.round(image), 0, 255).astype(np.float32)


def blotchy_probs(classes, shape, seed):
    rng = np.random.default_rng(seed + 7)
    coarse = rng.normal(0, 2.5, (classes, *(n // 3 + 2 for n in shape))).astype(np.float32)
    logits = np.kron(coarse, np.ones((1, 3, 3, 3), np.float32))[:, : shape[0], : shape[1], : shape[2]]
    logits = logits + rng.normal(0, 1, logits.shape).astype(np.float32)
    p = np.exp(logits - logits.max(0))
    return (p / p.sum(0)).astype(np.float32)


def features(shape, spacing, sxy, image=None, schan=None):
    """(d, N) float32: x, y, z voxel positions in mm over ``sxy`` (x along W), then intensity/schan."""
    D, H, W = shape
    sz, sy, sx = (np.float32(s) for s in spacing)
    width = np.float32(sxy)
    x = np.tile(np.arange(W, dtype=np.float32) * sx / width, D * H)
    y = np.tile(np.repeat(np.arange(H, dtype=np.float32) * sy / width, W), D)
    z = np.repeat(np.arange(D, dtype=np.float32) * sz / width, H * W)
    rows = [x, y, z]
    if image is not None:
        rows.append(image.reshape(-1).astype(np.float32) / np.float32(schan))
    return np.ascontiguousarray(np.stack(rows), dtype=np.float32)


def reference(probs, image, spacing, k=KERNELS, iterations=5):
    C, shape = probs.shape[0], probs.shape[1:]
    crf = dcrf.DenseCRF(int(np.prod(shape)), C)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(probs).reshape(C, -1)))
    crf.addPairwiseEnergy(features(shape, spacing, k.gaussian_sxy), compat=k.gaussian_compat)
    crf.addPairwiseEnergy(features(shape, spacing, k.bilateral_sxy, image, k.bilateral_schan), compat=k.bilateral_compat)
    return np.array(crf.inference(iterations), dtype=np.float32).reshape(probs.shape)


def ours(probs, image, spacing, k=KERNELS, iterations=5):
    q = dense_crf(torch.from_numpy(probs)[None], torch.from_numpy(image)[None, None], kernels=k,
                  iterations=iterations, spacing=spacing)
    assert q.shape == (1, *probs.shape)
    return q[0].numpy()


def assert_parity(q, ref):
    parity_bound(q, ref, min_agreement=0.999)  # volumes of a few thousand voxels: 0.1 % is a few voxels


@pytest.mark.parametrize("classes,spacing", [(3, (2.0, 0.9, 1.1)), (2, (1.0, 1.0, 1.0)), (4, (3.0, 0.8, 0.8))])
def test_volume_crf_matches_pydensecrf_general(classes, spacing):
    shape = (9, 21, 17)
    probs, image = blotchy_probs(classes, shape, classes), mri_like(shape, classes)
    q, ref = ours(probs, image, spacing), reference(probs, image, spacing)
    assert_parity(q, ref)
    assert np.abs(ref - probs).max() > 0.1  # the CRF changed something: parity is not trivial


def test_volume_batch_equals_each_volume_alone():
    shape = (6, 10, 12)
    probs = np.stack([blotchy_probs(3, shape, s) for s in (1, 2)])
    image = np.stack([mri_like(shape, s) for s in (1, 2)])
    both = dense_crf(torch.from_numpy(probs), torch.from_numpy(image)[:, None], kernels=KERNELS, spacing=(2, 1, 1))
    for b in range(2):
        assert_parity(both[b].numpy(), reference(probs[b], image[b], (2, 1, 1)))


def test_spacing_acts_as_its_features_predict():
    # The evidence for class 1 sits on the slices around slice 2, which itself leans to class 0.
    # Only the spatial kernel: with 2 mm between slices the neighbours are twice as far away in
    # mm, so they pull slice 2 less than at 1 mm, and the 2 mm result is pydensecrf's on z * 2.
    shape = (5, 8, 8)
    p1 = np.full(shape, 0.9, np.float32)
    p1[2] = 0.4
    probs = np.stack([1 - p1, p1])
    image = np.zeros(shape, np.float32)
    k = CRFKernels(gaussian_sxy=1.5, gaussian_compat=3.0, bilateral_sxy=1.0, bilateral_schan=1.0, bilateral_compat=0.0)
    near, far = ours(probs, image, (1, 1, 1), k), ours(probs, image, (2, 1, 1), k)
    assert near[1, 2].mean() > far[1, 2].mean() + 0.02
    assert_parity(far, reference(probs, image, (2, 1, 1), k))
    # In-plane, every voxel of slice 2 sees the same in both: only z moved.
    assert np.abs(near[1, 0] - far[1, 0]).max() > 1e-3  # the end slices feel it too (nearest neighbour at 2 vs 4 mm)


def test_volume_inputs_are_checked():
    probs = torch.full((1, 2, 3, 4, 5), 0.5)
    with pytest.raises(ValueError, match="spacing=\\(sz, sy, sx\\)"):
        dense_crf(probs, torch.zeros(1, 1, 3, 4, 5))
    with pytest.raises(ValueError, match="positive voxel sizes"):
        dense_crf(probs, torch.zeros(1, 1, 3, 4, 5), spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="same B, D, H, W"):
        dense_crf(probs, torch.zeros(1, 1, 3, 4, 4), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="spacing is for"):
        dense_crf(torch.full((1, 2, 4, 5), 0.5), torch.zeros(1, 1, 4, 5), spacing=(1, 1, 1))
