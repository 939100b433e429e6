"""The paper-table study as one command.

    segrefine-study paper_table --preset smoke [--seeds 0,1] [--out DIR] [overrides...]

The plan (``study_plan``, the one general plan module that names heads; printed first,
--plan-only stops there):
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

import argparse
import json
import re
import time
from pathlib import Path
from typing import Iterable

from segrefine.study.plan import Job, Plan, _backbone, changed_backbone, is_volumetric
from segrefine.study.runner import run_study

# Per preset: Optuna trials of the DenseCRF tuning, and CRF-RNN fine-tuning epochs.
TUNE_TRIALS = {"smoke": 8, "full": 40}
FINETUNE_EPOCHS = {"smoke": 4, "full": 40}
CRFRNN_PROTOCOLS = ("finetune", "scratch")


def study_args(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The options both studies share."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--preset", default="smoke", choices=["smoke", "full"])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--crfrnn-protocol", default="finetune", choices=CRFRNN_PROTOCOLS,
                        help="finetune: from the trained none checkpoint, against a none continuation (Zheng et al.); "
                             "scratch: trained jointly from the start, against the none run")
    parser.add_argument("--finetune-epochs", type=int, help="CRF-RNN fine-tuning epochs (default: 4 smoke, 40 full)")
    parser.add_argument("--tune-trials", type=int, help="DenseCRF tuning trials on val (default: 8 smoke, 40 full; 0 = no tuning)")
    parser.add_argument("--plan-only", action="store_true", help="print the jobs and their pairings, run nothing")
    parser.add_argument("--verbose", action="store_true", help="every library's console output (Lightning banners, wandb, ...)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report of an existing --out study")
    parser.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                        help="Hydra override for the evaluations and tuning only (repeatable), e.g. head.num_workers=1")
    return parser


def preset_defaults(args) -> None:
    """Fill the per-preset defaults of --tune-trials and --finetune-epochs."""
    if args.tune_trials is None:
        args.tune_trials = TUNE_TRIALS[args.preset]
    if args.finetune_epochs is None:
        args.finetune_epochs = FINETUNE_EPOCHS[args.preset]



def study_plan(
    *,
    experiment: str,
    preset: str,
    seeds: Iterable[int],
    backbones: dict[str, tuple[str, ...]],
    heads: dict[str, tuple[str, ...]],
    densecrf: Iterable[str] = (),
    densecrf_3d: Iterable[str] = (),
    tune: bool = True,
    crfrnn_protocol: str = "finetune",
    finetune_epochs: int | None = None,
    fine_skip_controls: Iterable[str] = (),
    overrides: Iterable[str] = (),
) -> Plan:
    """The jobs of a backbone x head x seed study.

    ``backbones``: job-name prefix -> backbone overrides (e.g. ``{"fcn": ("backbone=fcn",)}``);
    ``heads``: prefix -> trained heads besides ``none``; ``densecrf``: prefixes whose ``none``
    checkpoints get the offline DenseCRF (defaults, and tuned on validation when ``tune``);
    ``densecrf_3d``: prefixes whose ``none`` checkpoints get the 3-D CRF per subject volume
    (``head.volume=true``, rows ``densecrf_3d`` and ``densecrf_3d_tuned``; volumetric data only);
    ``fine_skip_controls``: prefixes trained with ``none`` on ``backbone.fine_skip=true`` beside
    their PointRend (the same stride-4 features fused densely).

    Pairing: a head whose config changes the backbone (U-Net under PointRend stops at stride 4)
    gets a ``none`` run on exactly that backbone; CRF-RNN fine-tuned from the ``none`` checkpoint
    (``crfrnn_protocol=finetune``, Zheng et al.) pairs with a ``none`` continuation given the
    same ``finetune_epochs`` from the same checkpoint; ``scratch`` trains it jointly from the
    start and pairs it with the ``none`` run.
    """
    if crfrnn_protocol not in CRFRNN_PROTOCOLS:
        raise ValueError(f"crfrnn protocol {crfrnn_protocol!r} must be one of {CRFRNN_PROTOCOLS}")
    if crfrnn_protocol == "finetune" and any("crfrnn" in h for h in heads.values()) and not finetune_epochs:
        raise ValueError("the finetune CRF-RNN protocol needs finetune_epochs > 0")
    densecrf, densecrf_3d, controls = set(densecrf), set(densecrf_3d), set(fine_skip_controls)
    unknown = (densecrf | densecrf_3d | controls | set(heads)) - set(backbones)
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not backbones of this study ({sorted(backbones)})")
    from segrefine.labels import HEAD_WORDS, backbone_words

    plan = Plan()
    base = (f"experiment={experiment}", f"preset={preset}", *overrides)
    # Labels name rows, not jobs: the same for every seed, at most 60 characters.
    words = {prefix: backbone_words(_backbone((*base, *backbone, "head=none")), "none")
             for prefix, backbone in backbones.items()}
    for seed in seeds:
        for prefix, backbone in backbones.items():
            common = (*base, *backbone, f"seed={seed}")
            name = words[prefix]
            none = plan.add(Job(f"{prefix}-none-s{seed}", "train", (*common, "head=none"), seed, label=name))
            tuned = None
            if prefix in densecrf:
                plan.add(Job(f"{prefix}-densecrf-s{seed}", "eval", ("head=densecrf",), seed, source=none.name,
                             pairs_with=none.name, label=f"{name} + DenseCRF (defaults)"))
                if tune:
                    tuned = plan.add(Job(none.name, "tune", (), seed, source=none.name,
                                         label=f"DenseCRF parameters of {none.name} on val"))
                    plan.add(Job(f"{prefix}-densecrf_tuned-s{seed}", "eval", ("head=densecrf",), seed,
                                 source=none.name, tuned_from=tuned.name, tuned_name="densecrf_tuned", pairs_with=none.name,
                                 label=f"{name} + DenseCRF (tuned on val)"))
            if prefix in densecrf_3d:
                volume = ("head=densecrf", "head.volume=true", "head.name=densecrf_3d")
                plan.add(Job(f"{prefix}-densecrf_3d-s{seed}", "eval", volume, seed, source=none.name,
                             pairs_with=none.name, label=f"{name} + 3-D DenseCRF (defaults)"))
                if tune:
                    tuned_3d = plan.add(Job(f"{prefix}-none-3d-s{seed}", "tune", ("head.volume=true",), seed, source=none.name,
                                            label=f"3-D DenseCRF parameters of {none.name}, val subjects"))
                    plan.add(Job(f"{prefix}-densecrf_3d_tuned-s{seed}", "eval", volume, seed, source=none.name,
                                 tuned_from=tuned_3d.name, tuned_name="densecrf_3d_tuned", pairs_with=none.name,
                                 label=f"{name} + 3-D DenseCRF (tuned on val subjects)"))
            for head in heads.get(prefix, ()):
                trained = (*common, f"head={head}")
                if head == "crfrnn" and crfrnn_protocol == "finetune":
                    more = (f"trainer.max_epochs={finetune_epochs}",)
                    cont = plan.add(Job(f"{prefix}-none-continued-s{seed}", "train", (*common, "head=none", *more), seed,
                                        source=none.name, label=f"{name}, none +{finetune_epochs} ep (CRF-RNN's baseline)"))
                    plan.add(Job(f"{prefix}-crfrnn-s{seed}", "train", (*trained, *more), seed, source=none.name,
                                 tuned_from=tuned.name if tuned else None, pairs_with=cont.name,
                                 label=f"{name} + CRF-RNN (fine-tuned +{finetune_epochs} ep"
                                       + (", tuned init)" if tuned else ")")))
                    continue
                # (the seed does not change a backbone: composed once for all seeds)
                matched = changed_backbone([*base, *backbone, "head=none"], [*base, *backbone, f"head={head}"])
                baseline = none
                if matched:
                    job_name = f"{prefix}-none-{'-'.join(m.split('.', 1)[1].replace('=', '') for m in matched)}-s{seed}"
                    matched_words = backbone_words(_backbone((*base, *backbone, "head=none", *matched)), "none")
                    baseline = plan.get("train", job_name) or plan.add(Job(
                        job_name, "train", (*common, "head=none", *matched), seed,
                        label=f"{matched_words} ({HEAD_WORDS.get(head, head)}'s baseline)"))
                protocol = " (from scratch)" if head == "crfrnn" else ""
                plan.add(Job(f"{prefix}-{head}-s{seed}", "train", trained, seed, pairs_with=baseline.name,
                             label=f"{name} + {HEAD_WORDS.get(head, head)}{protocol}"))
                if head == "pointrend" and prefix in controls:
                    plan.add(Job(f"{prefix}-none-fine_skip-s{seed}", "train",
                                 (*common, "head=none", "backbone.fine_skip=true"), seed,
                                 label=f"{name} + stride-4 skip ({HEAD_WORDS.get(head, head)}'s control)"))
    return plan


# --update-readme: the README of the repository checkout the command runs in.
README = Path("experiments", "paper_table", "README.md")
TABLE_START, TABLE_END = "<!-- smoke-table:start -->", "<!-- smoke-table:end -->"


def update_readme(table: str, seconds: float, command: str) -> None:
    if not README.is_file():
        raise SystemExit(f"--update-readme: no {README} here; run it from the repository's root")
    text = README.read_text()
    block = f"{TABLE_START}\n_Produced by `{command}` in {seconds / 60:.1f} min._\n\n{table.strip()}\n{TABLE_END}"
    README.write_text(re.sub(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), lambda _: block, text, flags=re.S))


def main(argv: list[str] | None = None, prog: str | None = None, command: str | None = None) -> int:
    parser = study_args(__doc__.splitlines()[0], prog)
    parser.add_argument("--backbones", default="fcn,unet,pspnet")
    parser.add_argument("--heads", default="none,crfrnn,pointrend", help="trained heads; densecrf is added post hoc")
    parser.add_argument("--fine-skip-controls", default="fcn,pspnet",
                        help="backbones that get a none + stride-4 skip control beside PointRend ('' = none)")
    parser.add_argument("--out", default=f"outputs/paper_table/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    parser.add_argument("--update-readme", action="store_true", help="put the table into experiments/paper_table/README.md")
    parser.add_argument("--metrics", choices=["standard", "unet_crfrnn"], default=None,
                        help="metric protocol of the report's columns (default: the runs' own)")
    args, overrides = parser.parse_known_args(argv)
    args.command = command  # study.json's record; None: this process's command line
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
    from segrefine.report import load_study, write_report

    result = write_report(load_study([out / "train", out / "eval"]), out / "report", protocol=protocol)
    table = result.paths["markdown"].read_text()
    print(table)
    print(f"report in {out / 'report'}")
    if readme:
        study = json.loads((out / "study.json").read_text())
        update_readme(table, study["seconds"], study["command"])
    return 0
