"""Faults and hostile input, round two (issue 27): labels that would break a table, report
outputs that must appear whole, overlapping report arguments, masks read as drawn, bad
class counts, runs that would train nothing."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

import segrefine.figures
from segrefine.report import escape_latex, escape_markdown, load_study, main, summarise, to_latex, to_markdown, write_report
from test_report import BASE, GAIN, run

# Every character that carries meaning in Markdown tables or LaTeX, and a line break.
HOSTILE = "a|b`c$\\nope{x}^2$ 5% #1 {u_v} ~w & back\\slash\nnext"


def unescape_latex(text: str) -> str:
    """The inverse of escape_latex's special-character map, written out independently."""
    for escaped, plain in ((r"\textbackslash{}", "\\"), (r"\textasciitilde{}", "~"), (r"\textasciicircum{}", "^"),
                           (r"\&", "&"), (r"\%", "%"), (r"\$", "$"), (r"\#", "#"), (r"\_", "_"), (r"\{", "{"),
                           (r"\}", "}")):
        text = text.replace(escaped, plain)
    return text


def hostile_study(root, with_predictions=False):
    """Two configurations whose labels are their data names: a hostile one and a plain one,
    each with a none and a crfrnn run (IoU means known from BASE / GAIN)."""
    for name, shift in ((HOSTILE, 0.0), ("plain", 0.1)):
        for head, ious in (("none", BASE), ("crfrnn", [b + g for b, g in zip(BASE, GAIN)])):
            folder = root / f"{'hostile' if name == HOSTILE else 'plain'}-{head}"
            run(folder, [v - shift for v in ious], head=head, data=name)
    return load_study([root])


def test_markdown_cells_survive_pipes_backticks_and_line_breaks(tmp_path):
    rows, _ = summarise(hostile_study(tmp_path).runs)
    lines = to_markdown(rows).splitlines()
    header = re.split(r"(?<!\\)\|", lines[0])
    table = [line for line in lines[2:] if line.startswith("|")]
    assert len(table) == 4  # a line break in a label would have split its row
    iou = [i for i, cell in enumerate(header) if cell.strip() == "IoU % (pooled)"][0]
    for line in table:
        cells = re.split(r"(?<!\\)\|", line)
        assert len(cells) == len(header)  # no cell shifted by an unescaped "|"
        label = cells[1].strip()
        plain = label.replace("\\|", "|").replace("\\`", "`").replace("\\\\", "\\")
        shift = 0.0 if plain.startswith("a|b") else 0.1
        gain = GAIN if cells[2].strip() == "crfrnn" else [0.0] * len(BASE)
        expected = np.mean([b + g - shift for b, g in zip(BASE, gain)]) + 0.01  # run(): test/iou = mean + 0.01
        assert cells[iou].strip() == f"{expected * 100:.2f} ± –"
        assert plain in ("plain", " ".join(HOSTILE.splitlines()))
    assert escape_markdown("x\\|y") == "x\\\\\\|y"  # a backslash before a pipe cannot un-escape it


def test_latex_escapes_all_ten_special_characters(tmp_path):
    rows, _ = summarise(hostile_study(tmp_path).runs)
    body = [line for line in to_latex(rows).splitlines() if "crfrnn" in line or "none" in line]
    columns = to_latex(rows).splitlines()[2].count(" & ")
    assert len(body) == 4
    for line in body:
        assert len(re.findall(r"(?<!\\)&", line)) == columns  # "&" in a label is \&, not a column
        label = line.split(" & ")[0]
        assert unescape_latex(label) in ("plain", " ".join(HOSTILE.splitlines()))
        assert not re.search(r"(?<!\\)[#%_{}]", label.replace(r"\textbackslash{}", "").replace(
            r"\textasciitilde{}", "").replace(r"\textasciicircum{}", ""))
    assert escape_latex("~^\\") == r"\textasciitilde{}\textasciicircum{}\textbackslash{}"
    assert escape_latex("12.3 ± 0.4 Δ") == r"12.3 $\pm$ 0.4 $\Delta$"


def test_a_dollar_label_draws_every_figure_and_the_tables(tmp_path):
    study = hostile_study(tmp_path / "runs")
    report = write_report(study, tmp_path / "report")
    assert {"metrics_figure", "cost_figure"} <= set(report.paths)
    assert all(p.is_file() and p.stat().st_size > 10_000 for p in report.paths.values() if p.suffix == ".png")
    assert (tmp_path / "report" / "table.md").read_text().count("\n|") >= 4


def test_report_outputs_appear_together_or_not_at_all(tmp_path, monkeypatch):
    for seed in (0, 1):
        run(tmp_path / "runs" / f"n{seed}", BASE, seed=seed)
        run(tmp_path / "runs" / f"c{seed}", [b + g for b, g in zip(BASE, GAIN)], head="crfrnn", seed=seed)
    out = tmp_path / "report"
    out.mkdir()
    (out / "table.md").write_text("an older table\n")
    (out / "qualitative.png").write_bytes(b"an older figure")

    def fails(*args, **kwargs):  # the last figure fails after the first two were written
        raise MemoryError("killed while drawing")

    with monkeypatch.context() as m:
        m.setattr(segrefine.figures, "plot_qualitative", fails)
        with pytest.raises(MemoryError):
            write_report(load_study([tmp_path / "runs"]), out)
    assert sorted(p.name for p in out.iterdir()) == ["qualitative.png", "table.md"]  # untouched, no temp folder
    assert (out / "table.md").read_text() == "an older table\n"

    report = write_report(load_study([tmp_path / "runs"]), out)  # complete: every output replaced together
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in report.paths.values()) and "table.md" in names
    assert "qualitative.png" not in names  # no saved predictions: the older figure must not stay beside the table
    assert "an older" not in (out / "table.md").read_text()


def test_overlapping_report_folders_list_each_run_once(tmp_path, capsys):
    root = tmp_path / "study"
    for seed in (0, 1):
        run(root / "sweep" / f"n{seed}", BASE, seed=seed)
        run(root / "sweep" / f"c{seed}", [b + g for b, g in zip(BASE, GAIN)], head="crfrnn", seed=seed)
    os.symlink(root, tmp_path / "link")
    for args in ([root, root], [root, root / "sweep"], [root / "sweep", root], [root, tmp_path / "link"]):
        assert main([*map(str, args), "--no-figures", "--out", str(tmp_path / "report")]) == 0
        out = capsys.readouterr().out
        assert "Duplicate" not in out
        assert "| all runs | none | baseline | 2 |" in out and "| all runs | crfrnn |" in out
