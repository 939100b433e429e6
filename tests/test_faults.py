"""Faults and hostile input: labels that would break a table, report
outputs that must appear whole, overlapping report arguments, masks read as drawn, bad
class counts, runs that would train nothing."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import segrefine.figures
from conftest import TINY, subprocess_env
from segrefine.report import (escape_latex, escape_markdown, load_study, main, summarise, to_latex, to_markdown,
                              to_markdown_full, write_report)
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
            run(folder, [v - shift for v in ious], head=head, data=name, label=name)  # the row's label
    return load_study([root])


@pytest.mark.parametrize("table, column, offset", [(to_markdown_full, "IoU % (pooled)", 0.01),
                                                   (to_markdown, "IoU % (img mean)", 0.0)])
def test_markdown_cells_survive_pipes_backticks_and_line_breaks(tmp_path, table, column, offset):
    rows, _ = summarise(hostile_study(tmp_path).runs)
    lines = table(rows).splitlines()
    header = re.split(r"(?<!\\)\|", lines[0])
    body = [line for line in lines[2:] if line.startswith("|")]
    assert len(body) == 4  # a line break in a label would have split its row
    iou = [i for i, cell in enumerate(header) if cell.strip() == column][0]
    for line in body:
        cells = re.split(r"(?<!\\)\|", line)
        assert len(cells) == len(header)  # no cell shifted by an unescaped "|"
        label = cells[1].strip()
        plain = label.replace("\\|", "|").replace("\\`", "`").replace("\\\\", "\\")
        shift = 0.0 if plain.startswith("a|b") else 0.1
        gain = GAIN if cells[2].strip() in ("crfrnn", "CRF-RNN") else [0.0] * len(BASE)
        expected = np.mean([b + g - shift for b, g in zip(BASE, gain)]) + offset  # run(): test/iou = mean + 0.01
        assert cells[iou].strip() == f"{expected * 100:.2f}"  # one seed: the value alone
        assert plain in ("plain", " ".join(HOSTILE.splitlines()))
    assert escape_markdown("x\\|y") == "x\\\\\\|y"  # a backslash before a pipe cannot un-escape it


def test_latex_escapes_all_ten_special_characters(tmp_path):
    rows, _ = summarise(hostile_study(tmp_path).runs)
    body = [line for line in to_latex(rows).splitlines() if "CRF-RNN" in line or "none" in line]
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
        assert "| U-Net | none | – |" in out and "| U-Net | CRF-RNN | 2 |" in out


# -- class counts that reach the ignore index ----------------------------------------


@pytest.mark.parametrize("overrides", [("data.num_classes=255",), ("data.num_classes=256",), ("data.num_classes=300",),
                                       ("data=folder", "data.root=/nonexistent", "data.num_classes=256")])
def test_class_counts_reaching_the_ignore_index_are_refused_before_anything(make_cfg, tmp_path, overrides):
    from segrefine.runs import run_recording_failure
    from segrefine.train import train
    from segrefine.validation import ConfigValueError

    out = tmp_path / "run"
    with pytest.raises(ConfigValueError, match=r"data\.num_classes=\d+: at most 254 classes .* below 255"):
        run_recording_failure(train, make_cfg(*overrides, output_dir=out))
    assert sorted(p.name for p in out.iterdir()) == ["error.txt"]


def test_a_source_counting_its_own_classes_is_held_to_the_same_limit(make_cfg, tmp_path):
    from segrefine.build import build_module
    from segrefine.data.msd import _class_names
    from segrefine.data.common import DataError
    from segrefine.validation import ConfigValueError

    with pytest.raises(DataError, match="255 classes; at most 254"):
        _class_names({str(i): f"c{i}" for i in range(255)}, tmp_path / "dataset.json")
    assert len(_class_names({str(i): f"c{i}" for i in range(254)}, tmp_path / "dataset.json")) == 254

    class Counted:  # any data source: the module is built from the count it reports
        num_classes, in_channels, class_names = 256, 1, [f"c{i}" for i in range(256)]

    with pytest.raises(ConfigValueError, match=r"data=synthetic: num_classes=256: at most 254"):
        build_module(make_cfg(), Counted())


# -- runs that would train no step -----------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("+trainer.max_steps=0", r"trainer\.max_steps=0 must be an integer >= 1 or -1"),
    ("+trainer.limit_train_batches=0", r"limit_train_batches=0 would train no step"),
    ("+trainer.limit_train_batches=0.0", r"limit_train_batches=0\.0 would train no step"),
    ("+trainer.limit_train_batches=0.4", r"limit_train_batches=0\.4 of the 2 training batches is 0"),  # int(2 * 0.4)
])
def test_zero_training_steps_are_refused_before_training(make_cfg, tmp_path, override, message):
    from segrefine.runs import run_recording_failure
    from segrefine.train import train
    from segrefine.validation import ConfigValueError

    out = tmp_path / "run"
    with pytest.raises(ConfigValueError, match=message):
        run_recording_failure(train, make_cfg(override, output_dir=out))  # TINY: 16 images in batches of 8
    assert sorted(p.name for p in out.iterdir()) == ["error.txt"]  # no checkpoint, no results.json


def test_an_empty_train_split_is_refused(make_cfg):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from segrefine.train import check_training_steps
    from segrefine.validation import ConfigValueError

    class Empty:
        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.zeros(0, 1, 4, 4)), batch_size=8)

    with pytest.raises(ConfigValueError, match="the train split is empty"):
        check_training_steps(make_cfg(), Empty())


# -- SIGTERM / SIGINT stop at a safe point, are recorded, and say how to resume ------------

CLI_BASE = [o for o in TINY if not o.startswith("logger=")] + ["backbone=pspnet", "logger=none"]


def start(module: str, *args: str, cwd: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for(path_glob: Path, pattern: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(path_glob.glob(pattern)):
        assert process.poll() is None, f"ended before {pattern} appeared:\n{process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no {pattern} after {timeout} s"
        time.sleep(0.05)


def as_module_command(command: str) -> list[str]:
    """A printed ``segrefine-train ARGS`` as ``python -m segrefine.train ARGS`` (the venv's
    console scripts are not used from tests)."""
    program, *args = shlex.split(command)
    modules = {"segrefine-train": "segrefine.train", "segrefine-eval": "segrefine.evaluate"}
    return [sys.executable, "-m", modules[program], *args]


def sigterm_a_training(tmp_path: Path, data_dir: Path) -> tuple[Path, str, int]:
    """A CLI training stopped by SIGTERM after its first epoch: (folder, stderr, step reached)."""
    import torch

    out = tmp_path / "run"
    args = [*CLI_BASE, "trainer.max_epochs=3", f"paths.data_dir={data_dir}", f"hydra.run.dir={out}"]
    process = start("segrefine.train", *args, cwd=tmp_path)
    wait_for(out, "checkpoints/last.ckpt", process)  # one epoch done: a stop now is mid-run
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    stopped = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 <= stopped < 6
    return out, stderr, stopped


def resume_line(stderr: str) -> str:
    (line,) = [line for line in stderr.splitlines() if "interrupted by SIGTERM" in line]
    return line


def test_sigterm_stops_training_at_a_batch_records_it_and_exits_143(tmp_path, data_dir):
    from segrefine.report import load_study

    out, stderr, _ = sigterm_a_training(tmp_path, data_dir)
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == "interrupted" and record["signal"] == "SIGTERM"
    assert record["checkpoint"] == "checkpoints/last.ckpt" and not (out / "error.txt").exists()
    line = resume_line(stderr)
    assert "(last.ckpt kept)" in line and line.endswith(f"hydra.run.dir={out}") and "Traceback" not in stderr
    study = load_study([out])
    assert study.runs == [] and study.incomplete == [(str(out), "interrupted by SIGTERM: not finished (its command "
                                                                 "resumes it)")]
    assert not (out / ".segrefine.lock").exists()  # released on the way out


@pytest.mark.slow  # two CLI runs
def test_the_printed_command_resumes_a_stopped_training_from_its_batch(tmp_path, data_dir):
    import torch

    out, stderr, _ = sigterm_a_training(tmp_path, data_dir)
    command = resume_line(stderr).split("resume with: ", 1)[1]
    done = subprocess.run(as_module_command(command), cwd=tmp_path, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["status"] == "complete"
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6  # 3 epochs x 2


# -- run folders are exclusive ------------------------------------------------------------

HOLD = ("import sys, time\n"
        "from segrefine.jobs import run_folder_lock\n"
        "with run_folder_lock(sys.argv[1], 'train'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n")


def test_a_second_process_on_a_run_folder_is_refused_and_a_dead_holders_lock_taken_over(tmp_path, capsys):
    from segrefine.jobs import LOCK_FILE, RunFolderError, run_folder_lock

    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        record = json.loads((folder / LOCK_FILE).read_text())
        assert record["pid"] == holder.pid and record["host"] and record["started"]
        with pytest.raises(RunFolderError, match=rf"{re.escape(str(folder))} is in use by pid {holder.pid} on "):
            with run_folder_lock(folder, "train"):
                pass
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == holder.pid  # the holder's lock untouched
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        holder.wait()
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == holder.pid
    with run_folder_lock(folder, "eval"):
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {holder.pid}" in capsys.readouterr().out
    assert not (folder / LOCK_FILE).exists()

    # A lock file naming a live process of this host is respected even without its flock.
    (folder / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": record["host"], "started": "earlier"}))
    with pytest.raises(RunFolderError, match=rf"in use by pid {os.getppid()} .*delete the lock file"):
        with run_folder_lock(folder, "train"):
            pass


def test_a_locked_folder_writes_nothing_into_it(make_cfg, tmp_path):
    from segrefine.jobs import RunFolderError, run_folder_lock
    from segrefine.runs import run_recording_failure
    from segrefine.train import train

    out = tmp_path / "run"
    with run_folder_lock(out, "train"):  # this test holds it, as another process would
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(RunFolderError, match="is in use by"):
            # a fresh file description: flock refuses it as it would another process
            run_recording_failure(train, make_cfg(output_dir=out))
        assert sorted(p.name for p in out.iterdir()) == before  # no error.txt, no checkpoints


def test_default_run_folders_differ_for_jobs_started_in_the_same_second(tmp_path):
    from hydra import compose, initialize_config_dir

    from conftest import CONFIG_DIR

    code = "from segrefine.runs import run_stamp; print(run_stamp(), run_stamp())"
    processes = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    stamps = [p.communicate()[0].split() for p in processes]
    assert all(a == b for a, b in stamps)  # one folder per process, however often it is resolved
    assert stamps[0][0] != stamps[1][0]
    assert stamps[0][0].rsplit("_", 1)[1] == str(processes[0].pid)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for name in ("train", "eval"):
            cfg = compose(name, overrides=["ckpt_path=x"] if name == "eval" else [], return_hydra_config=True)
            assert cfg.hydra.run.dir.endswith(f"_{os.getpid()}")
    assert "${run_stamp:}" in Path(CONFIG_DIR, "eval.yaml").read_text()  # the eval sweep folder too


def test_eval_refuses_a_training_folder_train_an_evaluations_and_a_stopped_evaluation_is_redone(make_cfg, tmp_path):
    from segrefine.evaluate import evaluate
    from segrefine.jobs import RunFolderError
    from segrefine.runs import run_recording_failure
    from segrefine.train import train
    from test_failsafe import eval_cfg

    run = tmp_path / "run"
    train(make_cfg("backbone=pspnet", output_dir=run))
    stamp = (run / "results.json").stat().st_mtime_ns
    with pytest.raises(RunFolderError, match="holds a training run's checkpoints"):
        run_recording_failure(evaluate, eval_cfg(run, run, "head=densecrf"), "eval")
    assert (run / "results.json").stat().st_mtime_ns == stamp and not (run / "error.txt").exists()

    evaluation = tmp_path / "eval"
    evaluate(eval_cfg(run, evaluation))
    with pytest.raises(RunFolderError, match="finished evaluation of another config .*head"):
        evaluate(eval_cfg(run, evaluation, "head=densecrf"))
    stamp = (evaluation / "results.json").stat().st_mtime_ns
    with pytest.raises(RunFolderError, match="holds an evaluation's results; training here would replace them"):
        run_recording_failure(train, make_cfg("backbone=pspnet", output_dir=evaluation))
    assert (evaluation / "results.json").stat().st_mtime_ns == stamp and not (evaluation / "error.txt").exists()

    # SIGTERM during an evaluation: recorded as interrupted, and redone in the same folder.
    from segrefine.jobs import JobInterrupted
    from segrefine.module import SegmentationModule

    stopped, real_step = tmp_path / "stopped", SegmentationModule.test_step

    def step(self, batch, batch_idx):
        if batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, batch, batch_idx)

    SegmentationModule.test_step = step
    try:
        with pytest.raises(JobInterrupted, match="SIGTERM"):
            run_recording_failure(evaluate, eval_cfg(run, stopped), "eval")
    finally:
        SegmentationModule.test_step = real_step
    record = json.loads((stopped / "results.json").read_text())
    assert (record["status"], record["signal"], record["job_type"], record["checkpoint"]) == (
        "interrupted", "SIGTERM", "eval", None)
    run_recording_failure(evaluate, eval_cfg(run, stopped), "eval")
    assert json.loads((stopped / "results.json").read_text())["status"] == "complete"


@pytest.mark.slow  # ~8 s: Lightning's own requeue path, which segrefine's signal handling leaves in place
def test_lightnings_slurm_requeue_still_works_under_submitits_sigterm_handler(make_cfg, monkeypatch, tmp_path):
    """SLURM pre-emption as submitit sees it: SIGUSR1 makes Lightning save its hpc checkpoint
    and requeue the job (scontrol), then SIGTERM ends this attempt. submitit's own SIGTERM
    handler (it only logs) must still run, and the stop must be recorded as interrupted."""
    import torch

    from segrefine.heads.none import NoHead
    from segrefine.jobs import JobInterrupted
    from segrefine.runs import run_recording_failure
    from segrefine.train import train

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "segrefine", "SLURM_JOB_ID": "4242",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    bypassed = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: bypassed.append(signum))  # submitit's "bypass"

    original, calls = NoHead.losses, {"n": 0}

    def losses(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning signal, before the time limit
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # then the end of this attempt
        return original(self, *args)

    monkeypatch.setattr(NoHead, "losses", losses)
    out = tmp_path / "run"
    try:
        with pytest.raises(JobInterrupted, match="SIGTERM"):
            run_recording_failure(train, make_cfg("backbone=pspnet", "trainer.max_epochs=4", output_dir=out))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]  # Lightning requeued the job
    assert [p.name for p in out.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"]
    assert bypassed == [signal.SIGTERM]  # submitit's handler ran too
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == "interrupted" and record["signal"] == "SIGTERM"


@pytest.mark.slow  # a CLI sweep
@pytest.mark.parametrize("stop, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_a_sweep_non_zero_before_its_later_jobs(tmp_path, data_dir, stop, code):
    sweep = tmp_path / "sweep"
    process = start("segrefine.train", "-m", *CLI_BASE, "trainer.max_epochs=30", "seed=0,1",
                    f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    wait_for(sweep, "*seed-0*/checkpoints/last.ckpt", process)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-3000:]
    (first,) = sweep.glob("*seed-0*")
    record = json.loads((first / "results.json").read_text())
    assert record["status"] == "interrupted" and record["signal"] == signal.Signals(stop).name
    assert not list(sweep.glob("*seed-1*"))  # the later job never started
    (line,) = [line for line in stderr.splitlines() if f"interrupted by {signal.Signals(stop).name}" in line]
    assert line.endswith(shlex.join(["segrefine-train", "-m", *CLI_BASE, "trainer.max_epochs=30", "seed=0,1",
                                     f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}"]))
    assert "Traceback" not in stderr


# -- short, true errors ----------------------------------------------------------------------


def test_a_user_error_prints_two_lines_without_a_traceback_unless_asked(tmp_path, data_dir):
    out = tmp_path / "run"
    args = ["-m", "segrefine.train", "data.num_classes=300", f"paths.data_dir={data_dir}", f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "segrefine: ConfigValueError: data.num_classes=300: at most 254 classes are supported (class indices must "
        "stay below 255, the index of ignored pixels)",
        f"(traceback in {out / 'error.txt'})"]
    assert "ConfigValueError" in (out / "error.txt").read_text()
    full = subprocess.run([sys.executable, *args, "verbose=true"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 1 and "Traceback" in full.stderr and "data.num_classes=300" in full.stderr


def full_disk_during_torch_save(monkeypatch, after_bytes: int = 4096) -> None:
    """torch.save's own writes hit ENOSPC after ``after_bytes`` (the real failure reaches the
    file object's write; torch then reports "unexpected pos")."""
    import errno

    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_write, written = f.write, {"n": 0}

        def write(data):
            written["n"] += len(data)
            if written["n"] > after_bytes:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(data)

        f.write = write
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_while_saving_a_checkpoint_says_so_in_one_line(make_cfg, monkeypatch, tmp_path, capsys):
    from segrefine.runs import run_cli_job
    from segrefine.train import train

    full_disk_during_torch_save(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_cli_job(train, make_cfg("backbone=pspnet", output_dir=out), "train", "segrefine-train")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("segrefine:", "(traceback"))]  # no progress bars
    assert "Traceback" not in err and "unexpected pos" not in err
    assert lines[0] == (f"segrefine: no space left on {out / 'checkpoints'}: free some (or choose another folder) "
                        "and rerun to resume")
    assert len(lines) == 2 and "unexpected pos" in (out / "error.txt").read_text()  # the cause kept for a bug report
    assert not list((out / "checkpoints").glob("*"))  # nothing partial


@pytest.mark.slow  # a CLI run on a real 1 MiB tmpfs (needs unshare -rm and tmpfs mounts)
def test_a_real_full_tmpfs_gives_one_line(tmp_path, data_dir):
    import shutil

    if not shutil.which("unshare"):
        pytest.skip("no unshare")
    mount = tmp_path / "small"
    mount.mkdir()
    script = (f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(str(mount))} && exec {shlex.quote(sys.executable)} -m "
              f"segrefine.train {' '.join(map(shlex.quote, CLI_BASE))} paths.data_dir={shlex.quote(str(data_dir))} "
              f"hydra.run.dir={shlex.quote(str(mount / 'run'))}")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs tmpfs {shlex.quote(str(mount))}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"tmpfs mounts are not allowed here: {probe.stderr.decode()[-200:]}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("segrefine:")]
    assert lines == [f"segrefine: no space left on {mount / 'run' / 'checkpoints'}: free some (or choose another "
                     "folder) and rerun to resume"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "unexpected pos" not in proc.stderr


@pytest.mark.slow  # wandb online against a closed local port: wandb retries for its init timeout
def test_wandb_online_without_a_server_says_how_to_run_offline(tmp_path, data_dir):
    env = {**subprocess_env(), "WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:9",
           "WANDB_API_KEY": "x" * 40, "WANDB_INIT_TIMEOUT": "5"}
    proc = subprocess.run([sys.executable, "-m", "segrefine.train", *CLI_BASE, "logger=wandb",
                           f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("segrefine:")]
    assert lines[0].startswith("segrefine: wandb online: contacting the server")  # before the wait, not after
    assert lines[1].startswith("segrefine: wandb failed (CommError") and "logger.mode=offline" in lines[1]
    assert "Traceback" not in proc.stderr


# -- masks and volumes read as drawn ----------------------------------------------


def test_float_masks_are_rounded_not_truncated_and_soft_values_refused(tmp_path):
    from PIL import Image

    from segrefine.data.common import DataError
    from segrefine.data.folder import FolderDataModule

    module = FolderDataModule(root=str(tmp_path), num_classes=3)
    drawn = np.array([[0, 1, 2, 1], [1, 1, 0, 2]])
    stored = drawn + np.array([[0.0004, -0.0001, -0.0009, 0.0], [0.0, -0.0008, 0.0002, 0.0]])  # 0.9999 etc.
    Image.fromarray(stored.astype(np.float32), mode="F").save(tmp_path / "m.tif")
    assert module._mask(tmp_path / "m.tif").tolist() == drawn.tolist()
    as_0_255 = FolderDataModule(root=str(tmp_path), num_classes=2, mask_values={0: 0, 255: 1})
    Image.fromarray(np.array([[0.0, 254.9996], [255.0, 0.0002]], np.float32), mode="F").save(tmp_path / "b.tif")
    assert as_0_255._mask(tmp_path / "b.tif").tolist() == [[0, 1], [1, 0]]
    soft = stored.copy()
    soft[1, 3] = 1.5
    Image.fromarray(soft.astype(np.float32), mode="F").save(tmp_path / "soft.tif")
    with pytest.raises(DataError, match=r"soft\.tif: float mask value 1\.5 is 0\.5 from the nearest whole class"):
        module._mask(tmp_path / "soft.tif")


def exif_with(orientation: int):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_exif_orientation_turns_images_and_masks_alike_or_is_refused(tmp_path):
    from PIL import Image

    from segrefine.data.common import DataError
    from segrefine.data.folder import FolderDataModule

    module = FolderDataModule(root=str(tmp_path), num_classes=2)
    mask = np.zeros((40, 24), np.uint8)  # as shown: a portrait photo and the mask drawn on it
    mask[4:20, 2:10] = 1
    shown = np.where(mask == 1, 230, 20).astype(np.uint8)
    # EXIF 6: the viewer turns the stored pixels 90 degrees clockwise, so they are stored turned back
    Image.fromarray(np.rot90(shown, 1)).save(tmp_path / "photo.jpg", quality=95, exif=exif_with(6))
    Image.fromarray(mask).save(tmp_path / "drawn.png")  # untagged, drawn on the photo as shown
    Image.fromarray(np.rot90(mask, 1)).save(tmp_path / "tagged.png", exif=exif_with(6))  # stored like the photo

    for mask_file in ("drawn.png", "tagged.png"):
        ((image, read_mask),) = module._read("test", [("photo", tmp_path / "photo.jpg", tmp_path / mask_file)])
        assert read_mask.tolist() == mask.tolist()
        assert image[0][mask == 1].min() > 0.7 and image[0][mask == 0].max() < 0.3  # aligned pixel for pixel

    square = np.zeros((24, 24), np.uint8)
    square[2:9, 3:20] = 1
    Image.fromarray(np.rot90(np.where(square == 1, 230, 20).astype(np.uint8), 2)).save(
        tmp_path / "upside.jpg", quality=95, exif=exif_with(3))  # 180 degrees: the shapes cannot tell
    Image.fromarray(square).save(tmp_path / "square.png")
    with pytest.raises(DataError, match=r"square\.png has EXIF orientation 1 but its image .*upside\.jpg has 3"):
        module._read("test", [("upside", tmp_path / "upside.jpg", tmp_path / "square.png")])


def test_an_msd_label_on_a_flipped_grid_is_refused_naming_both_files(tmp_path):
    import nibabel as nib

    from segrefine.data.common import DataError
    from segrefine.data.msd import MSDDataModule
    from test_datasets import write_msd_task

    root = tmp_path / "T"
    write_msd_task(root, n=3, axcodes=("R", "A", "S"))
    label_path = root / "labelsTr" / "hippocampus_001.nii.gz"
    label = nib.load(str(label_path))
    flipped = label.affine @ np.diag([-1.0, 1, 1, 1])  # the same voxels, mirrored along x in the world
    nib.Nifti1Image(np.asarray(label.dataobj), flipped).to_filename(label_path)
    dm = MSDDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), split_fractions=[0.34, 0.33, 0.33])
    with pytest.raises(DataError, match=r"labelsTr/hippocampus_001\.nii\.gz and its image .*imagesTr/"
                                        r"hippocampus_001\.nii\.gz are on different voxel grids"):
        dm.prepare_data()

    # The same label stored in another voxel order with its affine to match: one grid, accepted.
    image = nib.load(str(root / "imagesTr" / "hippocampus_001.nii.gz"))
    data = np.asarray(label.dataobj)[::-1]
    shift = label.affine @ np.array([data.shape[0] - 1, 0, 0, 1])
    matching = label.affine @ np.diag([-1.0, 1, 1, 1])
    matching[:3, 3] = shift[:3]
    nib.Nifti1Image(data, matching).to_filename(label_path)
    assert np.allclose(nib.as_closest_canonical(nib.load(str(label_path))).affine,
                       nib.as_closest_canonical(image).affine)
    dm = MSDDataModule(root=str(root), cache_dir=str(tmp_path / "cache2"), split_fractions=[0.34, 0.33, 0.33])
    dm.prepare_data()
    dm.setup()



def test_a_busy_or_foreign_folder_is_refused_before_hydra_writes_into_it(tmp_path):
    """Hydra writes .hydra/ into the output folder before the job runs: the refusal comes first."""
    training = tmp_path / "training"
    (training / "checkpoints").mkdir(parents=True)
    (training / ".hydra").mkdir()
    (training / ".hydra" / "config.yaml").write_text("the training run's config\n")
    (training / "results.json").write_text(json.dumps({"job_type": "train", "status": "complete"}))
    proc = subprocess.run([sys.executable, "-m", "segrefine.evaluate", f"ckpt_path={training}",
                           f"hydra.run.dir={training}"], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"segrefine: RunFolderError: {training} holds a training run's checkpoints: an evaluation there would mix "
        "its results with that run's; choose another output folder (hydra.run.dir=...)"]
    assert (training / ".hydra" / "config.yaml").read_text() == "the training run's config\n"
    assert not list(training.glob("*.log"))

    busy = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(busy)], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run([sys.executable, "-m", "segrefine.train", f"hydra.run.dir={busy}"], cwd=tmp_path,
                              env=subprocess_env(), capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1 and f"{busy} is in use by pid {holder.pid}" in proc.stderr
    assert sorted(p.name for p in busy.iterdir()) == [".segrefine.lock"]  # no .hydra/, no log


def test_signal_handling_outside_a_loop_at_a_safe_point_and_a_second_signal():
    from segrefine.jobs import JobInterrupted, check_interrupt, defer_interrupts, stop_on_signals

    seen = []
    before_term = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    before_int = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(JobInterrupted) as outside:  # no loop to stop at: at once
            with stop_on_signals():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert (outside.value.signal_name, outside.value.exit_code, outside.value.forced) == ("SIGINT", 130, False)

        with stop_on_signals(), defer_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # delivered: asks to stop, raises nothing here
            with pytest.raises(JobInterrupted, match="SIGTERM"):
                check_interrupt()  # ... but at the safe point
            with pytest.raises(JobInterrupted) as second:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            assert second.value.forced  # a second signal does not wait for a safe point
        assert seen == [signal.SIGTERM, signal.SIGTERM]  # the handler that was there before still ran
        check_interrupt()  # nothing pending once the job is over
        assert signal.getsignal(signal.SIGINT) is before_int
    finally:
        signal.signal(signal.SIGTERM, before_term)


def test_an_interruption_never_replaces_complete_results(tmp_path):
    from omegaconf import OmegaConf

    from segrefine.jobs import JobInterrupted
    from segrefine.record import RunRecord
    from segrefine.runs import run_recording_failure

    def stopped(cfg):
        raise JobInterrupted(signal.SIGTERM)

    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path / "a")}, "name": "t", "seed": 0})
    with pytest.raises(JobInterrupted):
        run_recording_failure(stopped, cfg)
    assert json.loads((tmp_path / "a" / "results.json").read_text())["status"] == "interrupted"

    done = RunRecord.new(job_type="train", metrics={"test/iou": 0.5}).write(tmp_path / "b")
    before = done.read_text()
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path / "b")}, "name": "t", "seed": 0})
    with pytest.raises(JobInterrupted):  # e.g. stopped while skipping it, or in a force=true redo
        run_recording_failure(stopped, cfg)
    assert done.read_text() == before
