"""results.json as a RunRecord: files written before it load unchanged and report identically,
records round-trip key for key, writes are atomic, and undefined numbers become null."""

from __future__ import annotations

import json
import math

import pytest
from test_report import BASE, GAIN, config

from segrefine.record import FILENAME, SCHEMA, RunRecord, load, migrate
from segrefine.report import load_study, summarise, to_csv, to_markdown_full


def old_writer(folder, payload):
    """How results.json was written before RunRecord (segrefine.results, before RunRecord),
    reproduced here so the test does not depend on the code under test."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILENAME
    path.write_text(json.dumps({"schema": 1, "status": "complete", **payload}, indent=2, allow_nan=False))
    return path


def payload(head, seed, ious, job_type="train"):
    cfg = config(head=head, seed=seed)
    rows = [{"id": f"img{i}", "iou": v, "dice": v, "pixel_acc": 0.9, "boundary_f1": v / 2} for i, v in enumerate(ious)]
    mean = sum(ious) / len(ious)
    metrics = {"test/iou": mean, "test/dice": mean, "test/pixel_acc": 0.9, "test/boundary_f1": mean / 2,
               "test/iou_image": mean, "test/boundary_f1_image": mean / 2, "test/ms_per_image": 2.0, "params": 10}
    return {"job_type": job_type, "experiment": "t", "data": "synthetic", "backbone": "unet", "head": head,
            "seed": seed, "config": cfg, "run_config": {"head": head}, "provenance": {"version": "0.1.0"},
            "label": "U-Net", "metrics": metrics, "per_image": rows, "checkpoint": "checkpoints/best.ckpt",
            "metrics_protocol": "standard", "metric_definitions": {"standard": "..."}, "boundary_tolerance_px": 1,
            "num_classes": 2, "class_names": ["background", "fg"], "predictions": None,
            "timing": {"device": "cpu"}, "wandb": {"id": "abc", "name": "n", "group": "g", "dir": "d", "mode": "offline"}}


def study_folder(root):
    for seed in (0, 1):
        old_writer(root / f"none{seed}", payload("none", seed, [b + 0.01 * seed for b in BASE]))
        old_writer(root / f"crf{seed}", payload("crfrnn", seed, [b + g for b, g in zip(BASE, GAIN)]))
    return root


def tables(folder):
    rows, _ = summarise(load_study([folder]).runs)
    return to_markdown_full(rows), to_csv(rows)


def test_a_schema_1_file_loads_into_fields_and_writes_back_byte_for_byte(tmp_path):
    path = old_writer(tmp_path / "run", payload("crfrnn", 3, BASE))
    record = load(path)
    assert (record.schema, record.status, record.head, record.seed) == (1, "complete", "crfrnn", 3)
    assert record.wandb == {"id": "abc", "name": "n", "group": "g", "dir": "d", "mode": "offline"}
    assert [r["iou"] for r in record.per_image] == BASE and record.predictions is None
    assert record.to_dict() == json.loads(path.read_text())
    again = record.write(tmp_path / "copy")
    assert again == tmp_path / "copy" / FILENAME and again.read_bytes() == path.read_bytes()


def test_a_study_rewritten_through_run_records_reports_identically(tmp_path):
    before = study_folder(tmp_path / "before")
    after = tmp_path / "after"
    for path in sorted(before.rglob(FILENAME)):
        load(path).write(after / path.parent.name)
    assert tables(after) == tables(before)
    assert "crfrnn" in tables(before)[1]  # the comparison holds rows, not two empty tables


def test_unknown_keys_survive_a_round_trip_in_their_place(tmp_path):
    document = {"schema": 1, "status": "complete", "note": "hand-added", "job_type": "train", "later_field": [1, 2]}
    (tmp_path / FILENAME).write_text(json.dumps(document))
    record = load(tmp_path)
    assert record.extra == {"note": "hand-added", "later_field": [1, 2]}
    assert list(record.to_dict().items()) == list(document.items())


def test_an_interrupted_record_names_its_signal_and_is_not_complete(tmp_path):
    record = RunRecord(status="interrupted", signal="SIGTERM", job_type="train", experiment="e", seed=0,
                       config={"seed": 0}, checkpoint="checkpoints/last.ckpt")
    loaded = load(record.write(tmp_path))
    assert not loaded.complete and loaded.signal == "SIGTERM"
    assert json.loads((tmp_path / FILENAME).read_text()) == {
        "schema": SCHEMA, "status": "interrupted", "signal": "SIGTERM", "job_type": "train", "experiment": "e",
        "seed": 0, "config": {"seed": 0}, "checkpoint": "checkpoints/last.ckpt"}


def test_undefined_numbers_are_written_as_null(tmp_path):
    record = RunRecord(metrics={"test/hd95": math.inf, "test/iou": math.nan, "test/dice": 0.5},
                       per_volume=[{"subject": "s1", "hd95": -math.inf}])
    document = json.loads(record.write(tmp_path).read_text())
    assert document["metrics"] == {"test/hd95": None, "test/iou": None, "test/dice": 0.5}
    assert document["per_volume"] == [{"subject": "s1", "hd95": None}]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = RunRecord(job_type="train", seed=1).write(tmp_path)
    previous = path.read_bytes()

    def dies(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", dies)
    with pytest.raises(OSError, match="No space"):
        RunRecord(job_type="train", seed=2).write(tmp_path)
    assert path.read_bytes() == previous and sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]


def test_a_record_without_a_schema_key_is_read_as_schema_1_and_a_newer_one_is_refused(tmp_path):
    assert migrate({"status": "complete", "seed": 1}) == {"schema": 1, "status": "complete", "seed": 1}
    (tmp_path / FILENAME).write_text(json.dumps({"schema": SCHEMA + 1, "status": "complete"}))
    with pytest.raises(ValueError, match=f"schema {SCHEMA + 1} is newer.*upgrade segrefine"):
        load(tmp_path)


def test_a_status_other_than_complete_or_interrupted_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="status='running' must be one of"):
        RunRecord(status="running").write(tmp_path)
    assert not (tmp_path / FILENAME).exists()


def test_a_json_list_is_not_a_run_record(tmp_path):
    (tmp_path / FILENAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list, not a run record"):
        load(tmp_path / FILENAME)


def test_a_record_a_job_builds_writes_what_the_old_writer_wrote_and_refuses_a_misspelt_field(tmp_path):
    fields = payload("crfrnn", 0, [0.5, 0.7])
    written = RunRecord.new(**fields).write(tmp_path / "new")
    assert written.read_text() == old_writer(tmp_path / "old", fields).read_text()
    assert json.loads(written.read_text())["predictions"] is None  # given as None: written as null
    with pytest.raises(TypeError, match="RunRecord has no field 'metric'"):
        RunRecord.new(metric={"test/iou": 0.5})


def test_where_a_record_was_read_is_known_but_never_written(tmp_path):
    # ``location`` is the reader's, not the file's: a document key of that name stays a document key.
    document = {"schema": 1, "status": "complete", "job_type": "train", "location": "a hand-added note"}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / FILENAME).write_text(json.dumps(document))
    record = load(tmp_path / "run" / FILENAME)
    assert record.location == str(tmp_path / "run") and record.extra == {"location": "a hand-added note"}
    assert record.to_dict() == document and load(tmp_path / "run").location == str(tmp_path / "run")
    written = json.loads(record.write(tmp_path / "copy").read_text())
    assert written == document and load(tmp_path / "copy") == record  # == leaves location out
