"""Permutohedral lattice filter: accuracy vs the exact filter, linearity,
transpose, gradients, batching, backends, devices."""

from __future__ import annotations

import copy

import pytest
import torch

from segrefine.crf import PermutohedralLattice, exact_gaussian_filter
from segrefine.crf.lattice import _Bags
from segrefine.crf.meanfield import bilateral_features, spatial_features

pytestmark = pytest.mark.usefixtures("single_thread")


def _image(height: int, width: int, channels: int, seed: int) -> torch.Tensor:
    """(K, H, W) integer-valued 0-255 image: gradient, discs, mild noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    im = torch.rand(channels, 1, 1, generator=g) * 100 + 2.0 * xx
    im = im.expand(channels, height, width).clone()
    for _ in range(4):
        cy, cx = (torch.rand(2, generator=g) * torch.tensor([height, width])).tolist()
        r = 3 + float(torch.rand(1, generator=g)) * min(height, width) / 3
        m = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        im[:, m] = torch.rand(channels, 1, generator=g) * 255
    return (im + torch.randn(channels, height, width, generator=g) * 4).clamp(0, 255).round()


def _feature_cases() -> dict[str, torch.Tensor]:
    H, W = 24, 30
    return {
        "spatial-2d": spatial_features(H, W, 2.0),
        "gray-3d": bilateral_features(_image(H, W, 1, 2)[None], 5.0, 15.0)[0],
        "rgb-5d": bilateral_features(_image(H, W, 3, 1)[None], 6.0, 20.0)[0],
    }


def _accuracy(lat: PermutohedralLattice, f: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """Compare the lattice with the exact Gaussian filter.

    The raw lattice response K·1 is a scaled, blurred version of the exact
    one (tens of percent off per pixel), so compare (a) the spread of the
    ratio K·1 / exact·1 and (b) the *normalised* filter outputs Kv / K1 (local
    weighted means), relative to the spread of the exact output.
    """
    ones = torch.ones(f.shape[0], 1, dtype=torch.float64)
    D, De = lat.filter(ones), exact_gaussian_filter(f.double(), ones)
    ratio = (D / De).squeeze(1)
    out, ref = lat.filter(v) / D, exact_gaussian_filter(f.double(), v) / De
    rel = (out - ref).abs().mean() / (ref - ref.mean(0)).abs().mean()
    corr = torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1]
    return {
        "ratio_min": ratio.min().item(),
        "ratio_max": ratio.max().item(),
        "ratio_cv": (ratio.std() / ratio.mean()).item(),
        "rel": rel.item(),
        "corr": corr.item(),
    }


def _within_bounds(m: dict[str, float]) -> bool:
    # Documented approximation bound (crf-notes: K·1 is tens of percent off).
    return (
        0.3 <= m["ratio_min"]
        and m["ratio_max"] <= 1.2
        and m["ratio_cv"] <= 0.15
        and m["rel"] <= 0.2
        and m["corr"] >= 0.98
    )


@pytest.mark.parametrize("case", list(_feature_cases()))
def test_lattice_approximates_exact_filter(case):
    f = _feature_cases()[case]
    torch.manual_seed(0)
    v = torch.randn(f.shape[0], 3, dtype=torch.float64)
    m = _accuracy(PermutohedralLattice(f), f, v)
    assert _within_bounds(m), m


def test_accuracy_check_detects_broken_blur():
    """The bound above is tight enough to fail for a broken blur."""
    f = _feature_cases()["rgb-5d"]
    v = torch.randn(f.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lat = PermutohedralLattice(f)
    M = lat.num_points
    ident = _Bags(torch.arange(M), torch.arange(M + 1), torch.ones(M), None, M, M, 1)
    for broken_blur in ([ident] * (lat.dim + 1), [lat._blur[0]] + [ident] * lat.dim):
        broken = copy.copy(lat)
        broken._blur, broken._cache = broken_blur, {}
        assert not _within_bounds(_accuracy(broken, f, v))


def test_filter_is_linear_and_transpose_is_adjoint():
    f = _feature_cases()["rgb-5d"]
    lat = PermutohedralLattice(f)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(f.shape[0], 4, dtype=torch.float64, generator=g)
    y = torch.randn(f.shape[0], 4, dtype=torch.float64, generator=g)
    torch.testing.assert_close(lat.filter(2 * x + y), 2 * lat.filter(x) + lat.filter(y))
    lhs = (lat.filter(x) * y).sum()
    rhs = (x * lat.filter(y, transpose=True)).sum()
    torch.testing.assert_close(lhs, rhs)
    # the filter is genuinely not symmetric (blur axes in a fixed order)
    assert not torch.allclose(lat.filter(y), lat.filter(y, transpose=True))


def test_gradcheck_values():
    f = bilateral_features(_image(5, 6, 2, 3)[None], 2.0, 20.0)[0]
    lat = PermutohedralLattice(f)
    x = torch.randn(f.shape[0], 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: lat.filter(v), (x,))
    assert torch.autograd.gradcheck(lambda v: lat.filter(v, transpose=True), (x,))
    assert torch.autograd.gradgradcheck(lambda v: lat.filter(v) ** 2, (x,))


def test_gradcheck_values_index_backend():
    f = spatial_features(4, 7, 1.5)
    lat = PermutohedralLattice(f, backend="index")
    x = torch.randn(f.shape[0], 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: lat.filter(v), (x,))


def test_batch_images_are_independent():
    imgs = torch.stack([_image(13, 17, 3, s) for s in range(3)])
    f = bilateral_features(imgs, 4.0, 10.0)
    v = torch.rand(3, 13 * 17, 2)
    batched = PermutohedralLattice(f).filter(v)
    for b in range(3):
        single = PermutohedralLattice(f[b]).filter(v[b])
        torch.testing.assert_close(batched[b], single, rtol=1e-6, atol=1e-6)
    # identical images in one batch do not share lattice points
    same = PermutohedralLattice(f[:1].repeat(2, 1, 1))
    assert same.num_points == 2 * PermutohedralLattice(f[0]).num_points


def test_repeat_equals_batched_build():
    f = spatial_features(11, 9, 2.0)
    v = torch.rand(3, 99, 2)
    rep = PermutohedralLattice(f).repeat(3)
    built = PermutohedralLattice(f.expand(3, -1, -1))
    assert rep.num_points == built.num_points
    torch.testing.assert_close(rep.filter(v), built.filter(v))


def test_backends_agree():
    f = bilateral_features(_image(15, 12, 3, 4)[None], 5.0, 13.0)
    v = torch.rand(1, 180, 5)
    a = PermutohedralLattice(f, backend="embedding_bag")
    b = PermutohedralLattice(f, backend="index")
    torch.testing.assert_close(a.filter(v), b.filter(v))
    torch.testing.assert_close(a.filter(v, transpose=True), b.filter(v, transpose=True))


def test_scaled_equals_explicit_scaling():
    f = bilateral_features(_image(9, 8, 3, 5)[None], 3.0, 13.0)[0]
    lat = PermutohedralLattice(f)
    g = torch.Generator().manual_seed(2)
    pre, post = torch.rand(72, generator=g) + 0.5, torch.rand(72, generator=g) + 0.5
    x = torch.randn(72, 3, dtype=torch.float64, generator=g)
    s = lat.scaled(pre, post)
    expected = post[:, None].double() * lat.filter(pre[:, None].double() * x)
    torch.testing.assert_close(s.filter(x), expected, rtol=1e-5, atol=1e-6)
    expected_t = pre[:, None].double() * lat.filter(post[:, None].double() * x, transpose=True)
    torch.testing.assert_close(s.filter(x, transpose=True), expected_t, rtol=1e-5, atol=1e-6)


def _fitted_exponent(sizes: list[int], costs: list[int]) -> float:
    """``k`` of the least-squares fit ``cost ~ N^k`` (log-log)."""
    x = torch.tensor(sizes, dtype=torch.float64).log()
    y = torch.tensor(costs, dtype=torch.float64).log()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


@pytest.mark.parametrize("kind", ["natural", "noise"])
def test_lattice_cost_is_linear_in_pixels(kind):
    """Lattice points and stored bytes (deterministic costs, unlike time) grow at most linearly
    with the pixels: 16x more pixels over five sizes, for a natural-looking image and for
    uniform noise (the worst case: nearly every simplex vertex is a distinct point)."""
    sides = [16, 24, 32, 48, 64]
    pixels, points, stored = [], [], []
    for side in sides:
        if kind == "natural":
            image = _image(side, side, 3, 6)[None]
        else:
            image = torch.randint(0, 256, (1, 3, side, side), generator=torch.Generator().manual_seed(side)).float()
        lat = PermutohedralLattice(bilateral_features(image, 5.0, 13.0))
        n, d1 = side * side, 6
        assert lat._splat_f.indices.numel() == n * d1  # one splat entry per (pixel, simplex vertex)
        assert lat.num_points <= n * d1
        # slice/splat: ~24 bytes per (pixel, vertex); blur: ~48 bytes per (point, axis)
        assert lat.nbytes() <= 40 * n * d1 + 60 * lat.num_points * d1
        pixels.append(n)
        points.append(lat.num_points)
        stored.append(lat.nbytes())
    assert pixels[-1] >= 16 * pixels[0]
    assert _fitted_exponent(pixels, points) <= 1.1, points
    assert _fitted_exponent(pixels, stored) <= 1.1, stored


def test_fitted_exponent_detects_superlinear_cost():
    sizes = [256, 576, 1024, 2304, 4096]
    assert _fitted_exponent(sizes, [3 * n for n in sizes]) == pytest.approx(1.0)
    assert _fitted_exponent(sizes, [n * round(n**0.5) for n in sizes]) > 1.4


def test_single_pixel_and_constant_features():
    lat = PermutohedralLattice(torch.zeros(1, 3))
    out = lat.filter(torch.ones(1, 1))
    assert torch.isfinite(out).all() and out.item() > 0
    lat = PermutohedralLattice(torch.zeros(50, 2))
    out = lat.filter(torch.ones(50, 1))
    # all pixels coincide: every output equal
    assert torch.allclose(out, out[0].expand_as(out))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="features"):
        PermutohedralLattice(torch.zeros(2, 3, 4, 5))
    lat = PermutohedralLattice(torch.zeros(2, 10, 3))
    with pytest.raises(ValueError, match="do not match"):
        lat.filter(torch.zeros(2, 11, 1))
    with pytest.raises(ValueError, match="backend"):
        PermutohedralLattice(torch.zeros(4, 2), backend="nope")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    f = bilateral_features(_image(31, 29, 3, 7)[None].repeat(2, 1, 1, 1), 8.0, 13.0)
    v = torch.rand(2, 31 * 29, 4)
    cpu = PermutohedralLattice(f)
    gpu = PermutohedralLattice(f.cuda())
    assert gpu.num_points == cpu.num_points
    torch.testing.assert_close(gpu.filter(v.cuda()).cpu(), cpu.filter(v), rtol=1e-5, atol=1e-5)
    x = v.cuda().double().requires_grad_()
    gpu.filter(x).square().sum().backward()
    xc = v.double().requires_grad_()
    cpu.filter(xc).square().sum().backward()
    torch.testing.assert_close(x.grad.cpu(), xc.grad)



@pytest.mark.parametrize("d", [1, 2, 4, 8])
def test_normalised_filter_averages_separated_clusters(d):
    """Features in clusters of identical points, the clusters far apart (exp(-|Δf|²/2) = 0
    between them, as for the exact filter): the normalised filter K v / K 1 is each cluster's
    mean of v, exactly, in any dimension."""
    g = torch.Generator().manual_seed(d)
    # 20 apart along the diagonal: far enough for no blur between them, compact enough in every
    # coordinate for the int64 key packing at d = 8
    centers = torch.randn(3, d, generator=g) * 0.3 + 20.0 * torch.arange(3.0)[:, None] / d**0.5
    cluster = torch.randint(0, 3, (60,), generator=g)
    cluster[:3] = torch.arange(3)  # every cluster present
    f = centers[cluster]
    v = torch.randn(60, 2, generator=g, dtype=torch.float64)
    lat = PermutohedralLattice(f)
    out = lat.filter(v) / lat.filter(torch.ones(60, 1, dtype=torch.float64))
    means = torch.stack([v[cluster == c].mean(0) for c in range(3)])
    torch.testing.assert_close(out, means[cluster], atol=1e-6, rtol=0)
    ones = torch.ones(60, 1, dtype=torch.float64)
    exact = exact_gaussian_filter(f.double(), v) / exact_gaussian_filter(f.double(), ones)
    torch.testing.assert_close(exact, means[cluster])


def test_unrepresentable_features_raise():
    with pytest.raises(ValueError, match="NaN"):
        PermutohedralLattice(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(OverflowError, match="key range"):
        PermutohedralLattice(torch.tensor([[0.0] * 8, [3e4] * 4 + [-3e4] * 4]))


def test_two_pass_simplex_sort_equals_packed_key(monkeypatch):
    import segrefine.crf.lattice as lattice_module

    imgs = torch.stack([_image(14, 15, 3, s) for s in range(2)])
    f = bilateral_features(imgs, 5.0, 13.0)
    v = torch.rand(2, 210, 3)
    packed = PermutohedralLattice(f)
    monkeypatch.setattr(lattice_module, "_SINGLE_KEY_LIMIT", 0)
    two_pass = PermutohedralLattice(f)
    assert two_pass.num_points == packed.num_points
    torch.testing.assert_close(two_pass.filter(v), packed.filter(v))


def test_inference_only_lattice_filters_the_same_and_refuses_gradients():
    f = torch.rand(2, 150, 3) * 4
    v = torch.rand(2, 150, 4)
    full = PermutohedralLattice(f)
    lean = PermutohedralLattice(f, transposes=False)
    torch.testing.assert_close(lean.filter(v), full.filter(v), rtol=0, atol=0)
    n = torch.rand(300) + 0.5
    torch.testing.assert_close(lean.scaled(n, n).filter(v), full.scaled(n, n).filter(v), rtol=0, atol=0)
    torch.testing.assert_close(lean.repeat(2).filter(v.repeat(2, 1, 1)), full.repeat(2).filter(v.repeat(2, 1, 1)),
                               rtol=0, atol=0)
    # two fewer float32 weight arrays of B*N*(d+1) entries (the transposed splat and slice)
    assert full.nbytes() - lean.nbytes() == 2 * 2 * 150 * 4 * 4
    with pytest.raises(RuntimeError, match="transposes=False"):
        lean.filter(v, transpose=True)
    with pytest.raises(RuntimeError, match="transposes=False"):
        lean.filter(v.clone().requires_grad_())


def test_chunked_build_is_identical(monkeypatch):
    """The per-pixel build steps run in chunks of pixels; the lattice must not depend on the chunk size."""
    import segrefine.crf.lattice as lattice_module

    f = torch.rand(2, 301, 5) * 6
    v = torch.rand(2, 301, 3)
    whole = PermutohedralLattice(f)
    monkeypatch.setattr(lattice_module, "_CHUNK", 64)
    chunked = PermutohedralLattice(f)
    assert chunked.num_points == whole.num_points
    torch.testing.assert_close(chunked.filter(v), whole.filter(v), rtol=0, atol=0)
