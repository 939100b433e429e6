"""The paper-table study as one command.

    .venv/bin/python experiments/paper_table/run.py --preset smoke [--seeds 0,1] [--out DIR] [overrides...]

The plan (segrefine.study.study_plan; printed first, --plan-only stops there):
1. trains backbone x head x seed with experiment=paper_table, plus the matched baselines: a
   `none` run on any backbone a head changes (U-Net stops at stride 4 under PointRend), a `none`
   continuation beside each fine-tuned CRF-RNN, and `none + stride-4 skip` controls
   (backbone.fine_skip=true) beside PointRend on FCN/PSPNet;
2. tunes the DenseCRF of every `none` checkpoint on the validation split (Optuna) and evaluates
   it on test with the default and the tuned parameters (same weights, paired per image);
3. writes the report (table.md/.csv/.tex and figures) into <out>/report and prints the table.

Extra arguments are Hydra overrides for training (e.g. logger=csv or data=msd data.root=...);
the run-level ones (paths, logger, trainer, boundary_tolerance) also reach the evaluations.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from segrefine.report import load_study, write_report
from segrefine.study import is_volumetric, preset_defaults, run_study, study_args, study_plan

README = Path(__file__).with_name("README.md")
TABLE_START, TABLE_END = "<!-- smoke-table:start -->", "<!-- smoke-table:end -->"


def update_readme(table: str, seconds: float, command: str) -> None:
    text = README.read_text()
    block = f"{TABLE_START}\n_Produced by `{command}` in {seconds / 60:.1f} min._\n\n{table.strip()}\n{TABLE_END}"
    README.write_text(re.sub(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), lambda _: block, text, flags=re.S))


def main() -> int:
    parser = study_args(__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="fcn,unet,pspnet")
    parser.add_argument("--heads", default="none,crfrnn,pointrend", help="trained heads; densecrf is added post hoc")
    parser.add_argument("--fine-skip-controls", default="fcn,pspnet",
                        help="backbones that get a none + stride-4 skip control beside PointRend ('' = none)")
    parser.add_argument("--out", default=f"outputs/paper_table/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    parser.add_argument("--update-readme", action="store_true", help="put the table into experiments/paper_table/README.md")
    parser.add_argument("--metrics", choices=["standard", "unet_crfrnn"], default=None,
                        help="metric protocol of the report's columns (default: the runs' own)")
    args, overrides = parser.parse_known_args()
    preset_defaults(args)
    heads = [h for h in args.heads.split(",") if h]
    if "none" not in heads:
        parser.error("--heads must include none: the densecrf rows and all paired tests need it")
    backbones = [b for b in args.backbones.split(",") if b]
    out = Path(args.out)
    if args.report_only:
        return report(out, args.update_readme, args.metrics)
    plan = study_plan(
        experiment="paper_table", preset=args.preset, seeds=[int(s) for s in args.seeds.split(",")],
        backbones={b: (f"backbone={b}",) for b in backbones},
        heads={b: tuple(h for h in heads if h != "none") for b in backbones},
        densecrf=backbones, tune=args.tune_trials > 0, crfrnn_protocol=args.crfrnn_protocol,
        densecrf_3d=["unet"] if "unet" in backbones and is_volumetric(overrides) else [],
        finetune_epochs=args.finetune_epochs,
        fine_skip_controls=[b for b in args.fine_skip_controls.split(",") if b and "pointrend" in heads and b in backbones],
        overrides=overrides,
    )
    if not run_study(args, plan, out, overrides):
        return 0
    return report(out, args.update_readme, args.metrics)


def report(out: Path, readme: bool, protocol: str | None = None) -> int:
    result = write_report(load_study([out / "train", out / "eval"]), out / "report", protocol=protocol)
    table = result.paths["markdown"].read_text()
    print(table)
    print(f"report in {out / 'report'}")
    if readme:
        study = json.loads((out / "study.json").read_text())
        update_readme(table, study["seconds"], study["command"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
