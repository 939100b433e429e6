"""What the crfrnn head adds to a training step (not a test).

    .venv/bin/python benchmarks/crfrnn_step.py [--size 128] [--batch 8] [--threads 2]

Times forward + backward + optimiser step of U-Net with head=none and head=crfrnn
(5 mean-field iterations) on built-in synthetic images, median over repeats after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from segrefine.data.synthetic import generate_sample
from segrefine.heads.crfrnn import CRFRNNHead
from segrefine.heads.none import NoHead
from segrefine.models.unet import UNet


def step_time(backbone, head, image, mask, repeats: int) -> float:
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-4)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = F.cross_entropy(head(backbone(image), image), mask)
        loss.backward()
        optimizer.step()
        if i >= 2:  # warm-up steps are not timed
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    pairs = [generate_sample(rng, args.size, 3, 0.12, 0.22, 0.25, 0.8) for _ in range(args.batch)]
    image = torch.from_numpy(np.stack([p[0] for p in pairs]))
    mask = torch.from_numpy(np.stack([p[1] for p in pairs])).long()
    torch.manual_seed(0)
    backbone = UNet(1, 3).train()
    none = step_time(backbone, NoHead(3).train(), image, mask, args.repeats)
    # The conf/head/crfrnn.yaml defaults (narrow kernels: the larger lattice, the slower case).
    crfrnn_head = CRFRNNHead(3, gaussian_sxy=1.0, bilateral_sxy=5.0, bilateral_compat=3.0).train()
    crfrnn = step_time(backbone, crfrnn_head, image, mask, args.repeats)
    print(f"U-Net training step, {args.batch} x {args.size}², {args.threads} thread(s), median of {args.repeats}")
    print("| head | s/step | vs none |\n|---|---|---|")
    print(f"| none | {none:.3f} | 1.00x |")
    print(f"| crfrnn (5 iterations) | {crfrnn:.3f} | {crfrnn / none:.2f}x (+{100 * (crfrnn / none - 1):.0f} %) |")


if __name__ == "__main__":
    main()
