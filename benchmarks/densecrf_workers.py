"""DenseCRF head throughput vs worker count (not a test).

    .venv/bin/python benchmarks/densecrf_workers.py --size 320 --images 16 --workers 1 2

pydensecrf's README kernels (``segrefine.crf.PYDENSECRF_KERNELS``). Images come from the
built-in synthetic generator; probabilities are a noisy version of
the true labels. The worker pool is warmed up before timing (its start is not counted).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from segrefine.data.synthetic import generate_sample
from segrefine.crf import PYDENSECRF_KERNELS
from segrefine.heads.densecrf import DenseCRFHead


def make_batch(size: int, count: int, num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pairs = [generate_sample(rng, size, num_classes, 0.12, 0.22, 0.25, 0.8) for _ in range(count)]
    image = torch.from_numpy(np.stack([p[0] for p in pairs]))
    labels = torch.from_numpy(np.stack([p[1] for p in pairs])).long()
    logits = 2.0 * torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
    probs = (logits + torch.from_numpy(rng.normal(0, 1.5, logits.shape)).float()).softmax(1)
    return probs, image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    probs, image = make_batch(args.size, args.images, args.classes)
    print(f"{args.images} images of {args.size}x{args.size}, C={args.classes}, CPUs={os.cpu_count()}")
    print("| workers | ms/image | speed-up |\n|---|---|---|")
    baseline = None
    reference = None
    for workers in args.workers:
        head = DenseCRFHead(args.classes, num_workers=workers, **PYDENSECRF_KERNELS.as_dict())
        head.refine(probs[: max(workers, 1)], image[: max(workers, 1)])  # start the pool
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = head.refine(probs, image)
            best = min(best, time.perf_counter() - start)
        reference = out if reference is None else reference
        assert torch.equal(out, reference), "results differ between worker counts"
        ms = 1000 * best / args.images
        baseline = baseline or ms
        print(f"| {workers} | {ms:.1f} | {baseline / ms:.2f}x |")


if __name__ == "__main__":
    main()
