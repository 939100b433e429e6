"""segrefine as an installed package: the configs ship inside the wheel, a study runs from it,
users add their own configs through Hydra's search path, and tuned heads never land in the
install."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from importlib.metadata import distribution, version
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, REPO, subprocess_env
from segrefine import configs
from segrefine.tuning import SaveTunedHead

# A data source of the user's own: the shipped synthetic source with two values changed.
MYDATA = "defaults:\n  - synthetic\n  - _self_\nname: mydata\nimage_size: 48\n"


def source_version() -> str:
    """``__version__`` as written in src/segrefine/__init__.py (read, not imported)."""
    tree = ast.parse((REPO / "src" / "segrefine" / "__init__.py").read_text())
    return next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "__version__" for t in node.targets))


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def expected_mydata():
    """What ``data=mydata`` must compose to, from the shipped synthetic config."""
    data = OmegaConf.to_container(compose_train("data=synthetic").data)
    return {**data, "name": "mydata", "image_size": 48}


# -- the wheel ---------------------------------------------------------------------------------


def test_wheel_ships_the_configs_and_runs_from_a_fresh_venv(tmp_path):
    pytest.importorskip("setuptools", minversion="68")  # the build backend (pyproject's build-system)
    pytest.importorskip("wheel")
    # Build from a copy of what the wheel is made of, so the checkout gets no build/ or egg-info.
    source = tmp_path / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "--disable-pip-version-check", "-q", "-w", str(dist), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel_file,) = dist.glob("segrefine-*.whl")
    names = set(zipfile.ZipFile(wheel_file).namelist())

    # Every config file, every package under src/ (pyproject lists them by hand) and py.typed.
    yamls = {f"segrefine/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert len(yamls) > 30 and yamls <= names, sorted(yamls - names)
    packages = {p.parent.relative_to(REPO / "src").as_posix() for p in (REPO / "src").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= names, sorted(packages)
    assert "segrefine/py.typed" in names
    # One version source: the wheel's version is __version__.
    metadata = zipfile.ZipFile(wheel_file).read(f"segrefine-{source_version()}.dist-info/METADATA").decode()
    assert f"\nVersion: {source_version()}\n" in metadata

    # A fresh venv: segrefine from the wheel, the dependencies from this interpreter's
    # site-packages through plain path lines (they do not run an editable install's finder).
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    deps = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    assert deps, sys.path
    (purelib / "deps.pth").write_text("\n".join(deps) + "\n")
    # --ignore-installed: the segrefine in the deps' site-packages is never uninstalled.
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
                              "--disable-pip-version-check", "-q", str(wheel_file)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]

    env = {k: v for k, v in subprocess_env().items() if k not in ("PYTHONPATH", "SEGREFINE_CONFIG_DIR", "PYTHONHOME")}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = subprocess.run([str(python), "-c", "import segrefine, segrefine.configs as c; "
                            "print(segrefine.__file__); print(c.CONFIG_DIR)"],
                           capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    module_file, config_dir = map(Path, where.stdout.split())
    assert module_file.is_relative_to(env_dir.resolve()) or module_file.is_relative_to(env_dir)
    assert config_dir == module_file.parent / "conf"

    script = python.parent / ("segrefine-train.exe" if os.name == "nt" else "segrefine-train")
    job = subprocess.run([str(script), "--cfg", "job"], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    assert job.returncode == 0, job.stderr[-3000:]
    # The composed config is exactly the checkout's.
    assert yaml.safe_load(job.stdout) == OmegaConf.to_container(compose_train())

    # A study runs from the wheel, outside the repository: its plan composes and pairs.
    study = python.parent / ("segrefine-study.exe" if os.name == "nt" else "segrefine-study")
    plan = subprocess.run([str(study), "paper_table", "--plan-only", "--backbones", "fcn", "--heads", "none,pointrend",
                           "--out", str(cwd / "study")], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert plan.returncode == 0, plan.stdout[-2000:] + plan.stderr[-3000:]
    for row in ("| fcn-none-s0 | train | 0 |", "| fcn-densecrf_tuned-s0 | eval | 0 |", "| fcn-pointrend-s0 | train | 0 |"):
        assert row in plan.stdout, plan.stdout
    assert not (cwd / "study" / "train").exists()  # --plan-only runs nothing


def test_lightning_fabric_comes_with_pytorch_lightning():
    # Why pyproject declares no lightning-fabric: the pytorch-lightning wheel holds the module.
    assert any(f.parts[0] == "lightning_fabric" for f in distribution("pytorch-lightning").files or [])


def test_installed_lightning_and_wandb_are_inside_the_declared_ranges():
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {r.name: r.specifier for r in map(Requirement, project["dependencies"])}
    assert "version" in project["dynamic"] and "version" not in project  # one version source
    for name in ("pytorch-lightning", "wandb"):
        assert any(s.operator == "<" for s in declared[name]), f"{name}: no upper bound"
        assert version(name) in declared[name], (name, version(name), str(declared[name]))


# -- configs ----------------------------------------------------------------------------------


@pytest.fixture
def user_conf(tmp_path, monkeypatch):
    conf = tmp_path / "my_conf"
    (conf / "data").mkdir(parents=True)
    (conf / "data" / "mydata.yaml").write_text(MYDATA)
    monkeypatch.chdir(tmp_path)
    return conf


@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_user_configs_join_the_shipped_ones_on_the_command_line(user_conf, how, monkeypatch, capsys):
    from segrefine import train

    add = ["--config-dir=my_conf"] if how == "--config-dir" else [f"hydra.searchpath=[file://{user_conf}]"]
    monkeypatch.setattr(sys, "argv", ["segrefine-train", *add, "data=mydata", "--cfg", "job"])
    try:
        train.main()
    finally:
        GlobalHydra.instance().clear()
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"] == expected_mydata()
    assert printed["backbone"] == OmegaConf.to_container(compose_train().backbone)


def test_config_dir_errors_name_the_culprit(tmp_path, monkeypatch):
    monkeypatch.setattr(configs, "CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv(configs.ENV_VAR, str(tmp_path))
    with pytest.raises(SystemExit, match=f"SEGREFINE_CONFIG_DIR={tmp_path} holds no train.yaml"):
        configs.check_config_dir()
    monkeypatch.delenv(configs.ENV_VAR)
    with pytest.raises(SystemExit, match="lacks its conf/ package data; reinstall"):
        configs.check_config_dir()


def test_the_shipped_configs_are_this_checkouts():
    assert configs.package_config_dir() == REPO / "conf"


# -- tuned heads -------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def sweep_config(sweep: Path, best: dict[str, float]):
    sweep.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"best_params": best, "best_value": 0.5}), sweep / "optimization_results.yaml")
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "sweeper": {"n_trials": 2}}})


def test_tuned_heads_go_to_the_sweep_or_the_users_config_folder_never_the_package(tmp_path, user_conf):
    shipped = configs.package_config_dir()
    before = snapshot(shipped)
    best = {"head.gaussian_sxy": 2.5, "head.bilateral_compat": 0.25}

    default = SaveTunedHead()
    cfg = sweep_config(tmp_path / "sweep", best)
    default.on_multirun_start(cfg)
    default.on_multirun_end(cfg)
    saved = OmegaConf.load(tmp_path / "sweep" / "conf" / "head" / "densecrf_tuned.yaml")
    assert (saved.gaussian_sxy, saved.bilateral_compat, saved.name) == (2.5, 0.25, "densecrf_tuned")

    # Into the user's config folder, then usable there as head=densecrf_tuned.
    mine = SaveTunedHead(output=str(user_conf / "head" / "densecrf_tuned.yaml"))
    cfg = sweep_config(tmp_path / "sweep2", best)
    mine.on_multirun_start(cfg)
    mine.on_multirun_end(cfg)
    head = compose_train("head=densecrf_tuned", f"hydra.searchpath=[file://{user_conf}]").head
    expected = {**OmegaConf.to_container(compose_train("head=densecrf").head), "gaussian_sxy": 2.5,
                "bilateral_compat": 0.25, "name": "densecrf_tuned"}
    assert {k: v for k, v in OmegaConf.to_container(head).items() if k != "tuned"} == expected

    # Pointed into the package (by output, or a sweep folder inside it): refused before the sweep.
    for callback, cfg, culprit in [
        (SaveTunedHead(output=str(shipped / "head" / "densecrf_tuned.yaml")), sweep_config(tmp_path / "s3", best),
         "save_tuned_head.output="),
        (SaveTunedHead(), OmegaConf.create({"hydra": {"sweep": {"dir": str(shipped / "sweep")}}}), "hydra.sweep.dir="),
    ]:
        with pytest.raises(ValueError, match=f"{culprit}.*segrefine's own configs.*--config-dir"):
            callback.on_multirun_start(cfg)
        with pytest.raises(ValueError, match="segrefine's own configs"):
            callback.on_multirun_end(cfg)
    assert snapshot(shipped) == before
