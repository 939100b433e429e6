"""The origin study's table as one command: as the origin ran it, controlled, and published.

    segrefine-study unet_crfrnn_table --preset smoke|full [--seeds 0,1,2] [--out DIR] [overrides...]
    segrefine-study unet_crfrnn_table --preset full data=msd data.root=/data/Task04_Hippocampus data.name=msd_hippocampus

Trains the origin study's rows under experiment=unet_crfrnn_table (its schedule: batch 5, 80
epochs of 10 iterations, 320 px, Adam 1e-3 x0.9 per epoch = preset=full; preset=smoke for the
CPU; its IU/DSC/PA with the foreground classes merged, as its binary masks) and prints three blocks:
(a) as the origin ran it: its networks (FCN-8s on VGG-16, SegNet, the vanilla U-Net, the
    64-wide CRF-U-Net with its CRF-RNN trained jointly from scratch for the same epochs), the
    offline DenseCRF on the U-Net's weights, and CNN-CRF read as FCN-8s + offline DenseCRF;
(b) controlled: CRF-RNN fine-tuned from the trained U-Net against a `none` continuation given
    the same extra epochs, and the offline CRF with default and validation-tuned parameters,
    each with its paired baseline;
(c) the published numbers.
--networks resnet18 runs segrefine's ResNet-18 U-Net and FCN-8s instead of the origin's.
The usual report (paired statistics, figures) goes to <out>/report.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

from segrefine.record import RunRecord, load
from segrefine.study.paper_table import preset_defaults, study_args, study_plan
from segrefine.study.plan import Job, is_volumetric, job_config
from segrefine.study.runner import run_study

# The origin study's metric protocol, binary foreground; also for the evaluations and tuning
# (their configs do not go through experiment=, so the run-level keys are passed explicitly).
METRICS_OVERRIDES: tuple[str, ...] = ("metrics=unet_crfrnn", "metrics.merge_foreground=true")
# The smoke preset at the origin's batch shape (batch 5, epochs of 10 iterations): minutes on a CPU.
SMOKE_OVERRIDES: tuple[str, ...] = ("data.batch_size=5", "++trainer.limit_train_batches=10")
# Where results.json holds the origin protocol's test numbers (fractions in [0, 1]).
ORIGIN_KEYS = {"IU": "test/unet_crfrnn/iu", "DSC": "test/unet_crfrnn/dsc", "PA": "test/unet_crfrnn/pa"}
# Our standard numbers, shown (labelled) for runs made without the origin protocol.
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
# The networks of each row: the origin's (default) or segrefine's ResNet-18 ones (--networks).
NETWORKS = {
    "origin": {
        "fcn": ("backbone=fcn", "backbone.variant=8s", "backbone.encoder_name=vgg16"),
        "segnet": ("backbone=segnet",),
        "unet": ("backbone=unet", "backbone.variant=vanilla"),
        "crfunet": ("backbone=unet", "backbone.variant=vanilla", "backbone.base_width=64"),
    },
    "resnet18": {
        "fcn": ("backbone=fcn", "backbone.variant=8s"),
        "segnet": ("backbone=segnet",),
        "unet": ("backbone=unet",),
        "crfunet": ("backbone=unet",),
    },
}
# The origin's CrfRnnLayer (Models/CRFunet.py): theta_alpha 160, theta_beta 3, theta_gamma 3,
# 10 iterations in training and test, C x C kernel weights initialised I (parametrisation zheng).
# Its bilateral kernel saw the network input scaled to [-1, 1]; theta_beta 3 there is
# 3 * 255 / 2 = 382.5 on the 0-255 scale the head maps each image to.
ORIGIN_CRFRNN = ("head=crfrnn", "head.parametrisation=zheng", "head.iterations=10", "head.eval_iterations=10",
                 "head.bilateral_sxy=160", "head.bilateral_schan=382.5", "head.gaussian_sxy=3",
                 "head.gaussian_compat=1", "head.bilateral_compat=1")

# The blocks: (label, published row or None, job name without "-s<seed>", Δ against job or None).
BLOCK_A = [
    ("FCN-8s", "FCN-8s", "fcn-none", None),
    ("SegNet", "SegNet", "segnet-none", None),
    ("Vanilla U-Net", "Vanilla U-Net", "unet-none", None),
    ("U-Net + CRF (offline, default parameters)", "U-Net + CRF (offline)", "unet-densecrf", None),
    ("CRF-U-Net + CRF-RNN, trained jointly from scratch", "U-Net + CRF-RNN", "crfunet-crfrnn", None),
    ("CNN-CRF, our reading: FCN-8s + offline DenseCRF (defaults)", "CNN-CRF", "fcn-densecrf", None),
]
BLOCK_B = [
    ("U-Net + CRF (offline, default parameters), same weights", None, "unet-densecrf", "unet-none"),
    ("U-Net + CRF (offline, tuned on val), same weights", None, "unet-densecrf_tuned", "unet-none"),
    ("U-Net, none continued (CRF-RNN's baseline)", None, "unet-none-continued", None),
    ("U-Net + CRF-RNN fine-tuned from the U-Net", None, "unet-crfrnn", "unet-none-continued"),
    ("FCN-8s + offline DenseCRF (tuned on val), same weights", None, "fcn-densecrf_tuned", "fcn-none"),
]
ROWS = BLOCK_A + BLOCK_B

# --plan-only's GPU time is an extrapolation from these assumptions, not a measurement: no GPU
# has run this study yet. Per image at 320 px on one current data-centre GPU.
ASSUMED_MS = {"train": 6.0, "train_crfrnn": 30.0, "eval": 3.0, "eval_densecrf": 100.0}
ASSUMED_JOB_OVERHEAD_S = 30.0  # process-level start, data loading, checkpoints per job


def plan_for(args, overrides: list[str], backbones: list[str], networks: str = "origin"):
    known = ("fcn", "segnet", "unet")
    unknown = set(backbones) - set(known)
    if unknown:
        raise SystemExit(f"--backbones: {sorted(unknown)} are not rows of the origin table ({', '.join(known)})")
    nets = NETWORKS[networks]
    seeds = [int(s) for s in str(args.seeds).split(",")]
    plan = study_plan(
        experiment="unet_crfrnn_table", preset=args.preset, seeds=seeds,
        backbones={b: nets[b] for b in backbones},
        heads={"unet": ("crfrnn",)} if "unet" in backbones else {},
        densecrf=[b for b in ("fcn", "unet") if b in backbones], tune=args.tune_trials > 0,
        densecrf_3d=["unet"] if "unet" in backbones and is_volumetric(overrides) else [],
        crfrnn_protocol=args.crfrnn_protocol, finetune_epochs=args.finetune_epochs,
        overrides=overrides,
    )
    if "unet" in backbones:
        # Block (a)'s CRF-U-Net: the origin trained it jointly from scratch, as long as the U-Net.
        # With the origin's networks it is wider than the vanilla U-Net, so no none run pairs with it.
        same_net = nets["crfunet"] == nets["unet"]
        for seed in seeds:
            plan.add(Job(f"crfunet-crfrnn-s{seed}", "train",
                         ("experiment=unet_crfrnn_table", f"preset={args.preset}", *overrides, *nets["crfunet"],
                          f"seed={seed}", *ORIGIN_CRFRNN), seed,
                         pairs_with=f"unet-none-s{seed}" if same_net else None,
                         label="CRF-U-Net + CRF-RNN (the origin's, joint from scratch)"))
    return plan


def block_of(job: Job) -> str:
    base = job.name.rsplit("-s", 1)[0]
    in_a = any(base == j for _, _, j, _ in BLOCK_A)
    in_b = any(base == j for _, _, j, _ in BLOCK_B)
    if job.kind == "tune":
        return "(b)"
    return "(a)+(b)" if in_a and in_b else "(a)" if in_a else "(b)" if in_b else "(a)/(b) baseline"


def describe_blocks(plan) -> str:
    """The plan with the block each job serves, and block (c) (nothing to run)."""
    lines = ["| block | job | kind | seed | Δ against |", "|---|---|---|---|---|"]
    lines += [f"| {block_of(j)} | {j.name} | {j.kind} | {j.seed} | {j.pairs_with or '–'} |" for j in plan.jobs]
    lines.append(f"| (c) | published: {', '.join(PUBLISHED)} | – | one seed | – |")
    return "\n".join(lines)


def extrapolated_gpu_minutes(plan, out: Path, tune_trials: int) -> tuple[float, str]:
    """GPU minutes of the plan from the work its composed configs ask for and ``ASSUMED_MS``."""
    from segrefine.tuning import example_tuned_file

    example = example_tuned_file(out / "plan")
    seconds, images = 0.0, {"train": 0, "eval": 0}
    for job in plan.jobs:
        if job.kind == "tune":
            source = job_config(plan.get("train", job.source), plan, out, lambda _: example)
            val = int(source["data"].get("num_val") or 50)
            seconds += ASSUMED_JOB_OVERHEAD_S + val * ASSUMED_MS["eval_densecrf"] / 1000 * tune_trials
            continue
        config = job_config(job, plan, out, lambda _: example)
        data, trainer, head = config["data"], config["trainer"], config["head"]["name"]
        size = (data.get("image_size") or 320) ** 2 / 320**2
        if job.kind == "train":
            batches = math.ceil(int(data.get("num_train") or 400) / data["batch_size"])
            steps = trainer["max_epochs"] * min(batches, trainer.get("limit_train_batches") or batches)
            n = steps * data["batch_size"]
            val = trainer["max_epochs"] * int(data.get("num_val") or 50) + int(data.get("num_test") or 100)
            per = ASSUMED_MS["train_crfrnn" if head == "crfrnn" else "train"]
            seconds += n * per * size / 1000 + val * ASSUMED_MS["eval"] * size / 1000
            images["train"] += n
        else:
            n = int(data.get("num_test") or 100)
            seconds += n * ASSUMED_MS["eval_densecrf" if head == "densecrf" else "eval"] * size / 1000
            images["eval"] += n
        seconds += ASSUMED_JOB_OVERHEAD_S
    words = (f"EXTRAPOLATION, not a measurement (no GPU has run this study): {images['train']} training images, "
             f"{images['eval']} post-hoc test images; assumed per image at 320 px {ASSUMED_MS['train']:.0f} ms to train "
             f"({ASSUMED_MS['train_crfrnn']:.0f} ms with CRF-RNN), {ASSUMED_MS['eval']:.0f} ms to test, "
             f"{ASSUMED_MS['eval_densecrf']:.0f} ms per offline DenseCRF (CPU), {ASSUMED_JOB_OVERHEAD_S:.0f} s per job")
    return seconds / 60, words


def plan_summary(args, overrides: list[str]) -> str:
    """The full preset's job count and extrapolated GPU time (whatever preset was asked)."""
    import argparse
    import tempfile

    full = argparse.Namespace(**{**vars(args), "preset": "full", "tune_trials": None, "finetune_epochs": None})
    preset_defaults(full)
    if args.preset == "full":
        full.tune_trials, full.finetune_epochs = args.tune_trials, args.finetune_epochs
    full_overrides = [o for o in overrides if o not in SMOKE_OVERRIDES]
    plan = plan_for(full, full_overrides, [b for b in args.backbones.split(",") if b], args.networks)
    counts = ", ".join(f"{kind} {len(plan.of(kind))}" for kind in ("train", "tune", "eval"))
    with tempfile.TemporaryDirectory() as scratch:
        minutes, words = extrapolated_gpu_minutes(plan, Path(scratch), full.tune_trials)
    return (f"preset=full: {len(plan.jobs)} jobs ({counts}) for seeds {args.seeds}; extrapolated GPU time "
            f"≈ {minutes:.0f} min on one GPU. {words}")


def ours(out: Path, job: str, keys: dict[str, str]) -> tuple[list[str], int, dict[int, dict[str, float]]]:
    """Mean (± std across seeds) of each key over the seeds' results of ``job``, in %; the seeds' values."""
    runs = {}
    for path in sorted(out.glob(f"*/{job}-s*/results.json")):
        record = load(path)
        seed = path.parent.name.rsplit("-s", 1)[1]
        if record.complete and seed.isdigit():
            runs[int(seed)] = {k: 100 * record.metrics[k] for k in keys.values() if k in record.metrics}
    cells = []
    for key in keys.values():
        values = [r[key] for r in runs.values() if key in r]
        if not values:
            cells.append("–")
        elif len(values) == 1:
            cells.append(f"{values[0]:.2f}")
        else:
            cells.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}")
    return cells, len(runs), runs


def delta(mine: dict[int, dict[str, float]], base: dict[int, dict[str, float]], key: str) -> str:
    """Mean over the seeds both have of (row - baseline), in points (the report gives its CI and p)."""
    diffs = [mine[s][key] - base[s][key] for s in sorted(set(mine) & set(base)) if key in mine[s] and key in base[s]]
    return f"{statistics.mean(diffs):+.2f}" if diffs else "–"


def _records(out: Path) -> list[RunRecord]:
    """The complete runs of the study (``location``: the job's folder, named for the job)."""
    records = [load(path) for path in sorted([*out.glob("train/*/results.json"), *out.glob("eval/*/results.json")])]
    return [record for record in records if record.complete]


def network(config: dict) -> str | None:
    """A backbone in words from its config: ``unet vanilla width 32``, ``fcn 8s vgg16``, ..."""
    backbone = config.get("backbone") or {}
    if not backbone.get("name"):
        return None
    width = backbone.get("base_width") or (32 if backbone.get("variant") == "vanilla" else None)
    encoder = backbone.get("encoder_name") or ("resnet18" if backbone.get("variant") == "smp" else None)
    parts = [backbone["name"], backbone.get("variant"), encoder, f"width {width}" if width else None]
    return " ".join(str(p) for p in parts if p)


def footnote(out: Path, records: list[RunRecord]) -> str:
    """What the numbers are: preset, data, epochs, networks, seeds, from the runs themselves."""
    study = json.loads((out / "origin_study.json").read_text()) if (out / "origin_study.json").is_file() else {}
    configs = [r.config or {} for r in records]

    def values(get) -> str:
        found = sorted({str(v) for v in (get(c) for c in configs) if v is not None})
        return ", ".join(found) if found else "?"

    data = values(lambda c: (c.get("data") or {}).get("name"))
    size = values(lambda c: (c.get("data") or {}).get("image_size") or (c.get("data") or {}).get("pad_to") or "native")
    classes = ", ".join(sorted({str(r.num_classes) for r in records if r.num_classes})) or "?"
    merged = values(lambda c: (c.get("metrics") or {}).get("merge_foreground"))
    epochs = values(lambda c: (c.get("trainer") or {}).get("max_epochs") if not c.get("init_from") else None)
    more = values(lambda c: (c.get("trainer") or {}).get("max_epochs") if c.get("init_from") else None)
    batches = values(lambda c: (c.get("trainer") or {}).get("limit_train_batches"))
    batch = values(lambda c: (c.get("data") or {}).get("batch_size"))
    seeds = values(lambda c: c.get("seed"))
    return (
        f"preset {study.get('preset', '?')}; data {data}, image size {size}, {classes} classes, foreground "
        f"merged: {merged}; {epochs} epochs from scratch (fine-tuning/continuations: {more} more) of at most {batches} "
        f"batches of {batch}; networks ({study.get('networks', '?')}): {values(network)}; "
        f"seeds {seeds}. Cells are mean ± std across seeds (one seed: the value). "
        "Published: the origin study, one seed, its own hippocampus MRI data (binary), 320 px, 80 epochs."
    )


def block_b(out: Path) -> list[tuple[str, str | None, str, str | None]]:
    """Block (b) as the study ran it: with --crfrnn-protocol scratch its CRF-RNN row was trained
    jointly from the start against the U-Net itself, and there is no continuation."""
    study = json.loads((out / "origin_study.json").read_text()) if (out / "origin_study.json").is_file() else {}
    if study.get("crfrnn_protocol") != "scratch":
        return BLOCK_B
    rows = [row for row in BLOCK_B if row[2] != "unet-none-continued"]
    return [("U-Net + CRF-RNN trained jointly from scratch (--crfrnn-protocol scratch)", None, job, "unet-none")
            if job == "unet-crfrnn" else (label, published, job, against) for label, published, job, against in rows]


def origin_table(out: Path) -> str:
    records = _records(out)
    trained = [r for r in records if (out / "train" / Path(r.location).name).is_dir()]
    origin = bool(trained) and all(key in (r.metrics or {}) for r in trained for key in ORIGIN_KEYS.values())
    keys = ORIGIN_KEYS if origin else STANDARD_KEYS
    protocol = ("origin protocol (metrics=unet_crfrnn)" if origin
                else "segrefine's standard protocol, NOT the origin's: not comparable with block (c)")
    names = list(keys)
    lines = []

    def block(title: str, rows, with_delta: bool) -> None:
        head = ["model", *(f"ours {k}" for k in names), "seeds"]
        head += [f"Δ {names[0]}", "Δ against"] if with_delta else ["published row (c)"]
        body = []
        for label, published, job, against in rows:
            cells, n, runs = ours(out, job, keys)
            if n == 0:
                continue
            row = [label, *cells, str(n)]
            if with_delta:
                base = ours(out, against, keys)[2] if against else {}
                row += [delta(runs, base, keys[names[0]]) if against else "–", against or "–"]
            else:
                row.append(published or "–")
            body.append("| " + " | ".join(row) + " |")
        if body:
            lines.extend([title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *body, ""])

    block("**(a) As the origin ran it**: its networks, schedule and binary protocol; CRF-U-Net trained "
          "jointly from scratch for the U-Net's epochs", BLOCK_A, with_delta=False)
    block("**(b) Controlled**: each head against its paired baseline (same weights, or a `none` "
          "continuation given the same extra epochs); CIs and p-values in report/table.md", block_b(out), with_delta=True)
    lines += ["**(c) Published** (the origin study)", "", "| model | IU | DSC | PA |", "|---|---|---|---|"]
    lines += [f"| {model} | " + " | ".join(f"{v:.2f}" for v in values) + " |" for model, values in PUBLISHED.items()]
    lines += ["", f"Ours: {protocol}; " + footnote(out, records),
              "CNN-CRF is our reading of the origin text (FCN-8s + offline DenseCRF on the same weights)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None, command: str | None = None) -> int:
    parser = study_args(__doc__.splitlines()[0], prog)
    parser.add_argument("--backbones", default="fcn,segnet,unet", help="which of the origin rows' networks to train")
    parser.add_argument("--networks", default="origin", choices=list(NETWORKS),
                        help="origin: the origin's networks (default); resnet18: segrefine's ResNet-18 U-Net and FCN-8s")
    parser.add_argument("--out", default=f"outputs/unet_crfrnn_table/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    args, overrides = parser.parse_known_args(argv)
    args.command = command  # study.json's record; None: this process's command line
    overrides = [*METRICS_OVERRIDES, *(SMOKE_OVERRIDES if args.preset == "smoke" else ()), *overrides]
    preset_defaults(args)
    out = Path(args.out)
    if not args.report_only:
        plan = plan_for(args, overrides, [b for b in args.backbones.split(",") if b], args.networks)
        print(describe_blocks(plan))
        if args.plan_only:
            print(plan_summary(args, overrides))
        else:
            out.mkdir(parents=True, exist_ok=True)
            (out / "origin_study.json").write_text(json.dumps(
                {"preset": args.preset, "networks": args.networks, "crfrnn_protocol": args.crfrnn_protocol}))
        if not run_study(args, plan, out, overrides):
            return 0
    from segrefine.report import load_study, write_report

    write_report(load_study([out / "train", out / "eval"]), out / "report", protocol="unet_crfrnn")
    table = origin_table(out)
    (out / "report" / "origin_table.md").write_text(table + "\n")
    print(table)
    print(f"report in {out / 'report'}")
    return 0
