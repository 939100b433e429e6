"""How ``dense_crf``'s time and memory grow with image size, against ``pydensecrf`` (not a test).

Square images 128² → 2048² (``--sizes``) with ``--classes`` classes, plus 1024×2048 with 19
classes (Cityscapes-size, ``--extra``), 5 mean-field iterations, pydensecrf's README kernels
(``segrefine.crf.PYDENSECRF_KERNELS``), natural-looking synthetic images
(``crf_speed.synthetic_image``). Each (size, implementation) runs in a fresh child process,
so that its peak memory is its own:

* time: median of ``--repeats`` calls after one warm-up (every lattice built in the call,
  spatial cache cleared: what pydensecrf does);
* memory: the child's peak RSS from its RSS just before the first call at this size on,
  minus that RSS, i.e. what the CRF itself needs at this size: the interpreter, the input
  arrays and the libraries are excluded (a 16×16 call first loads them: torch's first-call
  set-up, numba and the compiled lattice build, about the same for every size). Just before
  that baseline the C heap's free pages are returned to the OS (``malloc_trim``), so that
  neither implementation's peak is partly hidden in pages that earlier work freed but kept
  (that hid 60 % of pydensecrf's peak at 128²), and the kernel's peak-RSS mark is reset
  (``/proc/self/clear_refs``), so that a peak from before the baseline cannot count; where
  that reset is not allowed, the process's lifetime peak (``ru_maxrss``) is used. On CUDA
  also ``torch.cuda.max_memory_allocated``.

It prints a markdown table (ms, ms per megapixel, MB, bytes per pixel, ratios to
pydensecrf), then the exponent ``k`` of a least-squares fit ``time ∝ N^k`` over the sizes
from 256² up (``N`` pixels), and the peak-memory ratio at every size.

    PYTHONPATH=src python benchmarks/crf_scaling.py
    PYTHONPATH=src python benchmarks/crf_scaling.py --sizes 128 256 --no-extra --repeats 2
    PYTHONPATH=src python benchmarks/crf_scaling.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def trim_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``; False where there is no
    glibc): pages that earlier work freed but kept resident would otherwise absorb part of the
    next peak, a discount that depends on the process's history, not on what the CRF needs."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS mark (``VmHWM``) again from the current RSS (Linux); False
    where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(since_reset: bool) -> int:
    if since_reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(impl: str, width: int, height: int, classes: int, repeats: int, device: str, threads: int,
          clock=time.perf_counter) -> dict:
    """One implementation on one size, in this (fresh) process."""
    sys.path.insert(0, str(HERE))
    from crf_speed import KERNELS, synthetic_image, synthetic_probs

    def make(w: int, h: int):
        img = synthetic_image(h, w, 3, seed=w + h)
        probs = synthetic_probs(h, w, classes, seed=classes)
        if impl == "pydensecrf":
            from crf_speed import run_pydensecrf

            return lambda: run_pydensecrf(probs, img, 5)
        import torch

        from segrefine.crf import clear_spatial_cache, dense_crf

        dev = torch.device(device)
        t_img = torch.from_numpy(img).permute(2, 0, 1).float()[None].contiguous().to(dev)
        t_p = torch.from_numpy(probs)[None].contiguous().to(dev)

        def run():
            clear_spatial_cache()
            dense_crf(t_p, t_img, kernels=KERNELS, iterations=5)

        return run

    sync = lambda: None  # noqa: E731
    if impl != "pydensecrf":
        import torch

        torch.set_num_threads(threads)
        if device.startswith("cuda"):
            sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    # one call on a tiny image first: libraries load (torch's first-call set-up, numba and its
    # compiled build) before the baseline, so the peak counts what this size needs
    make(16, 16)()
    run = make(width, height)
    trimmed = trim_heap()
    since_reset = reset_peak_rss()
    base = rss_bytes()
    times = []
    for i in range(repeats + 1):
        t = clock()
        run()
        sync()
        if i:  # the first call is a warm-up
            times.append(clock() - t)
    out = {"ms": 1e3 * statistics.median(times), "peak_mb": (peak_rss_bytes(since_reset) - base) / 2**20,
           "heap_trimmed": trimmed, "peak_since_baseline": since_reset}
    if impl != "pydensecrf" and device.startswith("cuda"):
        import torch

        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_child(impl, w, h, c, args) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, str(w), str(h), str(c), "--repeats", str(args.repeats),
           "--device", args.device, "--threads", str(args.threads), "--clock", args.clock]
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["exit %d" % res.returncode])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[128, 256, 512, 1024, 2048], help="square sides")
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--no-extra", action="store_true", help="skip the 1024x2048, C=19 case")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPUs)")
    ap.add_argument("--no-pydensecrf", action="store_true")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or the process's CPU time (load-independent with --threads 1)")
    ap.add_argument("--child", nargs=4, metavar=("IMPL", "W", "H", "C"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    from segrefine import hardware

    args.threads = args.threads or hardware.available_cpus()
    if args.child:
        impl, w, h, c = args.child
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        print(json.dumps(child(impl, int(w), int(h), int(c), args.repeats, args.device, args.threads, clock)))
        return
    import torch

    torch.set_num_threads(args.threads)
    cases = [(s, s, args.classes) for s in args.sizes] + ([] if args.no_extra else [(2048, 1024, 19)])
    impls = ["dense_crf"] + ([] if args.no_pydensecrf else ["pydensecrf"])
    print(f"{hardware.summary(args.device)}; dense_crf on {args.device}, pydensecrf on the CPU (single-threaded); "
          f"5 iterations; {'wall' if args.clock == 'wall' else 'CPU'} time, median of {args.repeats} after a warm-up; every lattice built in the call; memory = peak "
          f"RSS of a fresh process from just before the first call at that size on, minus that RSS (after a "
          f"16×16 call and malloc_trim)")
    cols = ["W×H", "C", "pixels", "dense_crf ms", "ms/MPix", "peak MB", "B/pixel"]
    if args.device.startswith("cuda"):
        cols += ["CUDA peak MB"]
    cols += ["pydensecrf ms", "peak MB", "B/pixel", "time ratio", "memory ratio"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    rows = []
    for w, h, c in cases:
        r = {impl: run_child(impl, w, h, c, args) for impl in impls}
        rows.append((w, h, c, r))
        n = w * h
        d, p = r["dense_crf"], r.get("pydensecrf", {"error": "skipped"})
        cells = [f"{w}×{h}", str(c), str(n)]
        if "error" in d:
            cells += [f"failed: {d['error']}", "", "", ""]
        else:
            cells += [f"{d['ms']:.0f}", f"{d['ms'] / n * 1e6:.0f}", f"{d['peak_mb']:.0f}", f"{d['peak_mb'] * 2**20 / n:.0f}"]
        if args.device.startswith("cuda"):
            cells += [f"{d.get('cuda_peak_mb', float('nan')):.0f}"]
        if "error" in p:
            cells += [p["error"], "", "", "", ""]
        else:
            tr = d["ms"] / p["ms"] if "ms" in d else float("nan")
            mr = d["peak_mb"] / p["peak_mb"] if "peak_mb" in d else float("nan")
            cells += [f"{p['ms']:.0f}", f"{p['peak_mb']:.0f}", f"{p['peak_mb'] * 2**20 / n:.0f}", f"{tr:.2f}", f"{mr:.2f}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    square = [(w * h, r) for w, h, c, r in rows if w == h and c == args.classes and w >= 256]
    for impl in impls:
        pts = [(n, r[impl]["ms"]) for n, r in square if "ms" in r[impl]]
        if len(pts) >= 2:
            k = np.polyfit(np.log([n for n, _ in pts]), np.log([t for _, t in pts]), 1)[0]
            print(f"{impl}: time ∝ N^{k:.2f} (least squares over {len(pts)} square sizes from "
                  f"{int(pts[0][0] ** 0.5)}² to {int(pts[-1][0] ** 0.5)}², C={args.classes})")
    # the header's memory method holds only where the child could trim and reset: say where not
    results = [res for *_, r in rows for res in r.values() if "peak_mb" in res]
    if not all(res["heap_trimmed"] for res in results):
        print("note: no glibc malloc_trim here; peaks may be partly hidden in memory freed before the baseline")
    if not all(res["peak_since_baseline"] for res in results):
        print("note: the peak-RSS mark could not be reset here; peaks are the process's lifetime peak (ru_maxrss) "
              "minus the baseline, so a peak from before the baseline can count")


if __name__ == "__main__":
    main()
