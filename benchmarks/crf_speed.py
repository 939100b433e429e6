"""Speed of ``segrefine.crf.dense_crf`` against ``pydensecrf`` (not a test).

For each image size and class count: the same unary and image are given to
``dense_crf`` (5 iterations, lattice build included) and to ``pydensecrf``
(``DenseCRF2D`` + README-default pairwise terms + ``inference``), on CPU with
one thread and with all threads (``torch.set_num_threads``), and on CUDA when
present. Prints ms/image (best of ``--repeats`` after a warm-up, the
implementations called round-robin) and the ratio to pydensecrf (the
``pydensecrf`` column of a CUDA row repeats the CPU figure). ``ms/img`` builds every lattice inside the timed call
(what pydensecrf does); ``cached`` reuses the spatial kernel's lattice, which
depends only on the image size (``dense_crf``'s default for repeated sizes).

    PYTHONPATH=src python benchmarks/crf_speed.py
    PYTHONPATH=src python benchmarks/crf_speed.py --sizes 320x320 --classes 2 --repeats 5

Images are synthetic but natural-looking (smooth shading, a few shapes with
sharp edges, mild noise, integer valued 0-255) so that lattice sizes resemble
real photographs rather than noise; ``--noise`` uses uniform noise instead
(worst case for the lattice).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from segrefine.crf import clear_spatial_cache, dense_crf

try:
    import pydensecrf.densecrf as dcrf
except ImportError:  # pragma: no cover
    dcrf = None


def synthetic_image(height: int, width: int, channels: int = 3, seed: int = 0, noise: bool = False) -> np.ndarray:
    """``(H, W, K)`` uint8 natural-looking test image.

    Shaded background, ten flat-coloured ellipses/rectangles (sharp edges),
    multi-scale smooth texture and mild pixel noise. Its bilateral lattice
    (θα=80, θβ=13) has ~1-2 % of N(d+1) points, like real photographs.
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
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(img), compat=10)
    return np.array(d.inference(iterations))


def timeit_interleaved(fns: dict, repeats: int, sync=None) -> dict:
    """Best-of-``repeats`` ms per call for each function, calling them
    round-robin (so load drift on a shared machine hits all alike). Each is
    warmed up once first."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    if sync:
        sync()
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if sync:
                sync()
            times[k].append(time.perf_counter() - t)
    return {k: min(v) * 1e3 for k, v in times.items()}


def dense_crf_fns(p: torch.Tensor, img: torch.Tensor, args) -> dict:
    """dense_crf with every lattice built in the call (spatial lattice cache
    cleared first) and with the spatial lattice cached (the steady state for
    a stream of same-size images)."""

    def cold():
        clear_spatial_cache()
        dense_crf(p, img, iterations=args.iterations)

    return {"cold": cold, "cached": lambda: dense_crf(p, img, iterations=args.iterations)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["128x128", "320x320", "512x512", "500x375"],
                    help="WxH image sizes")
    ap.add_argument("--classes", nargs="+", type=int, default=[2, 21])
    ap.add_argument("--only", nargs="*", default=None,
                    help="restrict to WxH:C combos (default: every size x class, but 500x375 only with C=21)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1, help="images per dense_crf call (ms reported per image)")
    ap.add_argument("--threads", nargs="+", type=int, default=None,
                    help="CPU thread counts (default: 1 and all)")
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument("--noise", action="store_true", help="uniform-noise images (lattice worst case)")
    ap.add_argument("--tune-malloc", action="store_true",
                    help="keep freed heap memory mapped (glibc mallopt), for both implementations: "
                         "avoids page faults from large temporaries, which are costly in some VMs")
    args = ap.parse_args()
    if args.tune_malloc:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)

    all_threads = os.cpu_count() or 1
    threads = args.threads or sorted({1, all_threads})
    combos = []
    for s in args.sizes:
        w, h = (int(v) for v in s.lower().split("x"))
        for c in args.classes:
            tag = f"{w}x{h}:{c}"
            if args.only is not None:
                if tag not in args.only:
                    continue
            elif s == "500x375" and c != 21:
                continue
            combos.append((w, h, c))

    cuda = torch.cuda.is_available() and not args.no_cuda
    print(f"torch {torch.__version__}, {all_threads} CPU threads available, CUDA: {cuda}, "
          f"pydensecrf: {dcrf is not None}, iterations {args.iterations}, batch {args.batch}, "
          f"{'noise' if args.noise else 'natural-looking'} images, malloc tuned: {args.tune_malloc}")
    header = (f"{'size':>9} {'C':>3} {'device':>6} {'threads':>7} {'ms/img':>8} {'cached':>8} {'pydensecrf':>10} "
              f"{'ratio':>6} {'cached':>6} {'max|dQ|':>8}")
    print(header)
    print("-" * len(header))
    for w, h, c in combos:
        img = synthetic_image(h, w, 3, seed=w + h, noise=args.noise)
        probs = synthetic_probs(h, w, c, seed=c)
        t_img = torch.from_numpy(img).permute(2, 0, 1).float()[None].repeat(args.batch, 1, 1, 1).contiguous()
        t_p = torch.from_numpy(probs)[None].repeat(args.batch, 1, 1, 1).contiguous()
        for nt in threads:
            torch.set_num_threads(nt)
            fns = dense_crf_fns(t_p, t_img, args)
            ref_ms = err = float("nan")
            if dcrf is not None:
                # pydensecrf is single-threaded; timed under the same setting
                fns["ref"] = lambda: run_pydensecrf(probs, img, args.iterations)
                q_ref = run_pydensecrf(probs, img, args.iterations).reshape(c, h, w)
                q = dense_crf(t_p[:1], t_img[:1], iterations=args.iterations)[0].numpy()
                err = float(np.abs(q - q_ref).max())
            t = timeit_interleaved(fns, args.repeats)
            ref_ms = t.get("ref", ref_ms)
            ms, ms_c = t["cold"] / args.batch, t["cached"] / args.batch
            print(f"{w}x{h:<5} {c:>3} {'cpu':>6} {nt:>7} {ms:>8.1f} {ms_c:>8.1f} {ref_ms:>10.1f} "
                  f"{ms / ref_ms:>6.2f} {ms_c / ref_ms:>6.2f} {err:>8.1e}", flush=True)
        if cuda:
            torch.set_num_threads(all_threads)
            t = timeit_interleaved(dense_crf_fns(t_p.cuda(), t_img.cuda(), args), args.repeats,
                                   sync=torch.cuda.synchronize)
            ms, ms_c = t["cold"] / args.batch, t["cached"] / args.batch
            print(f"{w}x{h:<5} {c:>3} {'cuda':>6} {'-':>7} {ms:>8.1f} {ms_c:>8.1f} {ref_ms:>10.1f} "
                  f"{ms / ref_ms:>6.2f} {ms_c / ref_ms:>6.2f}", flush=True)
    torch.set_num_threads(all_threads)


if __name__ == "__main__":
    main()
