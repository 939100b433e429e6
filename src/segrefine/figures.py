"""Report figures: metrics with error bars, accuracy vs cost, a qualitative grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

HEAD_ORDER = ("none", "densecrf", "densecrf_tuned", "crfrnn", "pointrend")


def _heads(rows: list[dict[str, Any]]) -> list[str]:
    present = {r["head"] for r in rows}
    return [h for h in HEAD_ORDER if h in present] + sorted(present - set(HEAD_ORDER))


def plot_metrics(rows: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars (backbone x head) with ± std error bars, one panel per metric."""
    metrics = (("test/iou", "IoU"), ("test/dice", "Dice"), ("test/pixel_acc", "Pixel acc."), ("test/boundary_f1", "Boundary F1"))
    labels = sorted({(r["data"], r["backbone"]) for r in rows})
    heads = _heads(rows)
    by_key = {(r["data"], r["backbone"], r["head"]): r for r in rows}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6), squeeze=False)
    width = 0.8 / max(len(heads), 1)
    x = np.arange(len(labels))
    for ax, (metric, title) in zip(axes[0], metrics):
        for i, head in enumerate(heads):
            stats = [by_key.get((*label, head), {}).get(metric, (np.nan, np.nan)) for label in labels]
            means, stds = np.array([s[0] for s in stats]) * 100, np.array([s[1] for s in stats]) * 100
            ax.bar(x + (i - (len(heads) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=head)
        ax.set_xticks(x, [b if len({d for d, _ in labels}) == 1 else f"{d}\n{b}" for d, b in labels])
        ax.set_title(title)
        ax.set_ylabel("%")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cost(rows: list[dict[str, Any]], path: Path) -> Path:
    """Test IoU against inference ms/image, colour = head, marker = backbone."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    markers = dict(zip(sorted({r["backbone"] for r in rows}), "osD^vP*X"))
    colours = dict(zip(_heads(rows), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for r in rows:
        (ms, ms_std), (iou, iou_std) = r["test/ms_per_image"], r["test/iou"]
        ax.errorbar(ms, iou * 100, xerr=ms_std, yerr=iou_std * 100, fmt=markers[r["backbone"]],
                    color=colours.get(r["head"]), capsize=2)
    for backbone, marker in markers.items():
        ax.plot([], [], marker, color="grey", label=backbone, linestyle="")
    for head, colour in colours.items():
        ax.plot([], [], "s", color=colour, label=head, linestyle="")
    ax.set_xscale("log")
    ax.set_xlabel("ms / image (backbone + head)")
    ax.set_ylabel("test IoU %")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def predict(run: dict[str, Any], ids: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Re-run a finished run's checkpoint on some test images: ``{id: (image, mask, prediction)}``."""
    from omegaconf import OmegaConf, open_dict

    from segrefine.checkpoints import load_checkpoint, load_weights
    from segrefine.train import build_data, build_module

    cfg = OmegaConf.create(run["config"])
    if "num_workers" in cfg.head:
        with open_dict(cfg):
            cfg.head.num_workers = 1  # a few images: no worker pool
    ckpt = Path(run["_path"]) / run["checkpoint"]
    checkpoint = load_checkpoint(ckpt)
    datamodule = build_data(cfg)
    module = build_module(cfg, datamodule)
    train_head = checkpoint["hyper_parameters"]["config"]["head"]["_target_"]
    load_weights(module, checkpoint, ckpt, with_head=train_head == cfg.head._target_)
    module.eval()
    dataset = datamodule.datasets["test"]
    index = {sample_id: i for i, sample_id in enumerate(dataset.ids)}
    out = {}
    with torch.no_grad():
        for sample_id in ids:
            sample = dataset[index[sample_id]]
            pred = module(sample["image"][None]).argmax(1)[0]
            out[sample_id] = (sample["image"].numpy(), sample["mask"].numpy(), pred.numpy())
    return out


def _pick_images(runs: list[dict[str, Any]], count: int) -> tuple[list[dict], list[str]] | None:
    """Runs of one (data, backbone, seed) with several heads, and the test ids with the
    largest and smallest paired IoU difference of the best non-none head."""
    from segrefine.report import BASELINE_HEAD

    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if not r.get("checkpoint") or not r.get("per_image"):
            continue  # nothing to re-run (e.g. runs read from wandb)
        groups.setdefault((r["data"], r["backbone"], r["seed"]), []).append(r)
    candidates = [g for g in groups.values() if len(g) > 1 and any(r["head"] == BASELINE_HEAD for r in g)]
    if not candidates:
        return None
    group = max(candidates, key=len)
    base = next(r for r in group if r["head"] == BASELINE_HEAD)
    base_iou = {row["id"]: row["iou"] for row in base["per_image"]}
    others = [r for r in group if r["head"] != BASELINE_HEAD]
    best = max(others, key=lambda r: r["metrics"].get("test/iou") or 0)
    diffs = sorted((row["iou"] - base_iou[row["id"]], row["id"]) for row in best["per_image"] if row["id"] in base_iou)
    half = max(count // 2, 1)
    ids = [i for _, i in diffs[-half:][::-1]] + [i for _, i in diffs[:half] if i not in {j for _, j in diffs[-half:]}]
    order = {h: i for i, h in enumerate(HEAD_ORDER)}
    return sorted(group, key=lambda r: order.get(r["head"], len(order))), ids


def plot_qualitative(runs: list[dict[str, Any]], path: Path, count: int = 4) -> Path | None:
    """Image, ground truth and each head's prediction (errors in red) for the test images
    with the largest and smallest paired IoU difference; None if no paired runs exist."""
    picked = _pick_images(runs, count)
    if picked is None:
        return None
    group, ids = picked
    predictions = {r["head"]: predict(r, ids) for r in group}
    first = next(iter(predictions.values()))
    num_classes = int(group[0]["config"]["data"]["num_classes"])
    cmap = plt.get_cmap("viridis", num_classes)
    columns = ["image", "ground truth", *predictions]
    fig, axes = plt.subplots(len(ids), len(columns), figsize=(2.2 * len(columns), 2.2 * len(ids)), squeeze=False)
    for row, sample_id in enumerate(ids):
        image, mask, _ = first[sample_id]
        shown = image[0] if image.shape[0] != 3 else np.moveaxis(image, 0, -1)
        axes[row][0].imshow(shown, cmap="gray")
        axes[row][0].set_ylabel(sample_id, fontsize="small")
        axes[row][1].imshow(np.where(mask == 255, 0, mask), cmap=cmap, vmin=0, vmax=num_classes - 1)
        for col, head in enumerate(predictions, start=2):
            pred = predictions[head][sample_id][2]
            axes[row][col].imshow(pred, cmap=cmap, vmin=0, vmax=num_classes - 1)
            errors = (pred != mask) & (mask != 255)
            overlay = np.zeros((*errors.shape, 4))
            overlay[errors] = (1, 0, 0, 0.8)
            axes[row][col].imshow(overlay)
    for col, title in enumerate(columns):
        axes[0][col].set_title(title, fontsize="small")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    data, backbone, seed = group[0]["data"], group[0]["backbone"], group[0]["seed"]
    fig.suptitle(f"{data} / {backbone} / seed {seed}: largest and smallest paired IoU gains (errors in red)", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
