"""Report figures: metric means with across-seed CIs, paired Δ with their CIs, accuracy vs
cost, and a qualitative grid drawn from the predictions runs saved (``predictions.npz``).

Nothing here builds a model or reads a checkpoint: figures only read results.json contents
(passed in by ``segrefine.report``) and the saved arrays, loaded without pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure  # files only: no pyplot, no display backend
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

PREDICTION_KEYS = ("ids", "images", "masks", "predictions")
IGNORE = 255


def _t_interval(values: list[float]) -> tuple[float, float] | None:
    """Half-width of the 95 % t-interval of the mean over seeds; None for one seed."""
    from scipy.special import stdtrit  # Student t quantile, without importing scipy.stats

    if len(values) < 2:
        return None
    half = stdtrit(len(values) - 1, 0.975) * np.std(values, ddof=1) / np.sqrt(len(values))
    return float(half), float(half)


def _row_values(row: Any, column: Any) -> list[float] | None:
    """A row's value of ``column`` per seed (None if a seed lacks it); ``row.value`` is the
    report's reader, passed in so figures never import the report module."""
    values = [row.value(r, column) for r in row.runs.values()]
    return None if any(v is None for v in values) else values


def _labels(rows: list[Any]) -> list[str]:
    return [f"{r.label}\n{r.head}" for r in rows]


def plot_metrics(rows: list[Any], columns: tuple, path: Path) -> Path:
    """Top: each paired column's mean over seeds (error bar: 95 % t-interval across seeds).
    Bottom: Δ to the baseline with its hierarchical-bootstrap 95 % CI (none when n = 1)."""
    longest = max(len(line) for label in _labels(rows) for line in label.splitlines())
    fig = Figure(figsize=(max(4.5, 0.55 * len(rows)) * len(columns), 6.5 + 0.07 * longest))  # room for the labels
    axes = fig.subplots(2, len(columns), squeeze=False)
    x = np.arange(len(rows))
    single = any(len(r.runs) == 1 for r in rows)
    for i, column in enumerate(columns):
        top, bottom = axes[0][i], axes[1][i]
        means, errors = [], []
        for row in rows:
            values = _row_values(row, column)
            means.append(np.mean(values) * column.scale if values else np.nan)
            half = _t_interval(values) if values else None
            errors.append(half[0] * column.scale if half else np.nan)  # NaN: no error bar drawn (one seed)
        top.bar(x, means, 0.7, yerr=None if np.all(np.isnan(errors)) else errors, capsize=2,
                color=["0.6" if r.head == "none" else "C0" for r in rows])
        top.set_title(column.title)
        top.set_xticks(x, [""] * len(rows))
        deltas = [r.stats.get(column.key) for r in rows]
        for j, test in enumerate(deltas):
            if test is None:
                continue
            mean = test["mean"] * column.scale
            if test["level"] == "seeds":
                err = [[mean - test["ci_low"] * column.scale], [test["ci_high"] * column.scale - mean]]
                bottom.errorbar(j, mean, yerr=err, fmt="o", color="C1", capsize=3)
            else:
                bottom.plot(j, mean, "o", color="C1", mfc="white")  # one seed: no across-seed CI
        bottom.axhline(0, color="0.3", lw=0.8)
        bottom.set_title(f"Δ {column.title} vs none")
        bottom.set_xticks(x, _labels(rows), rotation=60, ha="right", fontsize="x-small")
    caption = ("Bars: mean over seeds, error bars 95 % t-interval across seeds. Δ: mean paired difference, "
               "error bars hierarchical-bootstrap 95 % CI across seeds.")
    if single:
        caption += " Rows with one seed have no error bar (open markers: no inference across seeds)."
    fig.text(0.01, 0.005, caption, fontsize="x-small", wrap=True)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    return path


def plot_cost(rows: list[Any], column: Any, cost: Any, path: Path) -> Path:
    """``column`` against inference ms/image (log axis, plain-number ticks); error bars are
    95 % t-intervals across seeds, none for rows with one seed."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    heads = sorted({r.head for r in rows}, key=lambda h: (h != "none", h))
    labels = sorted({r.label for r in rows})
    colours = dict(zip(heads, matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]))
    markers = dict(zip(labels, "osD^vP*Xh<>p"))
    single = False
    for row in rows:
        ms, score = _row_values(row, cost), _row_values(row, column)
        if not ms or not score:
            continue
        xerr, yerr = _t_interval(ms), _t_interval(score)
        single |= xerr is None
        ax.errorbar(np.mean(ms), np.mean(score) * column.scale,
                    xerr=None if xerr is None else [[xerr[0]], [xerr[1]]],
                    yerr=None if yerr is None else [[yerr[0] * column.scale], [yerr[1] * column.scale]],
                    fmt=markers.get(row.label, "o"), color=colours[row.head], capsize=2)
    for label, marker in markers.items():
        ax.plot([], [], marker, color="grey", label=label, linestyle="")
    for head, colour in colours.items():
        ax.plot([], [], "s", color=colour, label=head, linestyle="")
    ax.set_xscale("log")
    # Ticks at 1, 2, 5 x 10^k as plain numbers; no crowded minor labels.
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ms / image (backbone + head), log scale")
    ax.set_ylabel(column.title)
    ax.legend(fontsize="x-small", ncol=2)
    if single:
        ax.set_title("one seed: no error bars", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def load_predictions(run: dict[str, Any]) -> tuple[dict[str, tuple] | None, str]:
    """``{id: (image, mask, prediction)}`` from a run's predictions.npz, or (None, why)."""
    name = run.get("predictions")
    if not name:
        return None, "no saved predictions (run made with save_predictions=0 or before they were saved)"
    path = Path(run["_path"]) / name
    if Path(name).is_absolute() or ".." in Path(name).parts:
        return None, f"predictions path {name!r} is not a file of the run folder"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in PREDICTION_KEYS}
    except (OSError, ValueError, KeyError, EOFError) as e:
        return None, f"{name} missing or unreadable ({type(e).__name__}: {e})"
    except Exception as e:  # zipfile.BadZipFile and friends from a partial copy
        return None, f"{name} unreadable ({type(e).__name__}: {e})"
    count = len(arrays["ids"])
    if any(len(arrays[k]) != count for k in PREDICTION_KEYS) or arrays["masks"].shape != arrays["predictions"].shape:
        return None, f"{name} is inconsistent (arrays of different lengths or shapes)"
    ids = [str(i) for i in arrays["ids"]]
    return {i: (arrays["images"][k], arrays["masks"][k], arrays["predictions"][k]) for k, i in enumerate(ids)}, ""


def _num_classes(run: dict[str, Any], arrays: dict[str, tuple]) -> int:
    """From results.json (``num_classes``), the config, else the largest label seen."""
    value = run.get("num_classes") or (run["config"].get("data") or {}).get("num_classes")
    if isinstance(value, int) and value > 0:
        return value
    labels = [a[k][a[k] != IGNORE] for a in arrays.values() for k in (1, 2)]
    return int(max((x.max() for x in labels if x.size), default=0)) + 1


def plot_qualitative(rows: list[Any], column: Any, path: Path, count: int = 4) -> tuple[Path | None, list[tuple[str, str]]]:
    """Image, ground truth and each head's prediction for one configuration and seed, with
    errors outlined over the predicted classes; rows are the saved test images with the
    largest and smallest Δ of the best head, each labelled with every head's per-image Δ."""
    notes: list[tuple[str, str]] = []
    groups = [(b, [r for r in rows if r.baseline is b]) for b in rows if b.head == "none"]
    groups = sorted([(b, heads) for b, heads in groups if heads], key=lambda g: -len(g[1]))
    for base, heads in groups:
        for seed in base.seeds:
            members = [(base.head, base.runs[seed])] + [(h.head, h.runs[seed]) for h in heads if seed in h.runs]
            if len(members) < 2:
                continue
            loaded = {}
            for head, run in members:
                arrays, why = load_predictions(run)
                if arrays is None:
                    notes.append((run["_path"], why))
                else:
                    loaded[head] = (run, arrays)
            if base.head not in loaded or len(loaded) < 2:
                continue
            if not set.intersection(*(set(arrays) for _, arrays in loaded.values())):
                notes.append((base_run_path(loaded, base), "saved predictions of the paired runs share no image id"))
                continue
            return _draw_grid(base, seed, loaded, column, path, count), notes
    if not groups:
        notes.append(("qualitative.png", "not drawn: no head paired with a `none` baseline"))
    else:
        notes.append(("qualitative.png", "not drawn: no paired runs with readable saved predictions"))
    return None, notes


def error_outline(errors: np.ndarray) -> np.ndarray:
    """The rim of the error regions (error pixels with a correct 4-neighbour or on the image
    edge), so the class a head predicted stays visible inside them."""
    padded = np.pad(errors, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return errors & ~inner


def base_run_path(loaded: dict[str, tuple], base: Any) -> str:
    return loaded[base.head][0]["_path"]


def _draw_grid(base: Any, seed: Any, loaded: dict[str, tuple], column: Any, path: Path, count: int) -> Path:
    base_run, base_arrays = loaded[base.head]
    ids = sorted(set.intersection(*(set(a) for _, a in loaded.values())))
    value = {head: {r["id"]: r.get(column.per_image) for r in run.get("per_image", [])} for head, (run, _) in loaded.items()}
    others = [h for h in loaded if h != base.head]

    def delta(head: str, sample_id: str) -> float:
        a, b = value[head].get(sample_id), value[base.head].get(sample_id)
        return (a - b) * column.scale if isinstance(a, (int, float)) and isinstance(b, (int, float)) else float("nan")

    best = max(others, key=lambda h: np.nanmean([delta(h, i) for i in ids]) if ids else 0)
    ranked = sorted(ids, key=lambda i: (np.nan_to_num(delta(best, i), nan=0.0), i))
    half = max(count // 2, 1)
    chosen = list(dict.fromkeys(ranked[::-1][:half] + ranked[:half]))
    num_classes = _num_classes(base_run, base_arrays)
    cmap = matplotlib.colormaps["viridis"].resampled(max(num_classes, 2))
    heads = [base.head, *others]
    titles = ["image", "ground truth", *heads]
    fig = Figure(figsize=(2.3 * len(titles), 2.4 * len(chosen)))
    axes = fig.subplots(len(chosen), len(titles), squeeze=False)
    for r, sample_id in enumerate(chosen):
        image, mask, _ = base_arrays[sample_id]
        axes[r][0].imshow(image, cmap=None if image.ndim == 3 else "gray")
        label = "\n".join([sample_id, *(f"Δ{h} {delta(h, sample_id):+.1f}" for h in others)])
        axes[r][0].set_ylabel(label, fontsize="x-small")
        axes[r][1].imshow(np.where(mask == IGNORE, 0, mask), cmap=cmap, vmin=0, vmax=max(num_classes - 1, 1),
                          interpolation="nearest")
        for c, head in enumerate(heads, start=2):
            pred = loaded[head][1][sample_id][2]
            axes[r][c].imshow(pred, cmap=cmap, vmin=0, vmax=max(num_classes - 1, 1), interpolation="nearest")
            outline = error_outline((pred != mask) & (mask != IGNORE))
            overlay = np.zeros((*outline.shape, 4))
            overlay[outline] = (1.0, 0.0, 0.0, 1.0)
            axes[r][c].imshow(overlay, interpolation="nearest")
    for c, title in enumerate(titles):
        axes[0][c].set_title(title, fontsize="small")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{base.label} / seed {seed}: saved test images with the largest and smallest Δ of {best} "
                 f"({column.title}, per image, head minus none); red outlines = errors", fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def draw_all(rows: list[Any], columns: tuple, cost: Any, out_dir: Path, paths: dict[str, Path]) -> list[tuple[str, str]]:
    """Every figure that can be drawn (added to ``paths``); returns (where, why) for what could not."""
    notes: list[tuple[str, str]] = []
    if not rows:
        return [("figures", "no rows")]
    # Labels come from configs (data.name, ...): a "$" in one must print as a dollar, not start
    # mathtext (which fails on unbalanced or unknown TeX). The figures' own text uses none.
    with matplotlib.rc_context({"text.parse_math": False}):
        paths["metrics_figure"] = plot_metrics(rows, columns, out_dir / "metrics.png")
        paths["cost_figure"] = plot_cost(rows, columns[0], cost, out_dir / "cost.png")
        grid, grid_notes = plot_qualitative(rows, columns[0], out_dir / "qualitative.png")
    notes += grid_notes
    if grid is not None:
        paths["qualitative_figure"] = grid
    return notes
