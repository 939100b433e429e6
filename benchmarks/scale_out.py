"""Scale-out timings (not a test): a 4-job sweep with the basic vs the joblib launcher, and
the training step time of DDP on 2 CPU processes vs 1 process.

    .venv/bin/python benchmarks/scale_out.py [--epochs 3]

Each sweep runs in a fresh temporary folder; times are wall-clock for the whole command
(process start-up included). DDP's step time is taken net of its start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOKE = ["data.image_size=64", "data.num_train=64", "data.num_val=16", "data.num_test=16",
         "data.batch_size=16", "logger=none", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]


def timed(args: list[str], cwd: Path) -> float:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "segrefine.train", *args], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--backbone", default="unet")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common = [*SMOKE, f"backbone={args.backbone}", f"trainer.max_epochs={args.epochs}", f"paths.data_dir={root / 'data'}"]
        timed([*common, "trainer.max_epochs=1", f"hydra.run.dir={root / 'warm'}"], root)  # data cache, imports
        sweep = ["-m", *common, "seed=0,1,2,3"]
        basic = timed([*sweep, f"hydra.sweep.dir={root / 'basic'}"], root)
        joblib = timed([*sweep, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={root / 'joblib'}"], root)
        print("| 4-job sweep | wall s |\n|---|---|")
        print(f"| basic launcher (sequential) | {basic:.1f} |\n| joblib, n_jobs=2 | {joblib:.1f} |")

        # Step time net of start-up: the difference between a long and a short run per extra step.
        print("\n| training (batch 8 per process) | s/step | images/s |\n|---|---|---|")
        for name, extra, processes in (("1 process", [], 1), ("DDP, 2 CPU processes", ["trainer=ddp", "trainer.devices=2"], 2)):
            fits = {}
            for epochs in (2, 2 + args.epochs):
                out = root / f"ddp{processes}_{epochs}"
                timed([*common, *extra, "data.batch_size=8", f"trainer.max_epochs={epochs}", f"hydra.run.dir={out}"], root)
                metrics = json.loads((out / "results.json").read_text())["metrics"]
                fits[epochs] = (metrics["train/fit_seconds"], metrics["train/steps"])
            (t0, s0), (t1, s1) = fits.values()
            per_step = (t1 - t0) / (s1 - s0)
            print(f"| {name} | {per_step:.3f} | {8 * processes / per_step:.1f} |")


if __name__ == "__main__":
    main()
