"""The origin study's table as one command, our numbers beside the published ones.

    .venv/bin/python experiments/unet_crfrnn_table/run.py --preset smoke|full [--seeds 0,1,2] [--out DIR] [overrides...]
    .venv/bin/python experiments/unet_crfrnn_table/run.py --preset full data=msd data.root=/data/Task04_Hippocampus data.name=msd_hippocampus

Trains exactly the origin study's rows under experiment=unet_crfrnn_table (its schedule: batch 5,
80 epochs of 10 iterations, 320 px, Adam 1e-3 with poly decay 0.9 = preset=full; preset=smoke
for the CPU): FCN-8s, SegNet, U-Net, U-Net + offline CRF (post hoc, same weights), U-Net +
CRF-RNN, and CNN-CRF, which we read as the DeepLab recipe the origin text describes (FCN-8s +
offline DenseCRF on the same weights). The offline CRF is shown with its default parameters
and tuned on the validation split; CRF-RNN is fine-tuned from the trained U-Net (see
segrefine.study.study_plan). Then prints the published numbers beside ours and writes the
usual report into <out>/report.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from segrefine.report import load_study, write_report
from segrefine.study import is_volumetric, preset_defaults, run_study, study_args, study_plan

# The origin study's metric protocol (its IU, DSC and PA; the report issue's `metrics` group).
METRICS_OVERRIDES: tuple[str, ...] = ("metrics=unet_crfrnn",)
# Where results.json holds the origin protocol's test numbers (fractions in [0, 1]).
ORIGIN_KEYS = {"IU": "test/unet_crfrnn/iu", "DSC": "test/unet_crfrnn/dsc", "PA": "test/unet_crfrnn/pa"}
# Our standard numbers, shown (labelled) while the origin protocol is not available.
STANDARD_KEYS = {"IoU": "test/iou", "Dice": "test/dice", "pixel acc.": "test/pixel_acc"}

# Published, typed once (origin study, one seed; also in experiments/paper_table/README.md):
# model -> (IU, DSC, PA) in %, under the origin protocol.
PUBLISHED = {
    "FCN-8s": (59.61, 65.73, 44.26),
    "SegNet": (70.85, 79.01, 58.03),
    "Vanilla U-Net": (75.42, 83.49, 72.18),
    "U-Net + CRF (offline)": (78.00, 85.77, 79.05),
    "U-Net + CRF-RNN": (79.89, 87.31, 81.27),
    "CNN-CRF": (68.73, 73.22, 51.77),
}
# Our rows: (label, published row or None, job name without "-s<seed>").
ROWS = [
    ("FCN-8s", "FCN-8s", "fcn-none"),
    ("SegNet", "SegNet", "segnet-none"),
    ("Vanilla U-Net", "Vanilla U-Net", "unet-none"),
    ("U-Net + CRF (offline, default parameters)", "U-Net + CRF (offline)", "unet-densecrf"),
    ("U-Net + CRF (offline, tuned on val)", "U-Net + CRF (offline)", "unet-densecrf_tuned"),
    ("U-Net, none continued (CRF-RNN's baseline)", None, "unet-none-continued"),
    ("U-Net + CRF-RNN", "U-Net + CRF-RNN", "unet-crfrnn"),
    ("CNN-CRF, our reading: FCN-8s + offline DenseCRF (defaults)", "CNN-CRF", "fcn-densecrf"),
    ("CNN-CRF, our reading: FCN-8s + offline DenseCRF (tuned on val)", "CNN-CRF", "fcn-densecrf_tuned"),
]
BACKBONES = {"fcn": ("backbone=fcn", "backbone.variant=8s"), "segnet": ("backbone=segnet",), "unet": ("backbone=unet",)}


def plan_for(args, overrides: list[str], backbones: list[str]):
    unknown = set(backbones) - set(BACKBONES)
    if unknown:
        raise SystemExit(f"--backbones: {sorted(unknown)} are not rows of the origin table ({', '.join(BACKBONES)})")
    return study_plan(
        experiment="unet_crfrnn_table", preset=args.preset, seeds=[int(s) for s in args.seeds.split(",")],
        backbones={b: BACKBONES[b] for b in backbones},
        heads={"unet": ("crfrnn",)} if "unet" in backbones else {},
        densecrf=[b for b in ("fcn", "unet") if b in backbones], tune=args.tune_trials > 0,
        densecrf_3d=["unet"] if "unet" in backbones and is_volumetric(overrides) else [],
        crfrnn_protocol=args.crfrnn_protocol, finetune_epochs=args.finetune_epochs,
        overrides=overrides,
    )


def ours(out: Path, job: str, keys: dict[str, str]) -> tuple[list[str], int]:
    """Mean (± std across seeds) of each key over the seeds' results of ``job``, in %."""
    runs = [json.loads(p.read_text()) for p in sorted(out.glob(f"*/{job}-s*/results.json"))]
    runs = [r for r in runs if r.get("status") == "complete"]
    cells = []
    for key in keys.values():
        values = [100 * r["metrics"][key] for r in runs if key in r["metrics"]]
        if not values:
            cells.append("–")
        elif len(values) == 1:
            cells.append(f"{values[0]:.2f}")
        else:
            cells.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}")
    return cells, len(runs)


def origin_table(out: Path) -> str:
    origin = any((out / "train").glob("*/results.json")) and all(
        key in json.loads(p.read_text()).get("metrics", {})
        for p in (out / "train").glob("*/results.json") for key in ORIGIN_KEYS.values())
    keys = ORIGIN_KEYS if origin else STANDARD_KEYS
    protocol = "origin protocol (metrics=unet_crfrnn)" if origin else "segrefine's standard protocol, NOT the origin's"
    head = ["model", *(f"published {k}" for k in ORIGIN_KEYS), *(f"ours {k}" for k in keys), "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, published, job in ROWS:
        cells, n = ours(out, job, keys)
        if n == 0:
            continue
        pub = [f"{v:.2f}" for v in PUBLISHED[published]] if published else ["–"] * 3
        lines.append("| " + " | ".join([label, *pub, *cells, str(n)]) + " |")
    return "\n".join([
        *lines, "",
        f"Published: the origin study (one seed, its IU/DSC/PA protocol, its hippocampus MRI data). Ours: {protocol}, "
        "mean ± std across seeds, on this run's data. CNN-CRF is our reading of the origin text (FCN-8s + offline "
        "DenseCRF on the same weights).",
    ])


def main() -> int:
    parser = study_args(__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="fcn,segnet,unet", help="which of the origin rows' networks to train")
    parser.add_argument("--out", default=f"outputs/unet_crfrnn_table/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    args, overrides = parser.parse_known_args()
    # The origin protocol for every job: training, tuning and the post-hoc evaluations.
    overrides = [*METRICS_OVERRIDES, *overrides]
    preset_defaults(args)
    out = Path(args.out)
    if not args.report_only:
        plan = plan_for(args, overrides, [b for b in args.backbones.split(",") if b])
        if not run_study(args, plan, out, overrides):
            return 0
    write_report(load_study([out / "train", out / "eval"]), out / "report", protocol="unet_crfrnn")
    table = origin_table(out)
    (out / "report" / "origin_table.md").write_text(table + "\n")
    print(table)
    print(f"report in {out / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
