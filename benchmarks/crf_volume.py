"""The 3-D dense CRF (``dense_crf`` on a volume with voxel spacing) against pydensecrf's general
``DenseCRF(N, C)`` + ``addPairwiseEnergy`` on the same features: time and peak memory (not a test).

Volumes D×H×W = 64³, 128³ and 128×256×256 (``--sizes``; the issue's "256×256×128") with
``--classes`` classes, one MRI-like intensity channel (an ellipsoid over shading and noise,
0-255), blotchy CNN-like probabilities, spacing 1.5×1×1 mm, 5 mean-field iterations, kernels
gaussian 3 mm / weight 3, bilateral 10 mm and 13 intensity levels / weight 5. ``dense_crf``
runs with 1 and 2 torch threads (``--threads``); pydensecrf is single-threaded. Each (size,
implementation, threads) runs in a fresh child process; time is the median of ``--repeats``
calls after one warm-up call; memory is the child's peak RSS from just before the first call
at that size on, minus that RSS (after a tiny call has loaded the libraries, ``malloc_trim``
and a reset of the kernel's peak-RSS mark: the method of ``crf_scaling.py``).

    PYTHONPATH=src python benchmarks/crf_volume.py
    PYTHONPATH=src python benchmarks/crf_volume.py --sizes 64x64x64 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SPACING = (1.5, 1.0, 1.0)
KERNELS = dict(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=10.0, bilateral_schan=13.0, bilateral_compat=5.0)


def volume(shape, classes: int, seed: int = 0):
    """(C, D, H, W) float32 probabilities and a (D, H, W) 0-255 float32 intensity volume."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    z, y, x = np.ogrid[:d, :h, :w]
    blob = ((z - d / 2) / (d / 3)) ** 2 + ((y - h / 2) / (h / 3)) ** 2 + ((x - w / 2) / (w / 4)) ** 2 < 1
    image = np.clip(np.round(60 + 0.3 * y + 90 * blob + rng.normal(0, 6, shape)), 0, 255).astype(np.float32)
    coarse = rng.normal(0, 2.5, (classes, d // 8 + 1, h // 8 + 1, w // 8 + 1)).astype(np.float32)
    logits = coarse.repeat(8, 1).repeat(8, 2).repeat(8, 3)[:, :d, :h, :w]
    logits = logits + rng.normal(0, 1, logits.shape).astype(np.float32)
    probs = np.exp(logits - logits.max(0))
    return (probs / probs.sum(0)).astype(np.float32), image


def child(impl: str, shape, classes: int, repeats: int, threads: int) -> dict:
    sys.path.insert(0, str(HERE))
    from crf_scaling import peak_rss_bytes, reset_peak_rss, rss_bytes, trim_heap

    def make(s):
        probs, image = volume(s, classes)
        if impl == "pydensecrf":
            from segrefine.crf.params import CRFKernels
            from segrefine.heads.densecrf import pydensecrf_refine

            k = CRFKernels(**KERNELS)
            return lambda: pydensecrf_refine(probs, image[None], 5, k, spacing=SPACING)
        import torch

        from segrefine.crf import CRFKernels, dense_crf

        t_p, t_i, k = torch.from_numpy(probs)[None], torch.from_numpy(image)[None, None], CRFKernels(**KERNELS)
        return lambda: dense_crf(t_p, t_i, kernels=k, iterations=5, spacing=SPACING)

    if impl != "pydensecrf":
        import torch

        torch.set_num_threads(threads)
    make((4, 8, 8))()  # libraries loaded (numba's compiled build included) before the baseline
    run = make(shape)
    trimmed, since_reset = trim_heap(), reset_peak_rss()
    base = rss_bytes()
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        run()
        if i:
            times.append(time.perf_counter() - t)
    return {"s": statistics.median(times), "peak_mb": (peak_rss_bytes(since_reset) - base) / 2**20,
            "heap_trimmed": trimmed, "peak_since_baseline": since_reset}


def run_child(impl, shape, classes, repeats, threads) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "x".join(map(str, shape)), "--classes", str(classes),
           "--repeats", str(repeats), "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def parse_shape(text: str) -> tuple[int, int, int]:
    d, h, w = (int(v) for v in text.lower().split("x"))
    return d, h, w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=parse_shape, default=[(64, 64, 64), (128, 128, 128), (128, 256, 256)],
                    help="volumes DxHxW")
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "DxHxW"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        impl, shape = args.child
        print(json.dumps(child(impl, parse_shape(shape), args.classes, args.repeats, args.threads[0])))
        return
    from segrefine import hardware

    print(f"{hardware.summary('cpu')}; 3-D CRF, C={args.classes}, spacing {SPACING} mm, 5 iterations, kernels {KERNELS}; "
          f"wall time, median of {args.repeats} after a warm-up; peak memory = peak RSS of a fresh process from just "
          f"before the first call at that size on, minus that RSS")
    print("| D×H×W | voxels | " + " | ".join(f"`dense_crf` {t} thr s (peak MB)" for t in args.threads)
          + " | pydensecrf s (peak MB) | time ratio, " + " / ".join(f"{t} thr" for t in args.threads) + " |")
    print("|" + "---|" * (4 + len(args.threads)))
    for shape in args.sizes:
        ours = [run_child("dense_crf", shape, args.classes, args.repeats, t) for t in args.threads]
        ref = run_child("pydensecrf", shape, args.classes, args.repeats, 1)

        def cell(r):
            return r["error"] if "error" in r else f"{r['s']:.2f} ({r['peak_mb']:.0f})"

        ratios = " / ".join(f"{r['s'] / ref['s']:.2f}" if "s" in r and "s" in ref else "–" for r in ours)
        print(f"| {'×'.join(map(str, shape))} | {int(np.prod(shape))} | " + " | ".join(cell(r) for r in ours)
              + f" | {cell(ref)} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
