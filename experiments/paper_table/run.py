"""The paper-table study as one command.

    .venv/bin/python experiments/paper_table/run.py --preset smoke [--seeds 0,1] [--out DIR] [overrides...]

1. trains backbone x head x seed with experiment=paper_table (one Hydra multirun),
2. evaluates every head=none checkpoint with head=densecrf (same weights, paired per image),
3. writes the report (table.md/.csv/.tex and figures) into <out>/report and prints the table.

Extra arguments are Hydra overrides passed to both training and evaluation
(e.g. logger=csv or trainer.max_epochs=2).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from segrefine.report import load_study, write_report

README = Path(__file__).with_name("README.md")
EVAL_KEYS = {"trainer", "logger", "paths", "hydra", "metrics", "save_predictions"}
TABLE_START, TABLE_END = "<!-- smoke-table:start -->", "<!-- smoke-table:end -->"


def hydra_run(module: str, args: list[str]) -> None:
    command = [sys.executable, "-m", module, *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def update_readme(table: str, seconds: float, command: str) -> None:
    text = README.read_text()
    block = f"{TABLE_START}\n_Produced by `{command}` in {seconds / 60:.1f} min._\n\n{table.strip()}\n{TABLE_END}"
    README.write_text(re.sub(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), lambda _: block, text, flags=re.S))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke", choices=["smoke", "full"])
    parser.add_argument("--backbones", default="fcn,unet,pspnet")
    parser.add_argument("--heads", default="none,crfrnn,pointrend", help="trained heads; densecrf is added post hoc")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default=f"outputs/paper_table/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    parser.add_argument("--update-readme", action="store_true", help="put the table into experiments/paper_table/README.md")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report of an existing --out study")
    parser.add_argument("--metrics", choices=["standard", "unet_crfrnn"], default=None,
                        help="metric protocol of the report's columns (default: the runs' own)")
    parser.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                        help="Hydra override for the densecrf evaluations only (repeatable), e.g. head.num_workers=1")
    args, overrides = parser.parse_known_args()
    # The evaluations rebuild data and backbone from each checkpoint; only run-level settings carry over.
    eval_overrides = [o for o in overrides if o.split("=", 1)[0].split(".")[0].lstrip("+~") in EVAL_KEYS]
    eval_overrides += args.eval_override
    if "none" not in args.heads.split(","):
        parser.error("--heads must include none: the densecrf rows and all paired tests need it")
    out = Path(args.out)
    if args.report_only:
        return report(out, args.update_readme, args.metrics)
    start = time.perf_counter()

    hydra_run("segrefine.train", [
        "-m", "experiment=paper_table", f"preset={args.preset}", f"backbone={args.backbones}",
        f"head={args.heads}", f"seed={args.seeds}", f"hydra.sweep.dir={out / 'train'}", *overrides,
    ])
    none_runs = [r["_path"] for r in load_study([out / "train"]).runs if r["head"] == "none"]
    if none_runs:
        checkpoints = ",".join(f"'{p}'" for p in none_runs)
        hydra_run("segrefine.evaluate", [
            "-m", f"ckpt_path={checkpoints}", "head=densecrf", f"hydra.sweep.dir={out / 'densecrf'}", *eval_overrides,
        ])
    seconds = time.perf_counter() - start
    command = " ".join(["python experiments/paper_table/run.py", *sys.argv[1:]])
    (out / "study.json").write_text(json.dumps({"command": command, "seconds": seconds}, indent=2))
    print(f"study trained and evaluated in {seconds / 60:.1f} min")
    return report(out, args.update_readme, args.metrics)


def report(out: Path, readme: bool, protocol: str | None = None) -> int:
    result = write_report(load_study([out / "train", out / "densecrf"]), out / "report", protocol=protocol)
    table = result.paths["markdown"].read_text()
    print(table)
    print(f"report in {out / 'report'}")
    if readme:
        study = json.loads((out / "study.json").read_text())
        update_readme(table, study["seconds"], study["command"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
