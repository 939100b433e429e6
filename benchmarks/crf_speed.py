"""Speed of ``segrefine.crf`` against ``pydensecrf`` and the official CRF-as-RNN layer (not a test).

Cases (``WxH:C``; default ``320x320:2`` and ``500x375:21``), 5 mean-field iterations,
pydensecrf's README kernels (``segrefine.crf.PYDENSECRF_KERNELS``: gaussian sxy 3, compat 3;
bilateral sxy 80, schan (pydensecrf's srgb) 13, compat 10), for each torch thread count:

* ``dense_crf`` ms/image, every lattice built in the call (``cold``, what pydensecrf does)
  and with the spatial lattice cached (``cached``, dense_crf's default for a stream of
  same-size images), against ``pydensecrf`` (``DenseCRF2D`` + the same pairwise terms +
  ``inference``; single-threaded C++, timed under the same setting);
* the CRF-RNN layer forward+backward: ``MeanFieldCRF`` (learned compatibility) against the
  official CRF-as-RNN PyTorch layer (``sadeepj/crfasrnn_pytorch``, C++ permutohedral
  lattice) when ``--crfasrnn DIR`` points at a built copy of that repository (it is only a
  timing reference and never part of segrefine; skipped when absent);
* with ``--baseline-src DIR``, the same rows for another version of ``segrefine.crf``
  (``DIR/segrefine/crf``, e.g. ``git archive main src/segrefine/crf | tar -x -C /tmp/before``
  then ``--baseline-src /tmp/before/src``): before/after from the same run.

Timing: every implementation is warmed up, then they are called round-robin ``--repeats``
times (load drift on a shared machine hits all alike) and the **median** is reported. The
table is markdown, ready to paste, headed by the hardware (``segrefine.hardware``).

    PYTHONPATH=src python benchmarks/crf_speed.py
    PYTHONPATH=src python benchmarks/crf_speed.py --cases 320x320:2 --threads 1 2 --repeats 9
    PYTHONPATH=src python benchmarks/crf_speed.py --device cuda --cases 500x375:21 1024x2048:19
    PYTHONPATH=src python benchmarks/crf_speed.py --crfasrnn /tmp/crfasrnn --baseline-src /tmp/before/src

Images are synthetic but natural-looking (smooth shading, a few shapes with sharp edges,
mild noise, integer valued 0-255) so that lattice sizes resemble real photographs rather
than noise; ``--noise`` uses uniform noise instead (worst case for the lattice).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from segrefine import hardware
from segrefine import crf as segrefine_crf
from segrefine.crf import PYDENSECRF_KERNELS as KERNELS

try:
    import pydensecrf.densecrf as dcrf
except ImportError:  # pragma: no cover
    dcrf = None


def synthetic_image(height: int, width: int, channels: int = 3, seed: int = 0, noise: bool = False) -> np.ndarray:
    """``(H, W, K)`` uint8 natural-looking test image.

    Shaded background, ten flat-coloured ellipses/rectangles (sharp edges),
    multi-scale smooth texture and mild pixel noise. Its bilateral lattice
    (bilateral_sxy 80, bilateral_schan 13) has ~1-2 % of N(d+1) points, like real photographs.
    """
    rng = np.random.default_rng(seed)
    if noise:
        return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, channels), np.float32)
    gx, gy = rng.uniform(-0.5, 0.5, 2) * 255 / max(height, width)
    img[:] = rng.uniform(40, 200, channels) + (gx * xx + gy * yy)[..., None]
    for _ in range(10):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.05, 0.3, 2) * np.array([height, width])
        if rng.random() < 0.5:
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        else:
            m = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
        img[m] = rng.uniform(0, 255, channels)
    for s in (4, 8, 16, 32):  # smooth texture: bilinearly upsampled noise
        g = rng.normal(0, 10.0, (height // s + 2, width // s + 2, channels)).astype(np.float32)
        fy = np.arange(height) / s
        fx = np.arange(width) / s
        y0, x0 = fy.astype(int), fx.astype(int)
        wy, wx = (fy - y0)[:, None, None], (fx - x0)[None, :, None]
        img += ((1 - wy) * ((1 - wx) * g[y0][:, x0] + wx * g[y0][:, x0 + 1])
                + wy * ((1 - wx) * g[y0 + 1][:, x0] + wx * g[y0 + 1][:, x0 + 1]))
    img += rng.normal(0, 4.0, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def synthetic_probs(height: int, width: int, classes: int, seed: int = 0) -> np.ndarray:
    """``(C, H, W)`` float32 smooth-ish class probabilities."""
    rng = np.random.default_rng(seed + 1)
    logits = rng.normal(0, 1, (classes, height // 8 + 1, width // 8 + 1)).astype(np.float32) * 3
    logits = np.kron(logits, np.ones((8, 8), np.float32))[:, :height, :width]
    logits += rng.normal(0, 1, logits.shape).astype(np.float32)
    p = np.exp(logits - logits.max(0))
    return (p / p.sum(0)).astype(np.float32)


def run_pydensecrf(probs: np.ndarray, img: np.ndarray, iterations: int) -> np.ndarray:
    C, H, W = probs.shape
    d = dcrf.DenseCRF2D(W, H, C)
    d.setUnaryEnergy(np.ascontiguousarray(-np.log(probs).reshape(C, -1)))
    d.addPairwiseGaussian(sxy=KERNELS.gaussian_sxy, compat=KERNELS.gaussian_compat)
    d.addPairwiseBilateral(sxy=KERNELS.bilateral_sxy, srgb=KERNELS.bilateral_schan, rgbim=np.ascontiguousarray(img),
                           compat=KERNELS.bilateral_compat)
    return np.array(d.inference(iterations))


def load_crf_package(src: str, name: str):
    """``segrefine.crf`` from another source tree (``src/segrefine/crf``), as module ``name``."""
    init = Path(src) / "segrefine" / "crf" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline-src {src}: no segrefine/crf/__init__.py there")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_crfasrnn(path: str | None):
    """The official CRF-as-RNN layer class from a built copy of sadeepj/crfasrnn_pytorch, or None."""
    if not path:
        return None
    root = Path(path)
    sys.path[:0] = [str(root), str(root / "crfasrnn")]  # permuto_cpp is built in crfasrnn/
    try:
        from crfasrnn.crfrnn import CrfRnn
        from crfasrnn.params import DenseCRFParams
    except Exception as e:  # noqa: BLE001 - a reference that is absent or unbuilt is skipped
        print(f"official CRF-as-RNN layer not usable from {path}: {e!r}; its rows are skipped")
        return None

    def make(num_classes: int, iterations: int):
        params = DenseCRFParams(alpha=KERNELS.bilateral_sxy, beta=KERNELS.bilateral_schan, gamma=KERNELS.gaussian_sxy,
                                spatial_ker_weight=KERNELS.gaussian_compat,
                                bilateral_ker_weight=KERNELS.bilateral_compat)
        return CrfRnn(num_classes, num_iterations=iterations, crf_init_params=params)

    return make


def timeit_interleaved(fns: dict, repeats: int, sync=None, clock=time.perf_counter) -> dict:
    """Median ms per call of each function, called round-robin ``repeats`` times after
    one warm-up call each (``sync`` after every call on CUDA). ``clock`` is wall time by
    default; ``time.process_time`` gives the CPU time of the process instead."""
    sync = sync or (lambda: None)
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    sync()
    for _ in range(repeats):
        for k, fn in fns.items():
            t = clock()
            fn()
            sync()
            times[k].append(clock() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def kernel_args(crf, layer: bool = False) -> dict:
    """:data:`KERNELS` as keyword arguments of ``crf.dense_crf`` / ``crf.MeanFieldCRF``, also for
    a ``--baseline-src`` version from before ``CRFKernels`` (flat, differently named arguments)."""
    if hasattr(crf, "CRFKernels"):
        return {"kernels": crf.CRFKernels(**KERNELS.as_dict())}
    k = KERNELS
    if layer:
        return dict(theta_alpha=k.bilateral_sxy, theta_beta=k.bilateral_schan, theta_gamma=k.gaussian_sxy,
                    spatial_weight=k.gaussian_compat, bilateral_weight=k.bilateral_compat)
    return dict(gaussian_sxy=k.gaussian_sxy, gaussian_compat=k.gaussian_compat, bilateral_sxy=k.bilateral_sxy,
                bilateral_srgb=k.bilateral_schan, bilateral_compat=k.bilateral_compat)


def dense_crf_fns(crf, tag: str, p: torch.Tensor, img: torch.Tensor, iterations: int) -> dict:
    """``crf.dense_crf`` with every lattice built in the call (spatial cache cleared first)
    and with the spatial lattice cached."""
    kw = kernel_args(crf)

    def cold():
        crf.clear_spatial_cache()
        crf.dense_crf(p, img, iterations=iterations, **kw)

    return {f"{tag} cold": cold, f"{tag} cached": lambda: crf.dense_crf(p, img, iterations=iterations, **kw)}


def layer_fn(layer, logits: torch.Tensor, img: torch.Tensor, grad: torch.Tensor, official: bool):
    """Forward + backward of a CRF-RNN layer w.r.t. the unary logits (and its parameters)."""

    def step():
        x = logits.detach().requires_grad_()
        out = layer(img, x) if official else layer(x, img)
        (out * grad).sum().backward()
        layer.zero_grad(set_to_none=True)

    return step


def parse_case(text: str) -> tuple[int, int, int]:
    try:
        size, classes = text.lower().split(":")
        w, h = (int(v) for v in size.split("x"))
        return w, h, int(classes)
    except ValueError:
        raise SystemExit(f"--cases {text!r}: expected WxH:C, e.g. 500x375:21") from None


def fmt(ms: float) -> str:
    return "–" if ms != ms else f"{ms:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["320x320:2", "500x375:21"], help="WxH:C")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--threads", nargs="+", type=int, default=None,
                    help="CPU thread counts (default: 1 and the usable CPUs)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (pydensecrf always runs on the CPU)")
    ap.add_argument("--crfasrnn", default=None, help="built copy of sadeepj/crfasrnn_pytorch (timing reference)")
    ap.add_argument("--baseline-src", default=None, help="src/ folder of another segrefine version ('before')")
    ap.add_argument("--no-layer", action="store_true", help="skip the CRF-RNN layer forward+backward rows")
    ap.add_argument("--noise", action="store_true", help="uniform-noise images (lattice worst case)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time (default), or the process's CPU time: with one thread on a loaded machine "
                         "a load-independent measure of the work done (not of wall time with several threads)")
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.clock == "cpu" and args.device != "cpu":
        raise SystemExit("--clock cpu measures CPU work; use the default wall clock with --device cuda")
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    cpus = hardware.available_cpus()
    threads = args.threads or sorted({1, cpus})
    if device.type == "cuda":
        threads = threads[-1:]  # host threads barely matter on the GPU; one row per case
    versions = {"now": segrefine_crf}
    if args.baseline_src:
        versions["before"] = load_crf_package(args.baseline_src, "segrefine_crf_before")
    official = None if args.no_layer else load_crfasrnn(args.crfasrnn)

    print(f"{hardware.summary(device, threads=False)} (torch threads per row); pydensecrf: {dcrf is not None}; official CRF-as-RNN: {official is not None}; "
          f"{args.iterations} iterations, kernels {KERNELS}; "
          f"median of {args.repeats}, implementations interleaved; "
          f"{'noise' if args.noise else 'natural-looking'} images; ms per image, "
          f"{'wall time' if args.clock == 'wall' else 'CPU time of the process (not wall time)'}")
    cols = ["case", "device", "threads", "what"] + [f"{v} {k}" for v in versions for k in ("cold", "cached")]
    cols += ["pydensecrf / official", "ratio (" + ", ".join(f"{v} cold, {v} cached" for v in versions) + ")"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for case in args.cases:
        w, h, c = parse_case(case)
        img = synthetic_image(h, w, 3, seed=w + h, noise=args.noise)
        probs = synthetic_probs(h, w, c, seed=c)
        t_img = torch.from_numpy(img).permute(2, 0, 1).float()[None].contiguous().to(device)
        t_p = torch.from_numpy(probs)[None].contiguous().to(device)
        for nt in threads:
            torch.set_num_threads(nt)
            fns = {}
            for tag, crf in versions.items():
                fns.update(dense_crf_fns(crf, tag, t_p, t_img, args.iterations))
            if dcrf is not None:
                fns["ref"] = lambda: run_pydensecrf(probs, img, args.iterations)
            t = timeit_interleaved(fns, args.repeats, sync, clock)
            ref = t.get("ref", float("nan"))
            cells = [fmt(t[f"{v} {k}"]) for v in versions for k in ("cold", "cached")]
            ratios = ", ".join(f"{t[f'{v} {k}'] / ref:.2f}" for v in versions for k in ("cold", "cached"))
            print(f"| {w}×{h}, C={c} | {device.type} | {nt} | dense_crf | " + " | ".join(cells)
                  + f" | {fmt(ref)} | {ratios} |", flush=True)
            if args.no_layer:
                continue
            logits = torch.log(t_p.clamp_min(1e-8))
            grad = torch.randn_like(logits)
            fns = {}
            for tag, crf in versions.items():
                layer = crf.MeanFieldCRF(c, compatibility="learned", iterations=args.iterations,
                                         **kernel_args(crf, layer=True)).to(device)
                fns[tag] = layer_fn(layer, logits, t_img, grad, official=False)
            if official is not None and device.type == "cpu":
                layer = official(c, args.iterations)
                fns["official"] = layer_fn(layer, logits, t_img, grad, official=True)
            t = timeit_interleaved(fns, args.repeats, sync, clock)
            ref = t.get("official", float("nan"))
            cells = [x for v in versions for x in (fmt(t[v]), "")]
            ratios = ", ".join(f"{t[v] / ref:.2f}" for v in versions)
            print(f"| {w}×{h}, C={c} | {device.type} | {nt} | CRF-RNN layer fwd+bwd | " + " | ".join(cells)
                  + f" | {fmt(ref)} | {ratios} |", flush=True)
    torch.set_num_threads(cpus)


if __name__ == "__main__":
    main()
