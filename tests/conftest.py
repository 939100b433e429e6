"""Shared fixtures: compose real Hydra configs at a tiny scale."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(REPO / "conf")

# Under pytest-xdist (`-n auto`, the default in pyproject.toml) each worker gets its share of
# the CPUs: every worker using all of them would only make them wait on each other.
# (torch is imported here and in the fixtures, not at the top: the xdist controller loads this
# file too, and it runs no test)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    import torch

    from segrefine.hardware import available_cpus

    torch.set_num_threads(max(1, available_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Small enough for seconds per run on 2 CPU cores, large enough for every backbone's strides.
TINY = [
    "data.image_size=32",
    "data.num_train=16",
    "data.num_val=8",
    "data.num_test=8",
    "data.batch_size=8",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "logger=none",
]


def subprocess_env() -> dict[str, str]:
    """The environment for a CLI run from a test: offline wandb, and not attached to the wandb
    service that in-process tests started (a killed run would stay "in use" there); under
    pytest-xdist, the worker's share of the CPUs as torch's thread count (as in-process)."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
        import torch

        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One synthetic-data cache for the whole session."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def make_cfg(data_dir, tmp_path):
    """``make_cfg(*overrides, output_dir=None)`` -> the composed train config at TINY scale."""

    def _make(*overrides: str, output_dir: Path | None = None, config_name: str = "train"):
        from hydra import compose, initialize_config_dir

        output_dir = output_dir or tmp_path / "run"
        # The TINY data sizes are the synthetic source's; another source brings its own.
        other_data = any(o.startswith("data=") for o in overrides)
        tiny = [o for o in TINY if not (other_data and o.startswith("data."))]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(
                config_name,
                overrides=[*tiny, f"paths.data_dir={data_dir}", f"paths.output_dir={output_dir}", *overrides],
            )

    return _make


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny tensor ops: intra-op threads only add synchronisation latency
    (severe on a loaded 2-core machine). Restored after the module."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
