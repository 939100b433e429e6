"""The analysis and the run record load without the training stack: a notebook or a report
machine needs neither torch nor Lightning, smp or Hydra."""

from __future__ import annotations

import subprocess
import sys

TRAINING_STACK = ("torch", "lightning", "pytorch_lightning", "segmentation_models_pytorch", "hydra", "omegaconf")


def test_every_analysis_and_record_module_imports_without_torch_lightning_smp_or_hydra():
    code = ("import importlib, pkgutil, sys, segrefine.analysis, segrefine.record\n"
            "names = [m.name for p in (segrefine.analysis, segrefine.record)\n"
            "         for m in pkgutil.iter_modules(p.__path__, p.__name__ + '.')]\n"
            "for name in names: importlib.import_module(name)\n"
            f"print(len(names), sorted(m for m in {TRAINING_STACK!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(maxsplit=1)
    assert int(out[0]) >= 8  # sources, rows, stats, render, figures, cli, protocols, run_record: really imported
    assert out[1].strip() == "[]"
