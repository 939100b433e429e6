"""Wall time of ``segrefine-report`` on a study folder (not a test). Target: the smoke
study's runs (``make demo``: 12 runs, 32 test images each) in at most 5 s, bootstrap
(10 000 resamples per test) and figures included, in a fresh process.

    PYTHONPATH=src python benchmarks/report_speed.py outputs/demo/<time>
    PYTHONPATH=src python benchmarks/report_speed.py outputs/demo/<time> --metrics unet_crfrnn --repeats 3

Each repeat runs ``python -m segrefine.report DIR --out <tmp>`` as a new process, so
imports (numpy, scipy.stats, matplotlib) count, as they do for a user. Prints the wall
and CPU (user + system) seconds of each repeat and the best; CPU time shows the cost on a
machine shared with other jobs, where wall time is inflated.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="folder of runs (e.g. a paper_table --out folder)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--metrics", default=None, choices=["standard", "unet_crfrnn"])
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args()
    walls, cpus = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "segrefine.report", args.study, "--out", out]
            command += ["--metrics", args.metrics] if args.metrics else []
            command += ["--no-figures"] if args.no_figures else []
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ})
            walls.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        print(f"wall {walls[-1]:.2f} s   cpu {cpus[-1]:.2f} s")
    print(f"best: wall {min(walls):.2f} s, cpu {min(cpus):.2f} s ({'no ' if args.no_figures else ''}figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
