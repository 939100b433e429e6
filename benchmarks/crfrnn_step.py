"""What the crfrnn head adds to a training step (not a test).

    .venv/bin/python benchmarks/crfrnn_step.py [--size 320] [--batch 8] [--threads 2] [--device cuda]

Times forward + backward + optimiser step of U-Net with head=none and head=crfrnn
(5 mean-field iterations) on built-in synthetic images, median over repeats after warm-up,
the two heads' steps interleaved (load drift hits both alike; on CUDA synchronised).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from segrefine import hardware
from segrefine.data.synthetic import generate_sample
from segrefine.heads.crfrnn import CRFRNNHead
from segrefine.heads.none import NoHead
from segrefine.models.unet import UNet


def make_step(backbone, head, image, mask):
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-4)

    def step():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(backbone(image), image), mask)
        loss.backward()
        optimizer.step()

    return step


def step_times(steps: dict, repeats: int, sync) -> dict:
    """Median seconds per step of each function, called round-robin after 2 warm-up calls each."""
    times = {k: [] for k in steps}
    for i in range(repeats + 2):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            if i >= 2:  # warm-up steps are not timed
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    pairs = [generate_sample(rng, args.size, 3, 0.12, 0.22, 0.25, 0.8) for _ in range(args.batch)]
    image = torch.from_numpy(np.stack([p[0] for p in pairs])).to(device)
    mask = torch.from_numpy(np.stack([p[1] for p in pairs])).long().to(device)
    torch.manual_seed(0)
    backbone = UNet(1, 3).train().to(device)
    # The conf/head/crfrnn.yaml kernels, which are the head's defaults (narrow: the larger lattice, the slower case).
    crfrnn_head = CRFRNNHead(3).train().to(device)
    steps = {"none": make_step(backbone, NoHead(3).train().to(device), image, mask),
             "crfrnn": make_step(backbone, crfrnn_head, image, mask)}
    t = step_times(steps, args.repeats, sync)
    none, crfrnn = t["none"], t["crfrnn"]
    print(f"U-Net training step (float32), {args.batch} x {args.size}², {hardware.summary(device)}, "
          f"median of {args.repeats}, heads interleaved")
    print("| head | s/step | vs none |\n|---|---|---|")
    print(f"| none | {none:.3f} | 1.00x |")
    print(f"| crfrnn (5 iterations) | {crfrnn:.3f} | {crfrnn / none:.2f}x (+{100 * (crfrnn / none - 1):.0f} %) |")


if __name__ == "__main__":
    main()
