"""Whole-or-absent writes: a writer that fails midway leaves the old file byte-for-byte and no
temporary file; a writer that succeeds replaces the file whole. Checked for the helper itself
and for every writer built on it (results.json, checkpoints, the data caches)."""

from __future__ import annotations

import errno
import json
import os
import stat

import numpy as np
import pytest
import torch

from segrefine import atomic
from segrefine.atomic import atomic_open, atomic_write_text
from segrefine.checkpoints import AtomicCheckpointIO
from segrefine.data import synthetic as synthetic_module
from segrefine.data.synthetic import SyntheticDataModule
from segrefine.record import RunRecord, read_document

OLD = b"old content, longer than the new one: " + bytes(range(256))


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(OLD)
    return path


def assert_untouched(path) -> None:
    assert path.read_bytes() == OLD
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_a_writer_failing_midway_keeps_the_old_file(target):
    with pytest.raises(OSError, match="No space left"):
        with atomic_open(target, "wb") as f:
            f.write(b"new bytes, half of them")
            f.flush()  # on disk in the temporary file: a direct write would have truncated the target
            full_disk()
    assert_untouched(target)


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_failing_fsync_or_rename_keeps_the_old_file(target, monkeypatch, step):
    monkeypatch.setattr(atomic.os, step, full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "the whole new text")
    assert_untouched(target)


def test_an_interrupt_keeps_the_old_file(target):
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(target, "w") as f:
            f.write("partial")
            raise KeyboardInterrupt
    assert_untouched(target)


def test_a_successful_write_replaces_the_file_whole(target):
    atomic_write_text(target, "new")
    assert target.read_bytes() == b"new"  # nothing of the longer old content remains
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    with atomic_open(target.parent / "sub" / "fresh.bin", "wb") as f:  # missing folders are made
        f.write(b"\x00\x01")
    assert (target.parent / "sub" / "fresh.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_open(target, "a"):
            pass
    assert target.read_bytes() == b"new"


def test_results_json_keeps_the_old_run_when_serialisation_fails_midway(tmp_path):
    RunRecord.new(metrics={"test/iou": 0.5}).write(tmp_path)
    before = (tmp_path / "results.json").read_bytes()
    # json.dump writes the document piece by piece: the keys before the bad value reach the file first.
    with pytest.raises(TypeError, match="not JSON serializable"):
        RunRecord.new(metrics={"test/iou": 0.75}, wandb={"id": object()}).write(tmp_path)
    assert (tmp_path / "results.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    RunRecord.new(metrics={"test/iou": float("nan")}).write(tmp_path)
    assert read_document(tmp_path)["metrics"] == {"test/iou": None}


def test_checkpoint_writer_keeps_the_previous_checkpoint_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 0, "weights": torch.arange(4.0)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # half a zip, then the disk is full
        f.write(b"PK\x03\x04 partial")
        full_disk()

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"epoch": 1, "weights": torch.zeros(4)}, path)
    assert path.read_bytes() == before and os.listdir(path.parent) == ["last.ckpt"]
    monkeypatch.setattr(torch, "save", real_save)
    io.save_checkpoint({"epoch": 1, "weights": torch.zeros(4)}, str(path))  # Lightning passes str paths
    assert torch.load(path, weights_only=True)["epoch"] == 1 and os.listdir(path.parent) == ["last.ckpt"]


def test_synthetic_cache_is_never_left_half_written(tmp_path, monkeypatch):
    dm = SyntheticDataModule(str(tmp_path), image_size=16, num_train=2, num_val=1, num_test=1)
    real_savez = np.savez
    calls = {"n": 0}

    def savez(f, **arrays):  # the 2nd split (val) hits a full disk after part of the archive
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"PK\x03\x04 partial")
            full_disk()
        return real_savez(f, **arrays)

    monkeypatch.setattr(synthetic_module.np, "savez", savez)
    with pytest.raises(OSError, match="No space left"):
        dm.prepare_data()
    names = sorted(p.name for p in dm.cache_dir.iterdir())
    assert names == ["settings.json", "train.npz"]  # val absent, not half there; no temp file
    assert json.loads((dm.cache_dir / "settings.json").read_text()) == dm.settings
    dm.prepare_data()  # the next run generates what is missing
    dm.setup()
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [2, 1, 1]
