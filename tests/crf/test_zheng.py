"""ZhengMeanFieldCRF: Zheng et al.'s parametrisation, against pydensecrf where it can express it."""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import torch
from torch.func import functional_call

from segrefine.crf import CRFKernels, MeanFieldCRF, ZhengMeanFieldCRF

pytestmark = pytest.mark.usefixtures("single_thread")

# Zheng et al.'s initial weights (3 spatial, 5 bilateral) with narrower widths for tiny images.
KERNELS = CRFKernels(gaussian_sxy=2.0, gaussian_compat=3.0, bilateral_sxy=5.0, bilateral_schan=20.0,
                     bilateral_compat=5.0)


def _inputs(batch=1, classes=3, height=9, width=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    unary = (torch.randn(batch, classes, height, width, generator=g) * 2).to(dtype)
    image = (torch.rand(batch, 3, height, width, generator=g) * 255).round()
    return unary, image


def _pydensecrf(unary, image, spatial_compat, bilateral_compat, iterations=5):
    """pydensecrf with NORMALIZE_AFTER kernels; compat a number (Potts) or a C x C matrix."""
    _, classes, height, width = unary.shape
    d = dcrf.DenseCRF2D(width, height, classes)
    d.setUnaryEnergy(np.ascontiguousarray(-unary[0].reshape(classes, -1).numpy().astype(np.float32)))
    d.addPairwiseGaussian(sxy=KERNELS.gaussian_sxy, compat=spatial_compat, kernel=dcrf.DIAG_KERNEL,
                          normalization=dcrf.NORMALIZE_AFTER)
    rgb = np.ascontiguousarray(image[0].permute(1, 2, 0).numpy().astype(np.uint8))
    d.addPairwiseBilateral(sxy=KERNELS.bilateral_sxy, srgb=KERNELS.bilateral_schan, rgbim=rgb, compat=bilateral_compat,
                           kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_AFTER)
    return torch.from_numpy(np.array(d.inference(iterations)).reshape(classes, height, width))


def test_initialised_as_the_official_code():
    crf = ZhengMeanFieldCRF(4, kernels=KERNELS)
    assert torch.equal(crf.spatial_weights.detach(), 3.0 * torch.eye(4))
    assert torch.equal(crf.bilateral_weights.detach(), 5.0 * torch.eye(4))
    assert torch.equal(crf.compatibility.detach(), torch.eye(4))
    assert crf.normalization == "after"
    assert {n for n, _ in crf.named_parameters()} == {"spatial_weights", "bilateral_weights", "compatibility"}


def test_potts_values_reproduce_pydensecrf_potts_with_after_normalisation():
    unary, image = _inputs()
    kernels = KERNELS.replace(gaussian_compat=1.0, bilateral_compat=2.0)
    crf = ZhengMeanFieldCRF(3, kernels=kernels, iterations=5)
    q = crf(unary, image).exp()[0]
    expected = _pydensecrf(unary, image, 1.0, 2.0)
    torch.testing.assert_close(q, expected, atol=2e-5, rtol=0)
    potts = MeanFieldCRF(3, kernels=kernels, normalization="after")
    torch.testing.assert_close(crf(unary, image), potts(unary, image), atol=1e-5, rtol=0)


def test_symmetric_kernel_matrices_equal_pydensecrf_matrix_compatibilities():
    """S = L + M (W_s K_s Q + W_b K_b Q) with M = I is densecrf's S = L - sum_k C_k K_k Q with C_k = -W_k."""
    unary, image = _inputs(seed=3)
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    ws, wb = a + a.t(), b + b.t()
    crf = ZhengMeanFieldCRF(3, kernels=KERNELS, iterations=4)
    with torch.no_grad():
        crf.spatial_weights.copy_(ws)
        crf.bilateral_weights.copy_(wb)
    q = crf(unary, image).exp()[0]
    expected = _pydensecrf(unary, image, (-ws).numpy().astype(np.float32), (-wb).numpy().astype(np.float32), iterations=4)
    torch.testing.assert_close(q, expected, atol=2e-5, rtol=0)


def test_compatibility_is_not_symmetrised():
    unary, image = _inputs(seed=1)
    m = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0], [0.5, 0.0, 1.0]])
    outputs = []
    for matrix in (m, 0.5 * (m + m.t())):
        crf = ZhengMeanFieldCRF(3, kernels=KERNELS)
        with torch.no_grad():
            crf.compatibility.copy_(matrix)
        outputs.append(crf(unary, image))
    assert (outputs[0] - outputs[1]).abs().max() > 1e-2


def test_gradcheck_unary_and_all_matrices():
    torch.manual_seed(0)
    crf = ZhengMeanFieldCRF(3, kernels=CRFKernels(gaussian_sxy=1.5, bilateral_sxy=3.0, bilateral_schan=40.0),
                            iterations=2).double()
    names = [n for n, _ in crf.named_parameters()]
    # Away from the identity initialisation, asymmetric: every entry's gradient is checked.
    params = [(p.detach() + 0.3 * torch.randn_like(p)).requires_grad_() for _, p in crf.named_parameters()]
    unary, image = _inputs(2, 3, 4, 5, dtype=torch.float64)
    unary.requires_grad_()

    def fn(u, *ps):
        return functional_call(crf, dict(zip(names, ps)), (u, image.double()))

    assert torch.autograd.gradcheck(fn, (unary, *params))


def test_batched_equals_one_by_one_and_eval_iterations():
    unary, image = _inputs(3, 4, 7, 8, seed=5)
    crf = ZhengMeanFieldCRF(4, kernels=KERNELS, iterations=2, eval_iterations=6)
    with torch.no_grad():
        crf.compatibility.add_(0.2 * torch.randn(4, 4))
    batched = crf(unary, image)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], crf(unary[i : i + 1], image[i : i + 1]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(crf.eval()(unary, image), crf(unary, image, iterations=6))
    assert not torch.allclose(crf.eval()(unary, image), crf.train()(unary, image))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_iterations_do_not_synchronise():
    from segrefine.crf import PermutohedralLattice
    from segrefine.crf.meanfield import _normalized, bilateral_features, spatial_features
    from segrefine.crf.zheng import zheng_mean_field

    unary, image = _inputs(2, 4, 21, 17, seed=2)
    crf = ZhengMeanFieldCRF(4, kernels=KERNELS)
    with torch.no_grad():
        crf.compatibility.add_(0.3 * torch.randn(4, 4))
    gpu = ZhengMeanFieldCRF(4, kernels=KERNELS).cuda()
    gpu.load_state_dict(crf.state_dict())
    out_cpu, out_gpu = crf(unary, image), gpu(unary.cuda(), image.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-5, rtol=1e-5)
    out_cpu.square().sum().backward()
    out_gpu.square().sum().backward()
    for (name, a), (_, b) in zip(gpu.named_parameters(), crf.named_parameters()):
        torch.testing.assert_close(a.grad.cpu(), b.grad, atol=1e-4, rtol=1e-4, msg=name)

    im = image.cuda()
    filters = (
        _normalized(PermutohedralLattice(spatial_features(21, 17, 2.0, "cuda").expand(2, -1, -1)), "after"),
        _normalized(PermutohedralLattice(bilateral_features(im, 5.0, 20.0)), "after"),
    )
    logits = unary.cuda().permute(0, 2, 3, 1).reshape(-1, 4).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        S = zheng_mean_field(logits, filters, (gpu.spatial_weights, gpu.bilateral_weights), gpu.compatibility, 5)
        S.square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert logits.grad is not None
