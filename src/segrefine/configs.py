"""Where segrefine's Hydra configs are: the ``conf/`` folder of this checkout, or the one
named by ``SEGREFINE_CONFIG_DIR``."""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_DIR = os.environ.get("SEGREFINE_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf"))


def check_config_dir() -> None:
    if not Path(CONFIG_DIR, "train.yaml").is_file():
        raise SystemExit(
            f"segrefine: no config at {CONFIG_DIR}/train.yaml; install from a checkout (pip install -e .) "
            "or set SEGREFINE_CONFIG_DIR to the repository's conf/ folder"
        )
