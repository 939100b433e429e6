"""Every experiment x data source x preset composes and instantiates (data module and model),
the way lightning-hydra-template tests ``experiment=glob(*)``; tiny local fixtures stand in
for MSD, your-own-folder and Pascal VOC data."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONFIG_DIR, REPO
from segrefine.build import build_data, build_module
from test_datasets import folder_tree, voc_tree, write_msd_task

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
PRESETS = sorted(p.stem for p in (REPO / "conf" / "preset").glob("*.yaml"))
SOURCES = sorted(p.stem for p in (REPO / "conf" / "data").glob("*.yaml"))


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("sources")
    write_msd_task(base / "msd", n=5, shapes=[(35, 51, 35), (33, 47, 35), (35, 51, 35), (31, 49, 35), (35, 51, 35)])
    return {
        "msd": [f"data.root={base / 'msd'}", "data.split_fractions=[0.6,0.2,0.2]"],
        "folder": [f"data.root={folder_tree(base / 'folder')}", "data.mask_values={0:0,255:1}"],
        "voc": [f"data.root={voc_tree(base / 'voc')}", "data.val_fraction=0.34"],
        # Generating the preset's image counts (550 images at 320 px) takes minutes: the counts
        # shrink, the preset's image size stays.
        "synthetic": ["data.num_train=2", "data.num_val=2", "data.num_test=2"],
    }


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_every_preset_sizes_every_source_explicitly():
    # A source without its file would silently keep its own sizes under that preset.
    for preset in PRESETS:
        assert sorted(p.stem for p in (REPO / "conf" / "preset_data" / preset).glob("*.yaml")) == SOURCES


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_data_preset_composes_and_instantiates(experiment, source, preset, roots, data_dir, tmp_path):
    cfg = compose_train(f"experiment={experiment}", f"data={source}", f"preset={preset}", *roots[source],
                        f"paths.data_dir={data_dir}", f"paths.output_dir={tmp_path}", "logger=none")
    assert cfg.data.name == source and cfg.trainer.accelerator == {"smoke": "cpu", "full": "gpu"}[preset]
    datamodule = build_data(cfg)
    module = build_module(cfg, datamodule)
    assert module.num_classes == datamodule.num_classes
    if preset == "full":
        # the original study's schedule, whatever the source
        assert (cfg.data.batch_size, cfg.trainer.max_epochs, cfg.trainer.limit_train_batches) == (5, 80, 10)
        assert cfg.optim.optimizer.lr == 1e-3
        if experiment == "unet_crfrnn_table":  # the origin's decay: x0.9 after every epoch
            assert (cfg.optim.scheduler.gamma, cfg.optim.scheduler.step_size) == (0.9, None)
        else:
            assert cfg.optim.scheduler.power == 0.9


@pytest.mark.parametrize(("source", "key", "value"), [
    ("synthetic", "image_size", {"smoke": 64, "full": 320}),
    ("folder", "augment.crop_size", {"smoke": None, "full": [320, 320]}),
    ("voc", "augment.crop_size", {"smoke": [128, 128], "full": [320, 320]}),
    ("msd", "pad_to", {"smoke": None, "full": None}),
])
def test_preset_sizes_the_composed_source(source, key, value):
    for preset, expected in value.items():
        cfg = compose_train(f"data={source}", f"preset={preset}", "data.root=/data")
        node = cfg.data
        for part in key.split("."):
            node = node[part]
        assert (list(node) if node is not None else None) == expected if not isinstance(expected, int) else node == expected


def test_an_explicit_override_wins_over_the_preset():
    cfg = compose_train("experiment=paper_table", "data=msd", "data.root=/data", "data.batch_size=3", "trainer.max_epochs=2")
    assert (cfg.data.batch_size, cfg.trainer.max_epochs) == (3, 2)
