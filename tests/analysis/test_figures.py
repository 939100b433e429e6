"""Every report figure keeps its text inside the figure and its row labels apart, for a small and
a large table; labels are drawn as plain text (a `$` in a config value never becomes mathtext)."""

import json

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from segrefine import figures
from segrefine.report import COST, PROTOCOLS, load_study, summarise, write_report
from test_report import BASE, eval_run, run

COLUMNS = PROTOCOLS["standard"]["paired"]


def study_rows(tmp_path, configurations, seeds=(0,), predictions=False, trained=("crfrnn", "pointrend")):
    """``configurations`` backbones/sizes, each with none, the ``trained`` heads and a densecrf
    on seed 0's weights: 4 rows each by default."""
    rng = np.random.default_rng(0)
    backbones = ["fcn", "unet", "pspnet", "segnet"]
    for k in range(configurations):
        kw = {"backbone": backbones[k % 4], "size": 64 + 32 * (k // 4)}
        for seed in seeds:
            run(tmp_path / f"n{k}_{seed}", BASE, seed=seed, predictions="predictions.npz" if predictions else None,
                **kw)
            for head, gain in (("crfrnn", 0.03), ("pointrend", 0.01)):
                if head not in trained:
                    continue
                run(tmp_path / f"{head}{k}_{seed}", [x + gain + rng.normal(0, 0.01) for x in BASE], head=head,
                    seed=seed, predictions="predictions.npz" if predictions else None, **kw)
        base_cfg = json.loads((tmp_path / f"n{k}_0" / "results.json").read_text())["config"]
        eval_run(tmp_path / f"d{k}", [x + 0.02 + rng.normal(0, 0.01) for x in BASE], base_cfg)
    rows, _ = summarise(load_study([tmp_path]).runs)
    return rows


def drawn_texts(fig, renderer=None):
    if renderer is None:
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
    return [(t, t.get_window_extent(renderer)) for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def assert_readable(fig, row_labels=()):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    # What is drawn (tick labels outside the view limits are not) lies inside the figure.
    drawn = fig.get_tightbbox(renderer)
    width, height = fig.get_size_inches()
    assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01 and drawn.x1 <= width + 0.01 and drawn.y1 <= height + 0.01, \
        f"drawn extent {drawn} leaves the {width:.2f} x {height:.2f} in figure"
    # And so does each piece of text a reader needs: row labels, titles, axis labels, legends.
    needed = [*fig.texts, *(t for legend in fig.legends for t in legend.get_texts())]
    for ax in fig.axes:
        needed += [ax.title, ax.xaxis.label, ax.yaxis.label, *(ax.get_legend().get_texts() if ax.get_legend() else ())]
    texts = drawn_texts(fig, renderer)
    for text, extent in texts:
        if text.get_text() in row_labels or any(text is t for t in needed):
            assert extent.x0 >= fig.bbox.x0 - 1 and extent.x1 <= fig.bbox.x1 + 1, text.get_text()
            assert extent.y0 >= fig.bbox.y0 - 1 and extent.y1 <= fig.bbox.y1 + 1, text.get_text()
    # Row labels (y tick labels) never overlap their neighbours.
    ticks = sorted((e for t, e in texts if t.get_text() in row_labels), key=lambda e: e.y0)
    assert all(a.y1 <= b.y0 + 0.5 for a, b in zip(ticks, ticks[1:]))


@pytest.mark.parametrize("configurations, trained, count", [(1, ("crfrnn",), 3), (15, ("crfrnn", "pointrend"), 60)])
def test_every_figure_keeps_its_text_inside_for_small_and_large_tables(tmp_path, configurations, trained, count):
    rows = study_rows(tmp_path, configurations, trained=trained)
    assert len(rows) == count
    names = {figures._row_name(r) for r in rows}
    forest = figures.forest_figure(rows, COLUMNS[0])
    assert_readable(forest, names)
    assert len(forest.axes[0].get_yticklabels()) == count - configurations  # every row with a Δ
    assert_readable(figures.metrics_figure(rows, COLUMNS), names)
    assert_readable(figures.cost_figure(rows, COLUMNS[0], COST))


def test_the_qualitative_grid_has_a_class_legend_and_fits(tmp_path):
    rng = np.random.default_rng(1)
    masks = rng.integers(0, 2, (4, 32, 32)).astype(np.uint8)
    for folder, head in (("none", "none"), ("crf", "crfrnn")):
        run(tmp_path / folder, BASE[:4], head=head, predictions="predictions.npz")
        np.savez(tmp_path / folder / "predictions.npz", ids=np.array([f"img{i}" for i in range(4)]),
                 images=rng.integers(0, 255, (4, 32, 32)).astype(np.uint8), masks=masks,
                 predictions=rng.integers(0, 2, (4, 32, 32)).astype(np.uint8))
    rows, _ = summarise(load_study([tmp_path]).runs)
    base = next(r for r in rows if r.head == "none")
    loaded = {r.head: (r.runs[0], figures.load_predictions(r.runs[0])[0]) for r in rows}
    fig = figures.grid_figure(base, 0, loaded, COLUMNS[0])
    assert_readable(fig)
    legend_texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert legend_texts == ["background", "fg", "error"]  # the run's class names, then the error outline


def test_labels_with_dollar_signs_are_drawn_as_written(tmp_path):
    for folder, head in (("n", "none"), ("c", "crfrnn")):
        path = run(tmp_path / folder, BASE, head=head)
        record = json.loads(path.read_text())
        record["config"]["label"] = "cost $\\alpha$ 5$"  # an unbalanced $ breaks mathtext
        path.write_text(json.dumps(record))
    report = write_report(load_study([tmp_path]), tmp_path / "report")
    assert {"forest_figure", "metrics_figure", "cost_figure"} <= set(report.paths)
    rows, _ = summarise(load_study([tmp_path]).runs)
    texts = [t.get_text() for t, _ in drawn_texts(figures.metrics_figure(rows, COLUMNS))]
    assert "cost $\\alpha$ 5$ · none (baseline)" in texts


def test_the_pareto_front_is_what_nothing_beats_on_cost_and_score():
    points = [(1.0, 50.0), (2.0, 55.0), (2.5, 54.0), (3.0, 60.0), (0.5, 40.0), (3.0, 58.0)]
    assert figures.pareto_front(points) == [4, 0, 1, 3]
