"""CRFKernels: the one source of the CRF heads' kernel defaults, and the heads built from it."""

from __future__ import annotations

import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException

from conftest import CONFIG_DIR
from segrefine.build import build_component
from segrefine.crf import CRFKernels

KERNEL_KEYS = [f.name for f in dataclasses.fields(CRFKernels)]


def _head_config(head: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"head={head}"]).head


@pytest.mark.parametrize("head", ["densecrf", "crfrnn"])
def test_head_configs_hold_the_dataclass_defaults(head):
    cfg = _head_config(head)
    defaults = {f.name: f.default for f in dataclasses.fields(CRFKernels)}
    assert {key: cfg[key] for key in KERNEL_KEYS} == defaults


@pytest.mark.parametrize("head", ["densecrf", "crfrnn"])
def test_hydra_builds_the_head_with_the_configured_kernels(head):
    """As the train entry point builds it: the yaml's descriptive keys (name) are not arguments."""
    cfg = _head_config(head)
    module = build_component(cfg, num_classes=2, **({"num_workers": 1} if head == "densecrf" else {}))
    kernels = module.kernels if head == "densecrf" else module.crf.kernels
    assert kernels == CRFKernels(**{key: cfg[key] for key in KERNEL_KEYS})
    changed = build_component(cfg, num_classes=2, bilateral_schan=7.0)
    assert (changed.kernels if head == "densecrf" else changed.crf.kernels).bilateral_schan == 7.0


@pytest.mark.parametrize("head", ["densecrf", "crfrnn"])
def test_a_bad_kernel_value_is_named_as_its_config_key(head):
    cfg = _head_config(head)
    message = r"head\.gaussian_sxy=-1\.0: a kernel width must be a positive finite number \(default 1\.0\)"
    with pytest.raises(InstantiationException, match=message):
        build_component(cfg, num_classes=2, gaussian_sxy=-1.0)


def test_kernels_are_floats_and_frozen():
    kernels = CRFKernels(gaussian_sxy=2, bilateral_compat=0)
    assert type(kernels.gaussian_sxy) is float and kernels.bilateral_compat == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        kernels.gaussian_sxy = 3.0
    assert kernels.replace(bilateral_sxy=9.0) == CRFKernels(gaussian_sxy=2.0, bilateral_sxy=9.0, bilateral_compat=0.0)
    with pytest.raises(ValueError, match="bilateral_schan='wide' is not a number"):
        CRFKernels(bilateral_schan="wide")
