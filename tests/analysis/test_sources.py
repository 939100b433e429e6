"""Folders become run records: load_study hands on RunRecords that write back the very file they
were read from, files of every schema report alike, a schema this version does not know is
listed, not guessed at, and results.json dicts given to the report read as records."""

from __future__ import annotations

import json
import shutil

from test_report import BASE, GAIN, eval_run, run

from segrefine.record import FILENAME, SCHEMA, RunRecord
from segrefine.report import load_study, study_protocol, summarise, to_csv, to_markdown_full


def small_study(root):
    """Two seeds of none and CRF-RNN (retrained) and a DenseCRF on seed 0's weights."""
    for seed in (0, 1):
        run(root / f"none{seed}", [b + 0.01 * seed for b in BASE], seed=seed)
        run(root / f"crf{seed}", [b + g + 0.005 * seed for b, g in zip(BASE, GAIN)], head="crfrnn", seed=seed)
    eval_run(root / "dense0", [b + g / 2 for b, g in zip(BASE, GAIN)],
             json.loads((root / "none0" / FILENAME).read_text())["config"])
    return root


def tables(runs):
    rows, duplicates = summarise(runs)
    return to_markdown_full(rows), to_csv(rows), duplicates


def test_load_study_hands_on_run_records_that_write_back_the_file_they_were_read(tmp_path):
    small_study(tmp_path)
    study = load_study([tmp_path])
    assert len(study.runs) == 5 and all(isinstance(r, RunRecord) for r in study.runs)
    for record in study.runs:
        path = tmp_path / record.location.rsplit("/", 1)[-1] / FILENAME
        assert record.location == str(path.parent)  # where it was read: not a results.json key
        assert record.to_dict() == json.loads(path.read_text())
        assert list(record.to_dict()) == list(json.loads(path.read_text()))  # and in the file's order
    dense = next(r for r in study.runs if r.head == "densecrf")
    assert (dense.job_type, dense.seed, dense.source["head"]) == ("eval", 0, "none")


def test_a_file_without_a_schema_key_reports_exactly_as_its_schema_1_twin(tmp_path):
    current = small_study(tmp_path / "current")
    old = tmp_path / "old"
    shutil.copytree(current, old)
    for path in old.rglob(FILENAME):
        document = json.loads(path.read_text())
        assert document.pop("schema") == SCHEMA
        path.write_text(json.dumps(document, indent=2))
    current_runs, old_runs = load_study([current]).runs, load_study([old]).runs
    assert [r.schema for r in old_runs] == [SCHEMA] * 5 and old_runs == current_runs  # == leaves location out
    markdown, csv_text, _ = tables(old_runs)
    assert (markdown, csv_text) == tables(current_runs)[:2]
    assert "crfrnn" in csv_text and "densecrf" in csv_text  # rows were compared, not two empty tables


def test_a_schema_newer_than_this_version_is_listed_with_the_fix_not_read(tmp_path):
    run(tmp_path / "ok", BASE)
    newer = run(tmp_path / "newer", BASE, head="crfrnn")
    newer.write_text(json.dumps({**json.loads(newer.read_text()), "schema": SCHEMA + 1}))
    study = load_study([tmp_path])
    assert [r.location for r in study.runs] == [str(tmp_path / "ok")]
    assert study.incomplete == [(str(tmp_path / "newer"), f"results.json schema {SCHEMA + 1} is newer than this "
                                                          f"segrefine reads ({SCHEMA}): upgrade segrefine to read it")]


def test_results_json_dicts_given_to_the_report_read_as_records(tmp_path):
    small_study(tmp_path)
    run(tmp_path / "again0", BASE, seed=0)  # a duplicate of none0: listed by folder, not averaged
    documents = []
    for path in sorted(tmp_path.rglob(FILENAME)):
        document = json.loads(path.read_text())
        del document["schema"]  # any schema, as from an older notebook
        documents.append({**document, "_path": str(path.parent)})
    assert tables(documents) == tables(load_study([tmp_path]).runs)
    _, _, duplicates = tables(documents)
    assert sorted(where for where, _ in duplicates) == [str(tmp_path / "again0"), str(tmp_path / "none0")]
    assert study_protocol(documents, None) == "standard"
