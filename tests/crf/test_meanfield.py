"""MeanFieldCRF / dense_crf: against a brute-force dense CRF, gradients, conventions, batching,
training."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from segrefine.crf import PROB_FLOOR, PYDENSECRF_KERNELS, CRFKernels, MeanFieldCRF, dense_crf, exact_mean_field

pytestmark = pytest.mark.usefixtures("single_thread")


def _image(batch: int, channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(B, K, H, W) integer-valued 0-255 images: two flat regions + noise."""
    g = torch.Generator().manual_seed(seed)
    xx = torch.arange(width).float().expand(height, width)
    base = torch.where(xx < width / 2, 60.0, 190.0)
    img = base + torch.randn(batch, channels, height, width, generator=g) * 8
    return img.clamp(0, 255).round()


def _logits(batch: int, classes: int, height: int, width: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(batch, classes, height, width, generator=g) * 2).to(dtype)


# Kernels under which the lattice CRF is exact, so a brute-force dense CRF is its reference:
# position widths so large that every position is ~0 (the spatial kernel joins all pixels),
# and an intensity width that separates the flat regions of _regions' images completely (their
# values differ by >= 40 widths). All pixels of a region then have identical features: the
# lattice and the exact Gaussian filter give each region's kernel as c 1 1^T (different c), and
# every normalisation but "none" cancels c: a normalised kernel averages over the region.
EXACT_KERNELS = CRFKernels(gaussian_sxy=1e30, gaussian_compat=3.0, bilateral_sxy=1e30, bilateral_schan=1.0,
                           bilateral_compat=5.0)


def _regions(batch: int, channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(B, K, H, W) images of three flat regions of scattered pixels, values 40 apart or more."""
    g = torch.Generator().manual_seed(seed + 2)
    labels = torch.randint(0, 3, (batch, height, width), generator=g)
    values = torch.tensor([[40.0], [120.0], [200.0]]) + 7.0 * torch.arange(channels)
    return values[labels].permute(0, 3, 1, 2).contiguous()


def _assert_matches_brute_force(out: torch.Tensor, unary: torch.Tensor, image: torch.Tensor, **kw) -> None:
    reference = exact_mean_field(unary, image, EXACT_KERNELS, **kw)
    torch.testing.assert_close(out.double(), reference, atol=2e-5, rtol=0)
    # not a vacuous comparison: the CRF moved the log-probabilities
    assert (reference - torch.log_softmax(unary.double(), 1)).abs().max() > 0.5


def test_output_is_log_probabilities():
    crf = MeanFieldCRF(4)
    out = crf(_logits(2, 4, 9, 11), _image(2, 3, 9, 11))
    assert out.shape == (2, 4, 9, 11) and out.dtype == torch.float32
    torch.testing.assert_close(out.logsumexp(1), torch.zeros(2, 9, 11), atol=1e-5, rtol=0)


@pytest.mark.parametrize("compatibility", ["potts", "learned", "matrix"])
def test_equals_brute_force_dense_crf(compatibility):
    u, im = _logits(2, 4, 6, 8, seed=4), _regions(2, 3, 6, 8, seed=4)
    matrix = torch.randn(4, 4, generator=torch.Generator().manual_seed(9))
    init = {"potts": "potts", "learned": "learned", "matrix": matrix}[compatibility]
    reference_matrix = {"potts": None, "learned": 1 - torch.eye(4), "matrix": matrix}[compatibility]
    crf = MeanFieldCRF(4, kernels=EXACT_KERNELS, compatibility=init, iterations=5)
    _assert_matches_brute_force(crf(u, im), u, im, iterations=5, compatibility=reference_matrix)


def test_zero_iterations_is_log_softmax_of_unary():
    crf = MeanFieldCRF(3)
    u = _logits(1, 3, 6, 7)
    torch.testing.assert_close(crf(u, _image(1, 3, 6, 7), iterations=0), torch.log_softmax(u, 1))


def test_iterations_train_eval_and_override():
    u, im = _logits(1, 3, 8, 8), _image(1, 2, 8, 8)
    crf = MeanFieldCRF(3, iterations=2, eval_iterations=7)
    ref = MeanFieldCRF(3, iterations=7)
    torch.testing.assert_close(crf.eval()(u, im), ref(u, im))
    torch.testing.assert_close(crf.train()(u, im), ref(u, im, iterations=2))
    torch.testing.assert_close(crf(u, im, iterations=7), ref(u, im))


def test_potts_and_learned_potts_init_agree():
    u, im = _logits(2, 5, 10, 9), _image(2, 3, 10, 9)
    a = MeanFieldCRF(5, compatibility="potts")(u, im)
    b = MeanFieldCRF(5, compatibility="learned")(u, im)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_learned_compatibility_is_symmetrised():
    u, im = _logits(1, 3, 7, 6), _image(1, 1, 7, 6)
    M = torch.tensor([[0.0, 2.0, 0.5], [0.0, 0.0, 1.0], [1.5, 1.0, 0.0]])
    a = MeanFieldCRF(3, compatibility=M)(u, im)
    b = MeanFieldCRF(3, compatibility=0.5 * (M + M.t()))(u, im)
    torch.testing.assert_close(a, b)


def test_parameters_and_buffers():
    crf = MeanFieldCRF(4, compatibility="learned", learnable=True)
    names = {n for n, _ in crf.named_parameters()}
    assert names == {"spatial_weight", "bilateral_weight", "compatibility"}
    torch.testing.assert_close(crf.compatibility.detach(), 1 - torch.eye(4))
    fixed = MeanFieldCRF(4, compatibility="learned", learnable=False)
    assert list(fixed.parameters()) == []
    assert set(fixed.state_dict()) == {"spatial_weight", "bilateral_weight", "compatibility"}
    potts = MeanFieldCRF(4)
    assert {n for n, _ in potts.named_parameters()} == {"spatial_weight", "bilateral_weight"}
    assert "compatibility=potts" in repr(potts)


@pytest.mark.parametrize("compatibility", ["potts", "learned"])
def test_gradcheck_unary_and_parameters(compatibility):
    torch.manual_seed(0)
    kernels = CRFKernels(gaussian_sxy=1.5, bilateral_sxy=3.0, bilateral_schan=40.0)
    crf = MeanFieldCRF(3, kernels=kernels, compatibility=compatibility, iterations=2).double()
    names = [n for n, _ in crf.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in crf.named_parameters()]
    if compatibility == "learned":  # move away from the symmetric Potts init
        params[-1] = (params[-1] + 0.3 * torch.randn(3, 3, dtype=torch.float64)).detach().requires_grad_()
    u = _logits(2, 3, 4, 5, dtype=torch.float64).requires_grad_()
    im = _image(2, 2, 4, 5).double()

    def fn(unary, *ps):
        return functional_call(crf, dict(zip(names, ps)), (unary, im))

    assert torch.autograd.gradcheck(fn, (u, *params))


def test_gradient_equals_brute_force_and_does_not_need_image_grad():
    crf = MeanFieldCRF(3, kernels=EXACT_KERNELS, compatibility="learned")
    im = _regions(1, 3, 6, 6).requires_grad_()
    u = _logits(1, 3, 6, 6).requires_grad_()
    weights = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    (crf(u, im) * weights).sum().backward()
    assert im.grad is None
    u64 = u.detach().double().requires_grad_()
    (exact_mean_field(u64, im.detach(), EXACT_KERNELS, iterations=5, compatibility=1 - torch.eye(3))
     * weights).sum().backward()
    torch.testing.assert_close(u.grad.double(), u64.grad, atol=5e-5, rtol=0)


def test_batch_independence():
    crf = MeanFieldCRF(4, compatibility="learned")
    u, im = _logits(3, 4, 11, 13, seed=3), _image(3, 3, 11, 13, seed=3)
    batched = crf(u, im)
    for b in range(3):
        torch.testing.assert_close(batched[b : b + 1], crf(u[b : b + 1], im[b : b + 1]), atol=1e-6, rtol=1e-6)
    # an image's result does not depend on what its batch mates are
    other = crf(torch.cat([u[:1], -u[1:]]), torch.cat([im[:1], 255 - im[1:]]))
    torch.testing.assert_close(other[:1], batched[:1], atol=1e-6, rtol=1e-6)


def test_spatial_cache_follows_size_and_batch():
    crf = MeanFieldCRF(2)
    for B, H, W in [(1, 8, 9), (3, 8, 9), (2, 5, 7), (1, 8, 9)]:
        u, im = _logits(B, 2, H, W, seed=B), _image(B, 3, H, W, seed=B)
        torch.testing.assert_close(crf(u, im), MeanFieldCRF(2)(u, im))


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_any_number_of_image_channels(channels):
    u, im = _logits(2, 3, 7, 8), _regions(2, channels, 7, 8, seed=channels)
    crf = MeanFieldCRF(3, kernels=EXACT_KERNELS)
    _assert_matches_brute_force(crf(u, im), u, im, iterations=5)


# Each mode normalises its kernel here as the brute-force CRF does. On these images D = K 1 is
# constant within a region, so the three modes coincide and "none" keeps the kernels' scale,
# which the lattice does not share with the exact filter: what tells the modes apart is checked
# against pydensecrf (tests/crf/test_parity_pydensecrf.py).
@pytest.mark.parametrize("normalization", ["symmetric", "before", "after"])
def test_normalization_modes_equal_brute_force(normalization):
    u, im = _logits(1, 3, 6, 9, seed=2), _regions(1, 3, 6, 9, seed=2)
    crf = MeanFieldCRF(3, kernels=EXACT_KERNELS, normalization=normalization)
    _assert_matches_brute_force(crf(u, im), u, im, iterations=5, normalization=normalization)


def test_smoothing_pulls_towards_image_regions():
    """Potts CRF must reduce label noise inside flat image regions."""
    H, W = 16, 20
    im = _image(1, 3, H, W)
    truth = (torch.arange(W) >= W // 2).long().expand(H, W)
    g = torch.Generator().manual_seed(5)
    flip = torch.rand(H, W, generator=g) < 0.2
    noisy = torch.where(flip, 1 - truth, truth)
    u = torch.nn.functional.one_hot(noisy, 2).permute(2, 0, 1)[None].float() * 1.0
    crf = MeanFieldCRF(2, kernels=CRFKernels(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=10.0,
                                             bilateral_schan=20.0, bilateral_compat=5.0))
    pred = crf(u, im, iterations=5).argmax(1)[0]
    assert (pred == truth).float().mean() > (noisy == truth).float().mean() + 0.1


def test_training_steps_reduce_loss_and_stay_finite():
    torch.manual_seed(0)
    H, W, C = 12, 14, 3
    im = _image(2, 3, H, W)
    target = (torch.arange(W) >= W // 2).long().expand(2, H, W)
    u = (torch.nn.functional.one_hot(target, C).permute(0, 3, 1, 2).float() + torch.randn(2, C, H, W))
    kernels = CRFKernels(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=8.0, bilateral_schan=20.0,
                         bilateral_compat=10.0)
    crf = MeanFieldCRF(C, kernels=kernels, compatibility="learned")
    opt = torch.optim.Adam(crf.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = torch.nn.functional.nll_loss(crf(u, im), target)
        loss.backward()
        for p in crf.parameters():
            assert torch.isfinite(p.grad).all()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for p in crf.parameters():
        assert torch.isfinite(p).all()


def test_float64_forward_close_to_float32():
    crf = MeanFieldCRF(3)
    u, im = _logits(1, 3, 9, 10), _image(1, 3, 9, 10)
    out32 = crf(u, im)
    out64 = crf(u.double(), im)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, atol=1e-5, rtol=1e-5)


def test_dense_crf_returns_probabilities():
    p = torch.softmax(_logits(2, 5, 10, 12), 1)
    p[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])  # hard zeros are fine
    q = dense_crf(p, _image(2, 3, 10, 12))
    assert q.shape == p.shape and q.dtype == torch.float32
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(2, 10, 12))
    torch.testing.assert_close(dense_crf(p, _image(2, 3, 10, 12), iterations=0), p, atol=1e-6, rtol=1e-5)


def test_dense_crf_equals_brute_force_with_the_probability_floor():
    p = torch.softmax(_logits(2, 4, 6, 8, seed=6), 1)
    p[0, :, :2, :] = torch.tensor([0.0, 1.0, 0.0, 0.0])[:, None, None]  # saturated: exact zeros
    im = _regions(2, 3, 6, 8, seed=6)
    q = dense_crf(p, im, kernels=EXACT_KERNELS)
    unary = torch.log(p.double().clamp_min(PROB_FLOOR))
    _assert_matches_brute_force(q.log(), unary, im, iterations=5)


def test_dense_crf_equals_module_with_same_parameters():
    p = torch.softmax(_logits(2, 4, 9, 13), 1)
    im = _image(2, 3, 9, 13)
    crf = MeanFieldCRF(4, kernels=PYDENSECRF_KERNELS)
    torch.testing.assert_close(dense_crf(p, im, kernels=PYDENSECRF_KERNELS), crf(torch.log(p), im).exp(), atol=1e-6,
                               rtol=1e-5)


def test_input_validation():
    crf = MeanFieldCRF(3)
    with pytest.raises(ValueError, match="classes"):
        crf(_logits(1, 4, 5, 5), _image(1, 3, 5, 5))
    with pytest.raises(ValueError, match="share batch size"):
        crf(_logits(1, 3, 5, 5), _image(1, 3, 5, 6))
    with pytest.raises(ValueError, match="image must be"):
        crf(_logits(1, 3, 5, 5), _image(1, 3, 5, 5)[0])
    with pytest.raises(ValueError, match="compatibility"):
        MeanFieldCRF(3, compatibility="nope")
    with pytest.raises(ValueError, match="compatibility matrix"):
        MeanFieldCRF(3, compatibility=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="normalization"):
        MeanFieldCRF(3, normalization="sideways")
    with pytest.raises(ValueError, match="bilateral_schan=0.0: a kernel width must be a positive"):
        MeanFieldCRF(3, kernels=CRFKernels(bilateral_schan=0.0))
    with pytest.raises(ValueError, match="gaussian_compat=nan: a kernel weight must be a finite"):
        CRFKernels(gaussian_compat=float("nan"))
    with pytest.raises(TypeError, match="kernels must be a segrefine.crf.CRFKernels, got dict"):
        MeanFieldCRF(3, kernels={"gaussian_sxy": 1.0})
    with pytest.raises(TypeError, match="kernels must be a segrefine.crf.CRFKernels"):
        dense_crf(torch.ones(1, 2, 3, 3) / 2, torch.zeros(1, 1, 3, 3), kernels=PYDENSECRF_KERNELS.as_dict())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    u, im = _logits(2, 5, 21, 17), _image(2, 3, 21, 17)
    crf = MeanFieldCRF(5, compatibility="learned")
    out_cpu = crf(u, im)
    crf_gpu = MeanFieldCRF(5, compatibility="learned").cuda()
    out_gpu = crf_gpu(u.cuda(), im.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-5, rtol=1e-5)
    out_gpu.sum().backward()
    out_cpu.sum().backward()
    for (n, a), (_, b) in zip(crf_gpu.named_parameters(), crf.named_parameters()):
        torch.testing.assert_close(a.grad.cpu(), b.grad, atol=1e-4, rtol=1e-4, msg=n)
    p = torch.softmax(u, 1)
    torch.testing.assert_close(dense_crf(p.cuda(), im.cuda()).cpu(), dense_crf(p, im), atol=1e-5, rtol=1e-5)


def test_index_backend_mean_field_matches_embedding_bag():
    """The generic gather/scatter backend (used on CUDA) gives the same mean
    field as the CPU embedding_bag backend."""
    from segrefine.crf import PermutohedralLattice
    from segrefine.crf.meanfield import _mean_field, _normalized, bilateral_features, spatial_features

    im = _image(2, 3, 10, 12)
    logits = _logits(2, 4, 10, 12).permute(0, 2, 3, 1).reshape(-1, 4)
    out = {}
    for backend in ("embedding_bag", "index"):
        lats = [
            PermutohedralLattice(spatial_features(10, 12, 3.0).expand(2, -1, -1), backend=backend),
            PermutohedralLattice(bilateral_features(im, 80.0, 13.0), backend=backend),
        ]
        filters = [_normalized(lat, "symmetric") for lat in lats]
        out[backend] = _mean_field(logits, filters, [torch.tensor(3.0), torch.tensor(10.0)], None, 5)
    torch.testing.assert_close(out["index"], out["embedding_bag"], atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_iterations_do_not_synchronise():
    """Only the lattice build may synchronise with the host; the mean-field
    iterations (forward and backward) must not."""
    from segrefine.crf import PermutohedralLattice
    from segrefine.crf.meanfield import _mean_field, _normalized, bilateral_features, spatial_features

    im = _image(2, 3, 33, 29).cuda()
    logits = _logits(2, 5, 33, 29).cuda().permute(0, 2, 3, 1).reshape(-1, 5).requires_grad_()
    filters = [
        _normalized(PermutohedralLattice(spatial_features(33, 29, 3.0, "cuda").expand(2, -1, -1)), "symmetric"),
        _normalized(PermutohedralLattice(bilateral_features(im, 80.0, 13.0)), "symmetric"),
    ]
    weights = [torch.tensor(3.0, device="cuda", requires_grad=True), torch.tensor(10.0, device="cuda")]
    M = (1 - torch.eye(5, device="cuda")).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        S = _mean_field(logits, filters, weights, 0.5 * (M + M.t()), 5)
        S.square().sum().backward()
        with torch.no_grad():
            _mean_field(logits.detach(), filters, [w.detach() for w in weights], None, 5)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert logits.grad is not None
