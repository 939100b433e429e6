"""Inference cost of ``head=pointrend`` against ``head=none`` for every backbone (not a test).

Each backbone is built from the real Hydra configs (``conf/backbone/*.yaml`` x
``conf/head/{none,pointrend}.yaml``, so U-Net is the full decoder with ``none`` and the
stride-4 truncated decoder with ``pointrend``), in eval mode under ``torch.inference_mode``,
on random images. For each image size it prints ms/image (median of ``--repeats`` after
``--warmup`` calls; none and pointrend interleaved so machine noise hits both alike) and
the cost split of pointrend into its backbone, the whole refinement (``render``: upsampling,
uncertainty, top-k, point sampling, point head, scatter) and the point head MLP alone, in
ms and in GFLOP (``torch.utils.flop_counter``, exact and noise-free). The target: the
refinement costs no more than the backbone at 320x320.

    PYTHONPATH=src python benchmarks/pointrend_speed.py
    PYTHONPATH=src python benchmarks/pointrend_speed.py --sizes 320 --threads 1 --batch 4
    PYTHONPATH=src python benchmarks/pointrend_speed.py --set head.subdivision_num_points=0.00390625
    PYTHONPATH=src python benchmarks/pointrend_speed.py --device cuda --batch 4   # synchronised timings
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode
from segrefine.build import build_component

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
BACKBONES = {
    "fcn-8s": ["backbone=fcn", "backbone.variant=8s"],
    "fcn-32s": ["backbone=fcn", "backbone.variant=32s"],
    "pspnet": ["backbone=pspnet"],
    "unet": ["backbone=unet"],
}


def build(overrides: list[str], head: str, extra: list[str], in_channels: int, num_classes: int):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"head={head}", "paths.output_dir=/tmp/unused",
                                          *(extra if head == "pointrend" else [])])
    torch.manual_seed(0)
    backbone = build_component(cfg.backbone, in_channels=in_channels, num_classes=num_classes).eval()
    return backbone, build_component(cfg.head, num_classes=num_classes, backbone=backbone).eval()


class Stopwatch:
    """Accumulates wall time spent inside a module's forward (pre/post hooks; ``sync`` on CUDA)."""

    def __init__(self, module: torch.nn.Module, sync):
        self.seconds, self._start, self._sync = 0.0, 0.0, sync
        module.register_forward_pre_hook(lambda *_: self._begin())
        module.register_forward_hook(lambda *_: self._end())

    def _begin(self) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _end(self) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._start


def gflop(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 320])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for the pointrend build")
    parser.add_argument("--device", default="cpu", help="cpu (the target) or cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, batch {args.batch}, "
          f"median of {args.repeats} after {args.warmup} warm-up; per image. pointrend overrides: {args.set or 'defaults'}")
    header = ("| size | backbone | none ms | pointrend ms | PR backbone ms | PR refine ms | PR point-MLP ms "
              "| refine/backbone (time) | PR backbone GFLOP | refine GFLOP | refine/backbone (GFLOP) |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for size in args.sizes:
        for name in args.backbones:
            none_bb, none_head = (m.to(device) for m in build(BACKBONES[name], "none", args.set, args.channels, args.classes))
            pr_bb, pr_head = (m.to(device) for m in build(BACKBONES[name], "pointrend", args.set, args.channels, args.classes))
            mlp = Stopwatch(pr_head.point_head, sync)
            image = torch.randn(args.batch, args.channels, size, size, device=device)
            times = {"none": [], "pr": [], "pr_bb": [], "pr_refine": [], "pr_mlp": []}
            with torch.inference_mode():
                for i in range(args.warmup + args.repeats):
                    sync()
                    t0 = time.perf_counter()
                    none_head(none_bb(image), image)
                    sync()
                    t1 = time.perf_counter()
                    out = pr_bb(image)
                    sync()
                    t2 = time.perf_counter()
                    mlp.seconds = 0.0
                    pr_head(out, image)
                    sync()
                    t3 = time.perf_counter()
                    if i >= args.warmup:
                        for key, value in (("none", t1 - t0), ("pr", t3 - t1), ("pr_bb", t2 - t1),
                                           ("pr_refine", t3 - t2), ("pr_mlp", mlp.seconds)):
                            times[key].append(1000 * value / args.batch)
                out = pr_bb(image)
                bb_flop = gflop(lambda: pr_bb(image)) / args.batch
                refine_flop = gflop(lambda: pr_head(out, image)) / args.batch
            ms = {k: statistics.median(v) for k, v in times.items()}
            print(f"| {size}² | {name} | {ms['none']:.1f} | {ms['pr']:.1f} | {ms['pr_bb']:.1f} | {ms['pr_refine']:.1f} "
                  f"| {ms['pr_mlp']:.1f} | {ms['pr_refine'] / ms['pr_bb']:.2f} | {bb_flop:.2f} | {refine_flop:.2f} "
                  f"| {refine_flop / bb_flop:.2f} |", flush=True)


if __name__ == "__main__":
    main()
