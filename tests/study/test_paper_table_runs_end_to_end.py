"""The paper-table study end to end at a tiny scale, and the notebook on its output."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, TINY, subprocess_env
from segrefine.report import load_study, summarise

pytestmark = pytest.mark.timeout(900)


def run_paper_table(out, data_dir, backbones: str, controls: str, heads: str = "none,crfrnn,pointrend") -> str:
    tiny = [o for o in TINY if not o.startswith("trainer.accelerator")] + [f"paths.data_dir={data_dir}"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "paper_table" / "run.py"), "--out", str(out), *tiny,
         "--backbones", backbones, "--heads", heads, "--fine-skip-controls", controls,
         "--eval-override", "head.num_workers=1", "--tune-trials", "3", "--finetune-epochs", "1"],
        capture_output=True, text=True, env=subprocess_env(), cwd=out,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, data_dir):
    """The study script end to end on one backbone with the CRF heads (every backbone x head
    pair is built and trained by test_contract.py, every backbone's plan with PointRend and
    its matched baseline is checked in test_plans_pair_as_intended.py; the slow test runs it all)."""
    out = tmp_path_factory.mktemp("study")
    return out, run_paper_table(out, data_dir, "unet", "", heads="none,crfrnn")


def check_rows(out, stdout, backbones, heads=("none", "densecrf", "densecrf_tuned", "crfrnn", "pointrend")):
    study = load_study([out])
    rows, duplicates = summarise(study.runs)
    assert not duplicates
    assert {(r.config["backbone"]["name"], r.head) for r in rows} >= {
        (b, h) for b in backbones for h in heads
    }
    for row in rows:
        if row.baseline is not None:
            # One seed: a test conditional on the model for same-weights pairs, none for retrained ones.
            expected = "images" if row.pairing == "same weights" else "none"
            assert all(t["n"] == 1 and t["level"] == expected for t in row.stats.values())
            assert len(row.baseline.runs[0].per_image) == 8  # every test image paired
    # Evaluations record the training config with the head replaced: paired on the same weights.
    densecrf = [r for r in rows if r.head in ("densecrf", "densecrf_tuned")]
    assert len(densecrf) == 2 * len(backbones)
    assert all(r.baseline is not None and r.pairing == "same weights" for r in densecrf)
    assert (out / "report" / "table.md").read_text().strip() in stdout
    assert (out / "report" / "qualitative.png").stat().st_size > 0


def test_study_has_every_head_row_with_densecrf_paired(tiny_study):
    out, stdout = tiny_study
    check_rows(out, stdout, ["unet"], heads=("none", "densecrf", "densecrf_tuned", "crfrnn"))
    # The plan's matched baseline and tuning ran too.
    assert (out / "train" / "unet-none-continued-s0" / "results.json").is_file()
    assert (out / "tune" / "unet-none-s0" / "densecrf_tuned.yaml").is_file()


@pytest.mark.slow
def test_study_has_every_backbone_head_row_with_densecrf_paired(tmp_path, data_dir):
    stdout = run_paper_table(tmp_path, data_dir, "fcn,unet,pspnet", "fcn,pspnet")
    check_rows(tmp_path, stdout, ["fcn", "unet", "pspnet"])
    assert (tmp_path / "train" / "unet-none-output_stride4-s0" / "results.json").is_file()
    assert (tmp_path / "train" / "fcn-none-continued-s0" / "results.json").is_file()
    assert (tmp_path / "train" / "pspnet-none-fine_skip-s0" / "results.json").is_file()
    assert (tmp_path / "tune" / "pspnet-none-s0" / "densecrf_tuned.yaml").is_file()


def test_notebook_runs_on_the_study(tiny_study):
    import nbformat
    from nbclient import NotebookClient

    out, _ = tiny_study
    notebook = nbformat.read(REPO / "notebooks" / "results.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stored clean
    os.environ["SEGREFINE_STUDY"] = str(out)
    try:
        NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(out)}}).execute()
    finally:
        del os.environ["SEGREFINE_STUDY"]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                   for cell in notebook.cells for o in cell.get("outputs", []))
    assert re.search(r"\| [^|]* \| CRF-RNN \| 1 \| ", text) and "Δ IoU % [95 % CI]" in text
