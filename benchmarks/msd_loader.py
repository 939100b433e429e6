"""MSD loader throughput and memory: ``python benchmarks/msd_loader.py [--volumes 300]``.

Writes N synthetic NIfTI volumes of Task04 (hippocampus) size (about 35x51x35, 3 classes,
shapes varying by a few voxels) into a temp dir, then measures, each phase in a fresh
process:

- uncached: first ``prepare_data()`` + ``setup()`` (decode NIfTI, normalise, write the slice cache);
- cached: a second ``prepare_data()`` + ``setup()`` plus one pass over every split's DataLoader;
- peak memory of indexing the task, uncached and cached: tracemalloc peak (Python/numpy
  allocations) and the growth of ``ru_maxrss`` over the phase (process resident peak).

Slices/second counts every slice along the axial axis (``empty_slice_fraction=1``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path


def generate(root: Path, volumes: int) -> None:
    import nibabel as nib
    import numpy as np

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    training = []
    for i in range(volumes):
        shape = tuple(int(s) for s in np.array([35, 51, 35]) + rng.integers(-3, 4, 3))
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
        centre = rng.uniform(-0.2, 0.2, (3, 1, 1, 1))
        radius = np.sqrt(((grid - centre) ** 2 * np.array([1.0, 0.5, 1.0])[:, None, None, None]).sum(0))
        labels = np.where(radius < 0.45, np.where(grid[1] < centre[1], 1, 2), 0).astype(np.uint8)
        image = (labels * 40.0 + 100 + rng.normal(0, 15, shape)).astype(np.float32)
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
        name = f"hippocampus_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(labels, affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {"name": "Hippocampus", "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "modality": {"0": "MRI"}, "numTraining": volumes, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def phase(name: str, root: str, cache: str, batch_size: int, workers: int) -> dict:
    from segrefine.data.msd import MSDDataModule

    def build():
        dm = MSDDataModule(root=root, cache_dir=cache, empty_slice_fraction=1.0, augment=None,
                           batch_size=batch_size, num_workers=workers)
        dm.prepare_data()
        dm.setup()
        return dm

    rss0 = maxrss_mib()
    result: dict = {"phase": name}
    if name.startswith("mem"):
        tracemalloc.start()
        dm = build()
        result["tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    else:
        start = time.perf_counter()
        dm = build()
        result["setup_s"] = time.perf_counter() - start
        if name == "cached":
            start = time.perf_counter()
            for split in ("train", "val", "test"):
                loader = getattr(dm, f"{split}_dataloader")()
                for batch in loader:
                    pass
            result["iterate_s"] = time.perf_counter() - start
    result["slices"] = sum(len(ds) for ds in dm.datasets.values())
    result["size"] = list(dm.size)
    result["maxrss_delta_mib"] = maxrss_mib() - rss0
    return result


def run_phase(name: str, args, root: Path, cache: Path) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--root", str(root), "--cache", str(cache),
           "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.root, args.cache, args.batch_size, args.workers)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "Task04_Hippocampus"
        start = time.perf_counter()
        generate(root, args.volumes)
        print(f"generated {args.volumes} volumes in {time.perf_counter() - start:.1f} s "
              f"({sum(p.stat().st_size for p in root.rglob('*.nii.gz')) / 2**20:.1f} MiB of .nii.gz)")
        uncached = run_phase("uncached", args, root, Path(tmp) / "cache_a")
        cached = run_phase("cached", args, root, Path(tmp) / "cache_a")
        mem_uncached = run_phase("mem_uncached", args, root, Path(tmp) / "cache_b")
        mem_cached = run_phase("mem_cached", args, root, Path(tmp) / "cache_b")
        cache_mib = sum(p.stat().st_size for p in (Path(tmp) / "cache_a").rglob("*") if p.is_file()) / 2**20

    slices = uncached["slices"]
    rows = [
        ("uncached: prepare_data + setup (decode NIfTI, write cache)", uncached["setup_s"], slices / uncached["setup_s"]),
        ("cached: prepare_data + setup", cached["setup_s"], slices / cached["setup_s"]),
        (f"cached: one pass over all DataLoaders (batch {args.batch_size}, workers {args.workers})",
         cached["iterate_s"], slices / cached["iterate_s"]),
        ("cached: setup + one pass", cached["setup_s"] + cached["iterate_s"], slices / (cached["setup_s"] + cached["iterate_s"])),
    ]
    print(f"\n{args.volumes} volumes, {slices} axial slices, padded to {uncached['size']}, cache {cache_mib:.1f} MiB\n")
    print(f"| {'phase':<70} | {'seconds':>8} | {'slices/s':>10} |")
    print(f"|{'-' * 72}|{'-' * 10}|{'-' * 12}|")
    for label, seconds, rate in rows:
        print(f"| {label:<70} | {seconds:8.2f} | {rate:10.0f} |")
    print(f"\n| {'indexing ' + str(args.volumes) + ' volumes':<30} | {'tracemalloc peak MiB':>20} | {'maxrss growth MiB':>18} |")
    print(f"|{'-' * 32}|{'-' * 22}|{'-' * 20}|")
    for label, m in (("uncached (decode + cache)", mem_uncached), ("cached", mem_cached)):
        print(f"| {label:<30} | {m['tracemalloc_peak_mib']:20.1f} | {m['maxrss_delta_mib']:18.1f} |")


if __name__ == "__main__":
    main()
