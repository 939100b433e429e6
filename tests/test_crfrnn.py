"""The end-to-end CRF-RNN head: equals DenseCRF before training, trains, starts from a none run."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch

from segrefine.crf import CRFKernels
from segrefine.heads.crfrnn import CRFRNNHead
from segrefine.heads.densecrf import DenseCRFHead
from segrefine.build import build_data, build_module, initialise_from
from segrefine.train import train
from segrefine.types import BackboneOutput

PARAMS = CRFKernels().as_dict()  # conf/head/{crfrnn,densecrf}.yaml's kernels


@pytest.mark.parametrize("channels", [1, 3])
def test_untrained_crfrnn_equals_densecrf_on_pydensecrf(channels):
    torch.manual_seed(channels)
    # Smooth logits over a blocky image, so the CRF has edges to follow.
    logits = torch.nn.functional.avg_pool2d(torch.randn(2, 4, 35, 43), 5, 1, 2) * 4
    image = torch.zeros(2, channels, 35, 43)
    image[..., 10:25, 8:30] = 0.8
    image += 0.05 * torch.randn_like(image)
    out = BackboneOutput(logits=logits, features=[], feature_strides=(), stride=1)
    crfrnn = CRFRNNHead(4, iterations=5, eval_iterations=5, **PARAMS).eval()(out, image).exp()
    reference = DenseCRFHead(4, num_workers=1, iterations=5, **PARAMS).eval()(out, image).exp()
    diff = (crfrnn - reference).abs()
    assert torch.quantile(diff.flatten(), 0.999) <= 1e-4 and diff.max() <= 2e-2
    assert (crfrnn.argmax(1) == reference.argmax(1)).float().mean() >= 0.9999


def test_training_step_sends_gradients_to_backbone_and_crf(make_cfg):
    cfg = make_cfg("backbone=pspnet", "head=crfrnn")
    datamodule = build_data(cfg)
    module = build_module(cfg, datamodule)
    batch = next(iter(datamodule.train_dataloader()))
    module.training_step(batch, 0).backward()
    crf = module.head.crf
    for name, param in [("backbone", next(module.backbone.parameters())), ("spatial_weight", crf.spatial_weight),
                        ("bilateral_weight", crf.bilateral_weight), ("compatibility", crf.compatibility)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def _validation_loss(module, datamodule) -> float:
    module.eval()
    with torch.no_grad():
        losses = [torch.nn.functional.nll_loss(module(b["image"]), b["mask"], ignore_index=255)
                  for b in datamodule.val_dataloader()]
    return float(torch.stack(losses).mean())


def test_short_training_lowers_validation_loss_and_stays_finite(make_cfg, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg("backbone=pspnet", "head=crfrnn", "trainer.max_epochs=3", "data.num_train=32",
                   "head.eval_iterations=5", output_dir=out)
    pl.seed_everything(cfg.seed)  # train() seeds the same way before building, so this is its start
    datamodule = build_data(cfg)
    before = _validation_loss(build_module(cfg, datamodule), datamodule)
    train(cfg)
    module = build_module(cfg, datamodule)
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    assert _validation_loss(module, datamodule) < before
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert state["head.crf.spatial_weight"] != 3.0  # the kernel weights did learn


def test_init_from_a_none_run_loads_the_backbone(make_cfg, tmp_path):
    source = tmp_path / "none"
    train(make_cfg("backbone=pspnet", output_dir=source))
    cfg = make_cfg("backbone=pspnet", "head=crfrnn", output_dir=tmp_path / "crf")
    module = build_module(cfg, build_data(cfg))
    initialise_from(module, str(source), cfg.head._target_)
    saved = torch.load(source / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for key, value in module.backbone.state_dict().items():
        assert torch.equal(value, saved[f"backbone.{key}"]), key
    assert float(module.head.crf.spatial_weight.detach()) == 3.0  # the CRF keeps its own initialisation


@pytest.mark.parametrize("parametrisation", ["potts", "zheng"])
def test_extra_metrics_are_the_learned_values_without_warnings(parametrisation):
    head = CRFRNNHead(3, parametrisation=parametrisation, gaussian_compat=2.0, bilateral_compat=4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float() of a tensor that requires grad warns
        metrics = head.extra_metrics()
    if parametrisation == "potts":  # compatibility initialised to Potts: 0 on the diagonal, 1 off it
        assert metrics == {"spatial_weight": 2.0, "bilateral_weight": 4.0, "compat_diag_mean": 0.0,
                           "compat_offdiag_mean": 1.0}
    else:  # weights initialised w * I, compatibility I
        assert metrics == {"spatial_weights_diag_mean": 2.0, "bilateral_weights_diag_mean": 4.0,
                           "compat_diag_mean": 1.0, "compat_asymmetry": 0.0}
