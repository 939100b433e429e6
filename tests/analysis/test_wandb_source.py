"""The report on wandb runs: a fake wandb API holding runs in the layout training and
evaluation log (curated config plus experiment/provenance/split/source, summary metrics, a
per-image table file), built from the same records the folder tests write, so the two
paths must give the same table. Also the table as a data frame and as a logged wandb run."""

import json
import math
import sys
import types

import numpy as np
import pytest
from test_report import BASE, GAIN, eval_run, run

from segrefine.report import (
    COST,
    PROTOCOLS,
    WANDB_EXTRA_KEYS,
    Column,
    load_study,
    load_wandb_study,
    main,
    numeric_record,
    run_value,
    study_protocol,
    summarise,
    to_dataframe,
    to_markdown,
    to_markdown_full,
    wandb_filters,
    write_report,
)
from segrefine.record import read_document as read_results
from segrefine.runconfig import comparable_config

PROJECT = "team/segrefine"


class FakeFile:
    def __init__(self, text):
        self.text = text

    def download(self, replace=False, root="."):
        import io

        return io.StringIO(self.text)


class FakeRun:
    """A wandb run as the logging side leaves it, made from a results.json record."""

    def __init__(self, record, run_id, state="finished", source_id=None, nan="float", legacy=False):
        cfg = record["config"]
        split = record.get("split", "test")
        self.id, self.state, self.job_type = run_id, state, record["job_type"]
        names = (cfg["backbone"]["name"], cfg["head"]["name"], cfg["data"]["name"])
        self.group = record["experiment"] if legacy else "-".join(names)
        self.tags = [names[2], names[0], names[1], f"experiment:{record['experiment']}"]
        if legacy:  # before the layout: the resolved config, the experiment as the group
            self.config = dict(cfg)
        else:
            # Each run its own provenance: a report that kept it in the config would split rows.
            self.config = {**comparable_config(cfg), "experiment": record["experiment"],
                           "provenance": {"version": "0.1.0", "git_commit": f"c{run_id}", "git_dirty": False}}
        if record["job_type"] == "eval" and not legacy:
            source = record["source"]
            self.config["split"] = split
            self.config["source"] = {"checkpoint": source["checkpoint"], "run_id": source_id, "head": source["head"],
                                     "experiment": record["experiment"], "seed": source["seed"]}
        undefined = float("nan") if nan == "float" else "NaN"
        metrics = {k.replace("test/", f"{split}/", 1): undefined if v is None else v for k, v in record["metrics"].items()}
        table_path = f"media/table/{split}/per_image_{run_id}.table.json"
        self.summary = {**metrics, f"{split}/per_image": {"_type": "table-file", "path": table_path},
                        "params/trainable": metrics["params"], "train/fit_seconds": 3.5, "train/steps": 40,
                        "train/best_epoch": 7} if state == "finished" else {}
        rows = record["per_image"]
        columns = list(rows[0]) if rows else []
        data = [[undefined if r[c] is None else r[c] for c in columns] for r in rows]
        self.files = {table_path: json.dumps({"columns": columns, "data": data})}  # float NaN: a bare NaN

    def file(self, path):
        return FakeFile(self.files[path])


class FakeApi:
    """Returns every run whatever the filters: what the report keeps proves its own check."""

    def __init__(self, runs):
        self.all, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        assert path == PROJECT
        return list(self.all)


def fake_wandb_module(monkeypatch, api=None):
    """``wandb`` replaced in sys.modules: ``Api`` returns ``api``; ``init`` and ``Table`` record what they get."""
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # the fake Api stands for a logged-in one
    logged = {"init": None, "log": [], "finished": 0, "summary": {}}

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    class Run:
        id = "rep1"

        def __init__(self):
            self.summary = logged["summary"]

        def log(self, payload):
            logged["log"].append(payload)

    def init(**kwargs):
        logged["init"] = kwargs
        return Run()

    def finish():
        logged["finished"] += 1

    module = types.SimpleNamespace(Api=lambda: api, init=init, Table=Table, Image=lambda path: ("image", path),
                                   finish=finish)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return logged


def fake_run(folder, run_id, **kw):
    return FakeRun(read_results(folder), run_id, **kw)


def study_folders(root):
    """Two seeds of none and crfrnn (retrained), densecrf evaluated on the none checkpoints
    (same weights), a tuning evaluation on val, and a 320px none/crfrnn pair of one seed."""
    for seed in (0, 1):
        run(root / f"none{seed}", [b - 0.01 * seed for b in BASE], seed=seed)
        run(root / f"crf{seed}", [b + g - 0.02 * seed for b, g in zip(BASE, GAIN)], head="crfrnn", seed=seed)
        base_cfg = read_results(root / f"none{seed}")["config"]
        eval_run(root / f"dense{seed}", [b + g / 2 - 0.01 * seed for b, g in zip(BASE, GAIN)], base_cfg)
    eval_run(root / "tune0", BASE, read_results(root / "none0")["config"], split="val")
    run(root / "none320", [b - 0.1 for b in BASE], size=320)
    run(root / "crf320", [b - 0.05 for b in BASE], head="crfrnn", size=320)


def wandb_runs(root):
    """The wandb runs of ``study_folders``: eval runs name their training run by its wandb id."""
    ids = {name: f"id-{name}" for name in ("none0", "none1", "crf0", "crf1", "none320", "crf320")}
    runs = [fake_run(root / name, run_id) for name, run_id in ids.items()]
    runs += [fake_run(root / f"dense{s}", f"id-dense{s}", source_id=ids[f"none{s}"]) for s in (0, 1)]
    runs.append(fake_run(root / "tune0", "id-tune0", source_id=ids["none0"]))
    return runs


# -- the same runs read from folders and from wandb give the same table ----------------------------


def test_wandb_rows_and_pairing_equal_those_from_the_runs_folders(tmp_path):
    study_folders(tmp_path)
    folder_study = load_study([tmp_path])
    wandb_study = load_wandb_study(PROJECT, api=FakeApi(wandb_runs(tmp_path)))
    assert len(wandb_study.runs) == len(folder_study.runs) == 8
    assert wandb_study.skipped == [(f"{PROJECT}/id-tune0", "split 'val' (tuning evaluation), not a test result")]
    assert [r for _, r in folder_study.skipped] == [r for _, r in wandb_study.skipped] and not wandb_study.incomplete
    assert all(not set(WANDB_EXTRA_KEYS) & set(r.config) for r in wandb_study.runs)
    folder_rows, _ = summarise(folder_study.runs)
    wandb_rows, _ = summarise(wandb_study.runs)
    assert [(r.label, r.head, r.pairing) for r in wandb_rows] == [(r.label, r.head, r.pairing) for r in folder_rows]
    pairs = {(r.label, r.head): (r.baseline.label, r.pairing) for r in wandb_rows if r.baseline}
    assert pairs == {("U-Net, 320 px", "crfrnn"): ("U-Net, 320 px", "retrained"), ("U-Net", "crfrnn"): ("U-Net", "retrained"),
                     ("U-Net", "densecrf"): ("U-Net", "same weights")}
    for ours, theirs in zip(wandb_rows, folder_rows):
        assert numeric_record(ours, "standard") == numeric_record(theirs, "standard")
    assert to_markdown(wandb_rows) == to_markdown(folder_rows)
    dense = next(r for r in wandb_rows if r.head == "densecrf")
    assert dense.stats["test/iou_image"]["per_seed"] == pytest.approx([np.mean(GAIN) / 2] * 2)


def test_an_eval_of_another_training_run_is_retrained_not_same_weights(tmp_path):
    study_folders(tmp_path)
    runs = [r for r in wandb_runs(tmp_path) if r.id != "id-dense1"]
    runs.append(fake_run(tmp_path / "dense1", "id-dense1", source_id="id-elsewhere"))
    rows, _ = summarise(load_wandb_study(PROJECT, api=FakeApi(runs)).runs)
    assert next(r for r in rows if r.head == "densecrf").pairing == "mixed"  # seed 0 same weights, seed 1 not


def test_runs_logged_before_the_layout_are_read_with_their_group_as_experiment(tmp_path):
    study_folders(tmp_path)
    runs = [fake_run(tmp_path / n, f"id-{n}", legacy=True) for n in ("none0", "crf0", "none1", "crf1")]
    study = load_wandb_study(PROJECT, api=FakeApi(runs), experiment="t")
    assert {r.experiment for r in study.runs} == {"t"} and len(study.runs) == 4
    rows, _ = summarise(study.runs)
    folder_rows, _ = summarise([r for r in load_study([tmp_path]).runs if r.location.split("/")[-1] in
                                ("none0", "crf0", "none1", "crf1")])
    assert to_markdown(rows) == to_markdown(folder_rows)


# -- filters: sent to the server and checked again --------------------------------------------------


def selection_runs(tmp_path):
    """Runs differing in group (backbone/head), job type, experiment and tags."""
    records = []
    for i, (backbone, head, job, experiment) in enumerate((
            ("unet", "none", "train", "a"), ("unet", "crfrnn", "train", "a"), ("fcn", "none", "train", "a"),
            ("unet", "none", "train", "b"))):
        path = run(tmp_path / f"r{i}", BASE, head=head, backbone=backbone, seed=i)
        record = read_results(path)
        record["experiment"] = experiment
        records.append(FakeRun(record, f"r{i}"))
    dense = eval_run(tmp_path / "e4", BASE, read_results(tmp_path / "r0")["config"])
    records.append(FakeRun({**read_results(dense), "experiment": "a"}, "e4", source_id="r0"))
    records[1].tags.append("final")
    records[4].tags.append("final")
    return records


@pytest.mark.parametrize("filters, server, kept", [
    ({"group": "unet-none-synthetic", "experiment": "a"},
     {"$and": [{"group": "unet-none-synthetic"}, {"$or": [{"config.experiment": "a"}, {"$and": [
         {"config.experiment": {"$exists": False}}, {"group": "a"}]}]}]}, ["r0"]),
    ({"job_type": "eval", "experiment": "a"}, None, ["e4"]),
    ({"experiment": "a", "tags": ["final", "unet"]}, None, ["r1", "e4"]),
    ({"experiment": "a", "tags": ["final", "fcn"]}, None, []),
    ({"experiment": "b"}, None, ["r3"]),
])
def test_filters_go_to_the_server_and_are_checked_here(tmp_path, filters, server, kept):
    api = FakeApi(selection_runs(tmp_path))
    study = load_wandb_study(PROJECT, api=api, **filters)
    assert [r.location.rsplit("/", 1)[-1] for r in study.runs] == kept
    expected = wandb_filters(**filters)
    assert api.calls == [(PROJECT, expected)]
    if server is not None:
        assert expected == server
    conditions = expected["$and"] if "$and" in expected else [expected]
    for tag in filters.get("tags", []):
        assert {"tags": {"$in": [tag]}} in conditions  # one condition per tag: all of them, not any
    if "job_type" in filters:
        assert {"jobType": filters["job_type"]} in conditions


def test_filters_on_the_command_line(tmp_path, monkeypatch, capsys):
    api = FakeApi(selection_runs(tmp_path))
    fake_wandb_module(monkeypatch, api)
    out = tmp_path / "report"
    assert main(["--wandb", PROJECT, "--experiment", "a", "--tag", "final", "--tag", "unet", "--job-type", "train",
                 "--group", "unet-crfrnn-synthetic", "--no-figures", "--out", str(out)]) == 0
    (_, filters), = api.calls
    assert filters == wandb_filters("unet-crfrnn-synthetic", "train", "a", ["final", "unet"])
    assert "| U-Net | CRF-RNN | – |" in capsys.readouterr().out  # no baseline selected: no Δ
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--experiment", "a"])
    assert "--experiment select runs of a wandb project: add --wandb" in capsys.readouterr().err


def test_runs_of_several_experiments_are_refused_without_experiment(tmp_path, monkeypatch, capsys):
    runs = selection_runs(tmp_path)
    legacy = run(tmp_path / "old", BASE, seed=7)
    runs.append(FakeRun({**read_results(legacy), "experiment": "c"}, "old", legacy=True))
    runs.append(FakeRun({**read_results(legacy), "experiment": "c"}, "old-crashed", state="crashed", legacy=True))
    with pytest.raises(ValueError, match=r"3 experiments: a \(4 runs\), b \(1 run\), c \(2 runs\).*--experiment"):
        load_wandb_study(PROJECT, api=FakeApi(runs))
    fake_wandb_module(monkeypatch, FakeApi(runs))
    assert main(["--wandb", PROJECT, "--no-figures", "--out", str(tmp_path / "report")]) == 2
    assert "choose one with --experiment NAME" in capsys.readouterr().err
    study = load_wandb_study(PROJECT, api=FakeApi(runs), experiment="c")
    assert [r.location for r in study.runs] == [f"{PROJECT}/old"]
    assert study.incomplete == [(f"{PROJECT}/old-crashed", "wandb state 'crashed'")]


# -- what the folder path does, the wandb path does too -------------------------------------------


@pytest.mark.parametrize("nan", ["float", "string"])
def test_nan_from_wandb_is_treated_as_null_in_results_json(tmp_path, nan):
    run(tmp_path / "none", BASE)
    path = run(tmp_path / "crf", [b + g for b, g in zip(BASE, GAIN)], head="crfrnn")
    record = read_results(path)
    record["per_image"][3]["iou"] = None  # what results.json stores for NaN
    record["metrics"]["test/boundary_f1"] = None
    path.write_text(json.dumps(record))
    folder_rows, _ = summarise(load_study([tmp_path]).runs)
    study = load_wandb_study(PROJECT, api=FakeApi([fake_run(tmp_path / "none", "n", nan=nan),
                                                   fake_run(tmp_path / "crf", "c", nan=nan)]))
    crf = next(r for r in study.runs if r.location.endswith("/c"))
    assert crf.per_image[3]["iou"] is None and crf.per_image[3]["boundary_f1"] == record["per_image"][3]["boundary_f1"]
    assert crf.metrics["test/boundary_f1"] is None
    rows, _ = summarise(study.runs)
    # A null per-image value is missing data: its pair is left out (and counted), never a number in the Δ.
    assert rows[1].notes == ["Δ IoU % (img mean): 1 image pairs with a non-finite value left out"]
    kept = [g for i, g in enumerate(GAIN) if i != 3]
    assert rows[1].stats["test/iou_image"]["mean"] == pytest.approx(np.mean(kept))
    assert rows[1].stats["test/iou_image"]["dropped"] == 1 and rows[1].stats["test/boundary_f1_image"]["dropped"] == 0
    assert to_markdown(rows) == to_markdown(folder_rows)
    assert "| U-Net | crfrnn | retrained | 1 | 58.05 | 57.05 | 90.00 | – |" in to_markdown_full(rows)


def test_duplicate_wandb_runs_are_listed_not_averaged(tmp_path, monkeypatch, capsys):
    run(tmp_path / "first", [0.5] * 4)
    run(tmp_path / "again", [0.9] * 4)  # same config and seed: e.g. a job run twice
    run(tmp_path / "seed1", [0.6] * 4, seed=1)
    runs = [fake_run(tmp_path / name, name) for name in ("again", "first", "seed1")]  # the folders' order
    rows, duplicates = summarise(load_wandb_study(PROJECT, api=FakeApi(runs)).runs)
    _, folder_duplicates = summarise(load_study([tmp_path]).runs)
    assert sorted(p for p, _ in duplicates) == [f"{PROJECT}/again", f"{PROJECT}/first"]
    assert rows[0].seeds == [1] and len(rows) == 1
    strip = lambda items, prefix: sorted(r.replace(prefix, "") for _, r in items)  # noqa: E731
    assert strip(duplicates, f"{PROJECT}/") == strip(folder_duplicates, f"{tmp_path}/")
    fake_wandb_module(monkeypatch, FakeApi(runs))
    assert main(["--wandb", PROJECT, "--no-figures", "--out", str(tmp_path / "report")]) == 0
    assert f"- {PROJECT}/first: duplicate: same config and seed 0" in capsys.readouterr().out


def test_the_metric_protocol_comes_from_the_summary_or_an_old_resolved_config(tmp_path):
    run(tmp_path / "none", BASE)
    run(tmp_path / "crf", BASE, head="crfrnn")
    new, old = fake_run(tmp_path / "none", "n"), fake_run(tmp_path / "crf", "c", legacy=True)
    new.summary["metrics_protocol"] = "unet_crfrnn"
    old.config["metrics"] = {"protocol": "unet_crfrnn"}
    study = load_wandb_study(PROJECT, api=FakeApi([new, old]), experiment="t")
    assert [r.metrics_protocol for r in study.runs] == ["unet_crfrnn", "unet_crfrnn"]
    assert study_protocol(study.runs, None) == "unet_crfrnn"
    del new.summary["metrics_protocol"]  # not recorded: the default, standard, which then differs
    with pytest.raises(ValueError, match="different metric protocols"):
        study_protocol(load_wandb_study(PROJECT, api=FakeApi([new, old]), experiment="t").runs, None)


# -- the table as a data frame ------------------------------------------------------------------


def fake_pandas(monkeypatch):
    class DataFrame:
        @classmethod
        def from_records(cls, records, columns):
            frame = cls()
            frame.records, frame.columns = records, columns
            return frame

    monkeypatch.setitem(sys.modules, "pandas", types.SimpleNamespace(DataFrame=DataFrame))


def two_seed_study(root):
    for seed in (0, 1):
        run(root / f"n{seed}", [b - 0.02 * seed for b in BASE], seed=seed)
        run(root / f"c{seed}", [b + g - 0.01 * seed for b, g in zip(BASE, GAIN)], head="crfrnn", seed=seed)
    return load_study([root])


def test_to_dataframe_has_the_report_rows_numbers(tmp_path, monkeypatch):
    fake_pandas(monkeypatch)
    study = two_seed_study(tmp_path / "runs")
    report = write_report(study, tmp_path / "report", figures=False)
    frame = to_dataframe(report)
    assert to_dataframe(study).records == frame.records  # a Study is summarised the same way
    assert list(frame.records[0]) == frame.columns
    none, crf = frame.records
    assert (none["configuration"], none["backbone"], none["head"], none["protocol"]) == ("U-Net", "unet", "none",
                                                                                          "standard")
    assert none["pairing"] == "baseline" and crf["pairing"] == "retrained" and crf["baseline"] == "U-Net"
    assert none["n_seeds"] == crf["n_seeds"] == 2
    # By hand: the fabricated test/iou is the mean per-image IoU + 0.01.
    crf_iou = [np.mean([b + g - 0.01 * s for b, g in zip(BASE, GAIN)]) + 0.01 for s in (0, 1)]
    assert crf["test/iou_mean"] == pytest.approx(np.mean(crf_iou))
    assert crf["test/iou_std"] == pytest.approx(np.std(crf_iou, ddof=1))
    assert crf["delta_iou_mean"] == pytest.approx(np.mean(GAIN) + 0.005)  # seed 1: +0.02 - 0.01 on the baseline's
    assert crf["test/ms_per_image_mean"] == pytest.approx(1.5) and crf["params"] == 10.0
    test = report.rows[1].stats["test/iou_image"]
    for stat in ("mean", "std", "ci_low", "ci_high", "p", "p_holm", "n"):
        assert crf[f"delta_iou_{stat}"] == pytest.approx(test[stat]) and isinstance(crf[f"delta_iou_{stat}"], float)
    assert crf["delta_iou_level"] == "seeds"
    assert math.isnan(none["delta_iou_mean"]) and math.isnan(none["delta_boundary_f1_p_holm"])  # no Δ for a baseline
    text = {"configuration", "backbone", "head", "protocol", "pairing", "baseline", "plain_baseline", "tuning", "n_seeds"}
    assert crf["delta_iou_unit"] == "seeds" and crf["delta_iou_same_as"] == ""
    assert all(isinstance(v, float) for k, v in crf.items()
               if k not in text and not k.endswith(("_level", "_unit", "_same_as")))


def test_to_dataframe_follows_the_protocol_and_says_when_pandas_is_missing(tmp_path, monkeypatch):
    fake_pandas(monkeypatch)
    study = two_seed_study(tmp_path)
    frame = to_dataframe(study, protocol="unet_crfrnn")
    keys = [c.key for c in (*PROTOCOLS["unet_crfrnn"]["paired"], COST)]
    assert [c for c in frame.columns if c.endswith("_mean") and c.startswith("test/")] == [f"{k}_mean" for k in keys]
    assert frame.records[1]["protocol"] == "unet_crfrnn"
    rows, _ = summarise(study.runs, "unet_crfrnn")
    column = Column("test/unet_crfrnn/iu", "", "unet_crfrnn/iu")
    assert frame.records[1]["test/unet_crfrnn/iu_mean"] == pytest.approx(
        np.mean([run_value(r, column) for r in rows[1].runs.values()]))
    assert to_dataframe([], protocol="standard").records == [] and "delta_iou_p_holm" in to_dataframe([]).columns
    monkeypatch.setitem(sys.modules, "pandas", None)  # import fails
    with pytest.raises(ImportError, match="to_dataframe needs pandas: pip install pandas"):
        to_dataframe(study)


def test_to_dataframe_with_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    report = write_report(two_seed_study(tmp_path / "runs"), tmp_path / "report", figures=False)
    frame = to_dataframe(report)
    assert isinstance(frame, pd.DataFrame) and len(frame) == 2
    assert frame["test/iou_mean"].dtype == np.float64 and frame["delta_iou_p_holm"].dtype == np.float64
    assert frame.loc[1, "delta_iou_mean"] == pytest.approx(report.rows[1].stats["test/iou_image"]["mean"])
    assert frame["n_seeds"].tolist() == [2, 2]


# -- the table logged to wandb --------------------------------------------------------------------


def test_log_wandb_options_and_numeric_columns(tmp_path, monkeypatch, capsys):
    two_seed_study(tmp_path / "runs")
    logged = fake_wandb_module(monkeypatch)
    assert main([str(tmp_path / "runs"), "--no-figures", "--out", str(tmp_path / "report"), "--log-wandb",
                 "--wandb-mode", "online", "--wandb-project", "p", "--wandb-entity", "team", "--wandb-group", "g"]) == 0
    init = logged["init"]
    assert (init["mode"], init["project"], init["entity"], init["group"], init["job_type"]) == (
        "online", "p", "team", "g", "report")
    assert init["name"] == "report-t" and init["tags"] == ["report", "t", "standard"]
    assert init["config"]["sources"] == ["runs"] and logged["finished"] == 1  # no machine path
    assert str(tmp_path) not in json.dumps(init["config"])
    rows, _ = summarise(load_study([tmp_path / "runs"]).runs)
    main_table = logged["log"][0]["report/table"]
    crf_main = dict(zip(main_table.columns, main_table.data[1]))
    assert (crf_main["configuration"], crf_main["head"], crf_main["paired_n"]) == ("U-Net", "crfrnn", 2)
    assert crf_main["delta"] == rows[1].stats["test/iou_image"]["mean"] and crf_main["test"] == "seeds"
    assert logged["summary"] == {"delta iou/U-Net · crfrnn": rows[1].stats["test/iou_image"]["mean"]}
    table = logged["log"][0]["report/table_full"]
    crf = dict(zip(table.columns, table.data[1]))
    test = rows[1].stats["test/iou_image"]
    for stat in ("mean", "ci_low", "ci_high", "p", "p_holm"):
        assert crf[f"delta_iou_{stat}"] == test[stat] and type(crf[f"delta_iou_{stat}"]) is float
    for key in ("test/iou_mean", "test/iou_std", "test/boundary_f1_image_mean", "test/ms_per_image_mean"):
        assert type(crf[key]) is float
    assert crf["test/iou_mean"] == pytest.approx(np.mean([run_value(r, Column("test/iou", ""))
                                                          for r in rows[1].runs.values()]))
    assert "wandb run: rep1" in capsys.readouterr().out
    logged = fake_wandb_module(monkeypatch)
    assert main([str(tmp_path / "runs"), "--no-figures", "--out", str(tmp_path / "report"), "--log-wandb"]) == 0
    assert (logged["init"]["mode"], logged["init"]["project"], logged["init"]["group"]) == ("offline", "segrefine",
                                                                                           "report-t")
