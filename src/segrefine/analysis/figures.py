"""Report figures: a forest plot of every paired Δ with its interval, the headline metric per
configuration, accuracy against cost with its Pareto front, and a qualitative grid drawn from
the predictions runs saved (``predictions.npz``).

Nothing here builds a model or reads a checkpoint: figures only read the rows' run records
(passed in by ``segrefine.analysis.render``) and the saved arrays, loaded without pickle. Labels come
from configs, so they are drawn as plain text (no mathtext: a ``$`` in a label stays a ``$``).
Every figure grows with its rows and keeps its text inside (tests/analysis/test_figures.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure  # files only: no pyplot, no display backend
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from segrefine.analysis.rows import head_words, run_value
from segrefine.analysis.stats import t_quantile
from segrefine.record.protocols import IGNORE_INDEX as IGNORE
from segrefine.record.run_record import RunRecord

PREDICTION_KEYS = ("ids", "images", "masks", "predictions")
PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}
ROW_INCHES = 0.26  # height per table row in the row-wise figures
HEAD_COLOURS = {"none": "0.55", "densecrf": "C0", "densecrf_tuned": "C9", "crfrnn": "C3", "pointrend": "C2"}


def _head_colour(head: str, others: list[str]) -> str:
    if head in HEAD_COLOURS:
        return HEAD_COLOURS[head]
    return f"C{4 + others.index(head) % 5}" if head in others else "C4"


def _t_half_width(values: list[float]) -> float | None:
    """Half-width of the 95 % t-interval of the mean over seeds; None for one seed."""
    if len(values) < 2:
        return None
    return float(t_quantile(len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)))


def _row_values(row: Any, column: Any) -> list[float] | None:
    """A row's value of ``column`` per seed (None if a seed lacks it), as the table reads it."""
    values = [run_value(r, column) for r in row.runs.values()]
    return None if any(v is None for v in values) else values


def _row_name(row: Any) -> str:
    """The row's label, with its head unless the label already names it (study labels do)."""
    if row.head == "none":
        return f"{row.label} · none (baseline)" if "none" not in row.label else row.label
    words = head_words(row.head).split(",")[0]
    return row.label if words.lower() in row.label.lower() else f"{row.label} · {row.head}"


def _label_inches(labels: list[str], fontsize: float = 8.0) -> float:
    """Room for the longest label at ``fontsize`` points (a generous average glyph width)."""
    return 0.3 + max((len(s) for s in labels), default=0) * fontsize * 0.56 / 72


def _legend_below(fig: Figure, handles: list, ncol: int) -> None:
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize="small", frameon=False)


def forest_figure(rows: list[Any], column: Any) -> Figure | None:
    """Each paired row's Δ of ``column`` with its 95 % interval, grouped by backbone, a zero line;
    colour by head; grey = conditional on one model (†); open markers = no test."""
    shown = [r for r in rows if r.stats.get(column.key)]
    if not shown:
        return None
    heads = list(dict.fromkeys(r.head for r in shown))
    labels = [_row_name(r) for r in shown]
    fig = Figure(figsize=(_label_inches(labels) + 6.0, 1.9 + ROW_INCHES * len(shown)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(shown))[::-1]
    for yi, row in zip(y, shown):
        test = row.stats[column.key]
        mean = test["mean"] * column.scale
        colour = _head_colour(row.head, heads)
        if row.same_as is not None or test.get("ci_low") is None:
            ax.plot(mean, yi, "o", mfc="white", mec=colour, ms=6)
            continue
        low, high = test["ci_low"] * column.scale, test["ci_high"] * column.scale
        conditional = test["level"] != "seeds"
        ax.errorbar(mean, yi, xerr=[[mean - low], [high - mean]], fmt="s" if conditional else "o",
                    color="0.5" if conditional else colour, mfc=colour, capsize=3, ms=6)
    ax.axvline(0, color="0.2", lw=0.8)
    backbones = [str((r.config.get("backbone") or {}).get("name", "")) for r in shown]
    for k in range(1, len(shown)):
        if backbones[k] != backbones[k - 1]:
            ax.axhline(y[k] + 0.5, color="0.85", lw=0.8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_ylim(-0.7, len(shown) - 0.3)
    ax.set_xlabel(f"Δ {column.title} vs the row's none baseline (points), 95 % interval")
    ax.grid(axis="x", color="0.92")
    handles = [Line2D([], [], marker="o", color=_head_colour(h, heads), linestyle="", label=h) for h in heads]
    handles += [Line2D([], [], marker="s", color="0.5", mfc="white", linestyle="-", label="† one model (same weights)"),
                Line2D([], [], marker="o", color="0.3", mfc="white", linestyle="", label="no test / = another row")]
    _legend_below(fig, handles, ncol=3)
    return fig


def metrics_figure(rows: list[Any], columns: tuple) -> Figure:
    """Horizontal bars: each row's mean of each paired column (error bar: 95 % t-interval across
    seeds); grey = baseline, colour = head."""
    heads = list(dict.fromkeys(r.head for r in rows))
    labels = [_row_name(r) for r in rows]
    fig = Figure(figsize=(_label_inches(labels) + 3.2 * len(columns), 1.9 + ROW_INCHES * len(rows)),
                 layout="constrained")
    axes = fig.subplots(1, len(columns), sharey=True, squeeze=False)[0]
    y = np.arange(len(rows))[::-1]
    for ax, column in zip(axes, columns):
        means, errors = [], []
        for row in rows:
            values = _row_values(row, column)
            means.append(np.mean(values) * column.scale if values else np.nan)
            half = _t_half_width(values) if values else None
            errors.append(half * column.scale if half else 0.0)
        ax.barh(y, means, 0.7, xerr=errors if any(errors) else None, capsize=2,
                color=[_head_colour(r.head, heads) for r in rows])
        ax.set_title(column.title, fontsize="small")
        ax.grid(axis="x", color="0.92")
        ax.set_ylim(-0.7, len(rows) - 0.3)
    axes[0].set_yticks(y, labels, fontsize=8)
    handles = [Patch(color=_head_colour(h, heads), label=h + (" (baseline)" if h == "none" else "")) for h in heads]
    _legend_below(fig, handles, ncol=min(5, len(handles)))
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and score (higher),
    ordered by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def cost_figure(rows: list[Any], column: Any, cost: Any) -> Figure:
    """``column`` (error bars: 95 % t-interval across seeds) against inference ms/image (log
    axis), colour by head, marker by backbone, the Pareto front as a step line; legend outside
    the axes."""
    heads = list(dict.fromkeys(r.head for r in rows))
    backbones = list(dict.fromkeys(str((r.config.get("backbone") or {}).get("name", "")) for r in rows))
    markers = dict(zip(backbones, "osD^vP*Xh<>p"))
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    points = []
    for row in rows:
        ms, score = _row_values(row, cost), _row_values(row, column)
        if not ms or not score:
            continue
        x, yv = float(np.mean(ms)), float(np.mean(score)) * column.scale
        points.append((x, yv))
        yerr = _t_half_width(score)  # timing spread is left out: it says little and hides the points
        backbone = str((row.config.get("backbone") or {}).get("name", ""))
        ax.errorbar(x, yv, yerr=None if yerr is None else yerr * column.scale,
                    fmt=markers.get(backbone, "o"), color=_head_colour(row.head, heads), capsize=2, ms=6)
    front = pareto_front(points)
    if len(front) > 1:
        xs, ys = zip(*(points[i] for i in front))
        ax.step(xs, ys, where="post", color="0.4", lw=1, ls="--")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ms / image (backbone + head), log scale")
    ax.set_ylabel(column.title)
    ax.grid(color="0.92")
    handles = [Line2D([], [], marker="s", color=_head_colour(h, heads), linestyle="", label=h) for h in heads]
    handles += [Line2D([], [], marker=markers[b], color="0.3", linestyle="", label=b) for b in backbones]
    handles.append(Line2D([], [], color="0.4", ls="--", label="Pareto front"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    return fig


def _save(fig: Figure, path: Path, dpi: int = 110) -> Path:
    fig.savefig(path, dpi=dpi)
    return path


def plot_forest(rows: list[Any], column: Any, path: Path) -> Path | None:
    with matplotlib.rc_context(PLAIN_TEXT):
        fig = forest_figure(rows, column)
        return None if fig is None else _save(fig, path)


def plot_metrics(rows: list[Any], columns: tuple, path: Path) -> Path:
    with matplotlib.rc_context(PLAIN_TEXT):
        return _save(metrics_figure(rows, columns), path)


def plot_cost(rows: list[Any], column: Any, cost: Any, path: Path) -> Path:
    with matplotlib.rc_context(PLAIN_TEXT):
        return _save(cost_figure(rows, column, cost), path, dpi=120)


def load_predictions(run: RunRecord) -> tuple[dict[str, tuple] | None, str]:
    """``{id: (image, mask, prediction)}`` from a run's predictions.npz (a file of the run's
    folder, its ``location``), or (None, why)."""
    name = run.predictions
    if not name:
        return None, "no saved predictions (run made with save_predictions=0 or before they were saved)"
    if run.location is None:
        return None, f"{name}: the run's folder is not known (a record not read from a folder)"
    path = Path(run.location) / name
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


def _num_classes(run: RunRecord, arrays: dict[str, tuple]) -> int:
    """From results.json (``num_classes``), the config, else the largest label seen."""
    value = run.num_classes or (run.config.get("data") or {}).get("num_classes")
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
                    notes.append((str(run.location), why))
                else:
                    loaded[head] = (run, arrays)
            if base.head not in loaded or len(loaded) < 2:
                continue
            if not set.intersection(*(set(arrays) for _, arrays in loaded.values())):
                notes.append((base_run_path(loaded, base), "saved predictions of the paired runs share no image id"))
                continue
            with matplotlib.rc_context(PLAIN_TEXT):
                return _save(grid_figure(base, seed, loaded, column, count), path), notes
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
    return str(loaded[base.head][0].location)


def grid_figure(base: Any, seed: Any, loaded: dict[str, tuple], column: Any, count: int = 4) -> Figure:
    """The qualitative grid of one baseline and seed; ``loaded``: head -> (run, predictions)."""
    base_run, base_arrays = loaded[base.head]
    ids = sorted(set.intersection(*(set(a) for _, a in loaded.values())))
    value = {head: {r["id"]: r.get(column.per_image) for r in run.per_image or ()} for head, (run, _) in loaded.items()}
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
    fig = Figure(figsize=(2.3 * len(titles), 2.4 * len(chosen) + 0.9), layout="constrained")
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
    fig.suptitle(f"{base.label} / seed {seed}: saved test images with the largest and smallest Δ of {best}\n"
                 f"({column.title}, per image, head minus none); red outlines = errors", fontsize="x-small")
    names = list(base_run.class_names or [])
    names += [str(c) for c in range(len(names), num_classes)]
    handles = [Patch(color=cmap(c), label=names[c]) for c in range(num_classes)]
    handles.append(Patch(facecolor="white", edgecolor="red", label="error"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize="x-small",
               frameon=False)
    return fig


def draw_all(rows: list[Any], columns: tuple, cost: Any, out_dir: Path, paths: dict[str, Path]) -> list[tuple[str, str]]:
    """Every figure that can be drawn (added to ``paths``); returns (where, why) for what could not."""
    notes: list[tuple[str, str]] = []
    if not rows:
        return [("figures", "no rows")]
    forest = plot_forest(rows, columns[0], out_dir / "forest.png")
    if forest is not None:
        paths["forest_figure"] = forest
    else:
        notes.append(("forest.png", "not drawn: no row has a Δ"))
    paths["metrics_figure"] = plot_metrics(rows, columns, out_dir / "metrics.png")
    paths["cost_figure"] = plot_cost(rows, columns[0], cost, out_dir / "cost.png")
    grid, grid_notes = plot_qualitative(rows, columns[0], out_dir / "qualitative.png")
    notes += grid_notes
    if grid is not None:
        paths["qualitative_figure"] = grid
    return notes
