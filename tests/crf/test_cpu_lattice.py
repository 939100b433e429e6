"""The compiled CPU lattice build (segrefine.crf.cpu_lattice) against the torch build, and the
mean-field numerics that keep the CPU fast (probability floor, two-class softmax, layouts)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from segrefine.crf import PermutohedralLattice, dense_crf
from segrefine.crf.meanfield import (
    Q_FLOOR,
    from_flat,
    iteration_probs,
    class_softmax,
    to_flat,
    bilateral_features,
    spatial_features,
)
from segrefine.crf.params import PYDENSECRF_KERNELS

pydensecrf = pytest.importorskip("pydensecrf.densecrf")


@pytest.fixture
def threads():
    """Run with the given torch thread count (the compiled build uses as many), then restore."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _photo(height: int, width: int, seed: int) -> torch.Tensor:
    """(1, 3, H, W) 0-255 integer image: shading, a few flat discs, noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    im = (torch.rand(3, 1, 1, generator=g) * 120 + xx + 0.5 * yy).expand(3, height, width).clone()
    for _ in range(3):
        cy, cx = (torch.rand(2, generator=g) * torch.tensor([height, width])).tolist()
        m = ((yy - cy) ** 2 + (xx - cx) ** 2) < (min(height, width) / 4) ** 2
        im[:, m] = torch.rand(3, 1, generator=g) * 255
    return (im + torch.randn(3, height, width, generator=g) * 4).clamp(0, 255).round()[None]


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bilateral 5-D, N % 4 != 0 (phantom padding)": bilateral_features(_photo(23, 37, 1), 8.0, 13.0),
        "spatial 2-D": spatial_features(40, 50, 3.0)[None],
        "batch of 3, 4-D": torch.randn(3, 101, 4, generator=g) * 3,
        "integer features (rounding ties)": torch.randint(0, 5, (2, 50, 3), generator=g).float(),
        "1-D": torch.randn(1, 300, 1, generator=g) * 4,
        "wide range (+-1e4) and tiny (1e-3)": torch.cat([torch.randn(1, 200, 3, generator=g) * 1e4,
                                                       torch.randn(1, 200, 3, generator=g) * 1e-3], 1),
        "single pixel": torch.tensor([[[0.3, -1.2]]]),
    }


@pytest.mark.parametrize("backend", ["embedding_bag", "index"])
@pytest.mark.parametrize("case", list(_cases()))
def test_compiled_build_is_the_torch_build(case, backend):
    """Same lattice points, and the same filter and transposed filter up to the order of
    float additions, for the forward and the transposed filter."""
    f = _cases()[case]
    compiled = PermutohedralLattice(f, backend=backend)
    reference = PermutohedralLattice(f, backend=backend, build="torch")
    assert compiled.num_points == reference.num_points
    x = torch.randn(f.shape[0], f.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for transpose in (False, True):
        got, want = compiled.filter(x, transpose=transpose), reference.filter(x, transpose=transpose)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_compiled_build_without_densecrf_padding():
    f = bilateral_features(_photo(9, 11, 2), 4.0, 13.0)  # 99 pixels: padding would add points
    plain = PermutohedralLattice(f, densecrf_padding=False)
    reference = PermutohedralLattice(f, densecrf_padding=False, build="torch")
    padded = PermutohedralLattice(f)
    assert plain.num_points == reference.num_points < padded.num_points
    x = torch.rand(1, 99, 2, dtype=torch.float64)
    torch.testing.assert_close(plain.filter(x), reference.filter(x), rtol=1e-12, atol=1e-12)


def test_threads_change_only_the_numbering(threads):
    """With several threads each hashes its own range of pixels and the tables are merged:
    the same points and filter for any thread count (up to the order of float additions),
    and bit-identical builds for a given count."""
    one_image = bilateral_features(_photo(30, 41, 0), 8.0, 13.0)
    batch = torch.cat([bilateral_features(_photo(30, 41, s), 8.0, 13.0) for s in range(3)])
    for f in (one_image, batch):
        threads(1)
        reference = PermutohedralLattice(f)
        x = torch.rand(f.shape[0], f.shape[1], 2, dtype=torch.float64)
        for n in (2, 3, 4):
            threads(n)
            lattice, again = PermutohedralLattice(f), PermutohedralLattice(f)
            assert lattice.num_points == reference.num_points
            torch.testing.assert_close(lattice.filter(x), reference.filter(x), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(lattice.ones_response(), reference.ones_response(), rtol=1e-6, atol=0)
            for mine, twin in zip(lattice._stages(), again._stages()):
                for a, b in zip(mine.tensors(), twin.tensors()):
                    assert torch.equal(a, b)


def test_ones_response_is_the_filter_of_ones():
    f = bilateral_features(_photo(20, 30, 3), 6.0, 13.0)
    lat = PermutohedralLattice(f)
    ones = torch.ones(600, 1)
    torch.testing.assert_close(lat.ones_response(), lat.filter(ones).view(-1), rtol=2e-6, atol=0)
    big = lat.repeat(2)
    torch.testing.assert_close(big.ones_response(), big.filter(torch.ones(1200, 1)).view(-1), rtol=2e-6, atol=0)
    half = torch.full((600,), 0.5)
    scaled = lat.scaled(half, half)  # a different filter: its response is computed, not inherited
    torch.testing.assert_close(scaled.ones_response(), 0.25 * lat.ones_response(), rtol=2e-6, atol=0)


def test_bad_features_are_refused_by_the_compiled_build():
    with pytest.raises(ValueError, match="NaN or infinite"):
        PermutohedralLattice(torch.tensor([[0.0, 1.0], [float("inf"), 2.0]]))
    with pytest.raises(ValueError, match="build must be"):
        PermutohedralLattice(torch.zeros(4, 2), build="fast")
    with pytest.raises(OverflowError, match="int64"):  # a key box beyond int64, no fallback asked
        PermutohedralLattice(torch.tensor([[0.0] * 6, [1e5] * 6]), build="compiled")
    for build in ("auto", "torch"):  # beyond float32's integers: refused, not rounded to garbage
        with pytest.raises(ValueError, match="too large for the lattice's float32"):
            PermutohedralLattice(torch.tensor([[0.0, 0.0], [3e7, 1.0]]), build=build)


def test_iteration_probabilities_stay_normal_and_keep_the_gradient():
    """Confident logits would give probabilities below float32's normal range (slow on x86);
    the floor keeps them at >= 1e-20 and leaves everything else, and the gradient, as is."""
    S = torch.tensor([[0.0, -150.0, -3.0], [80.0, 0.0, -90.0]], requires_grad=True)
    Q = iteration_probs(S)
    exact = torch.softmax(S.double(), 1)
    plain = torch.softmax(S.detach(), 1)
    assert (plain < 1.18e-38).sum() == 2  # float32 softmax: subnormal or zero
    assert (Q >= Q_FLOOR).all() and Q.min().item() < 1e-19
    big = exact > 1e-12
    assert torch.equal(Q[big], torch.softmax(S, 1)[big])  # bit-identical above 1e-12
    # The floor is a constant: the gradient is the softmax's own, bit for bit (against torch's
    # softmax kernel, which sums in another order, it agrees to float32 rounding).
    w = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    (g,) = torch.autograd.grad((Q * w).sum(), S)
    (g_softmax,) = torch.autograd.grad((class_softmax(S) * w).sum(), S)
    assert torch.equal(g, g_softmax)
    (g_torch,) = torch.autograd.grad((torch.softmax(S, 1) * w).sum(), S)
    torch.testing.assert_close(g, g_torch, rtol=1e-5, atol=1e-12)


def test_dense_crf_with_saturated_unaries_matches_pydensecrf(monkeypatch):
    """Probabilities at the floor (1e-8, unary spread 18) with strong pairwise weights push
    classes far below float32's normal range inside pydensecrf. The probability floor changes
    nothing measurable (against the same code without it), and the result keeps the parity
    bound with pydensecrf (2e-5, as tests/crf/test_meanfield.py) and its labels."""
    H, W, C = 24, 32, 3
    img = _photo(H, W, 5)
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, C, (H // 8 + 1, W // 8 + 1), generator=g).repeat_interleave(8, 0).repeat_interleave(8, 1)
    probs = torch.nn.functional.one_hot(labels[:H, :W], C).permute(2, 0, 1).float().clamp(1e-8, 1)[None]
    probs = probs / probs.sum(1, keepdim=True)
    kernels = dataclasses.replace(PYDENSECRF_KERNELS, gaussian_compat=30.0, bilateral_compat=60.0)
    ours = dense_crf(probs, img, kernels=kernels, iterations=5)[0]
    d = pydensecrf.DenseCRF2D(W, H, C)
    d.setUnaryEnergy(np.ascontiguousarray(-np.log(probs[0].clamp_min(1e-8).numpy()).reshape(C, -1)))
    d.addPairwiseGaussian(sxy=kernels.gaussian_sxy, compat=kernels.gaussian_compat)
    rgb = np.ascontiguousarray(img[0].permute(1, 2, 0).numpy().astype(np.uint8))
    d.addPairwiseBilateral(sxy=kernels.bilateral_sxy, srgb=kernels.bilateral_schan, rgbim=rgb,
                           compat=kernels.bilateral_compat)
    ref = torch.from_numpy(np.array(d.inference(5))).view(C, H, W)
    assert (ref < 1e-30).any()  # the case the floor exists for
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)
    assert torch.equal(ours.argmax(0), ref.argmax(0))
    monkeypatch.setattr("segrefine.crf.meanfield.Q_FLOOR", 0.0)
    unfloored = dense_crf(probs, img, kernels=kernels, iterations=5)[0]
    assert (unfloored < 1e-30).any()
    torch.testing.assert_close(ours, unfloored, rtol=0, atol=1e-7)


@pytest.mark.parametrize("log", [False, True])
def test_two_class_softmax(log):
    S = torch.randn(1000, 2) * 30
    want = (torch.log_softmax if log else torch.softmax)(S.double(), 1)
    got = class_softmax(S, log=log)
    assert got.is_contiguous() and got.shape == S.shape
    if log:
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    else:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-37)


@pytest.mark.parametrize("classes", [2, 21])
@pytest.mark.parametrize("batch", [1, 3])
def test_flat_layout_round_trip(classes, batch):
    x = torch.randn(batch, classes, 5, 7)
    flat = to_flat(x)
    assert flat.is_contiguous()  # row-major, whatever the batch size
    assert torch.equal(flat, x.permute(0, 2, 3, 1).reshape(-1, classes))
    back = from_flat(flat, batch, 5, 7)
    assert back.is_contiguous() and torch.equal(back, x)
