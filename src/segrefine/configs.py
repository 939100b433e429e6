"""Where segrefine's Hydra configs are.

They ship inside the package as ``segrefine.conf`` (the repository's top-level ``conf/``,
mapped in pyproject.toml), so ``pip install .`` has them as well as ``pip install -e .``.
``SEGREFINE_CONFIG_DIR`` replaces the whole folder; to *add* configs (a data source, a head),
put them on Hydra's search path instead: ``--config-dir=DIR`` or ``hydra.searchpath=[file://DIR]``.
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path
from typing import Iterable

ENV_VAR = "SEGREFINE_CONFIG_DIR"


def _checkout_config_dir() -> Path | None:
    # Run from a source tree (<root>/src/segrefine): that tree's conf/, even where another
    # install's segrefine.conf is importable (a worktree on PYTHONPATH over an editable install).
    here = Path(__file__).resolve()
    conf = here.parents[2] / "conf"
    return conf if here.parents[1].name == "src" and (conf / "train.yaml").is_file() else None


def _installed_config_dir() -> Path | None:
    # find_spec locates the package without importing it (no __pycache__ in the config folder).
    try:
        spec = find_spec("segrefine.conf")
    except ModuleNotFoundError:
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]).resolve() if locations else None


def package_config_dir() -> Path:
    """The configs segrefine ships (whatever ``SEGREFINE_CONFIG_DIR`` says): nothing a run
    produces is written here."""
    return _checkout_config_dir() or _installed_config_dir() or Path(__file__).resolve().parent / "conf"


CONFIG_DIR = os.environ.get(ENV_VAR) or str(package_config_dir())


def check_config_dir() -> None:
    if Path(CONFIG_DIR, "train.yaml").is_file():
        return
    if os.environ.get(ENV_VAR):
        raise SystemExit(f"segrefine: {ENV_VAR}={CONFIG_DIR} holds no train.yaml; point it at a copy of segrefine's "
                         f"conf/ folder, or unset it to use the configs installed with the package")
    raise SystemExit(f"segrefine: no config at {CONFIG_DIR}/train.yaml: this install of segrefine lacks its conf/ "
                     "package data; reinstall it (pip install . or pip install -e . from the repository), "
                     f"or set {ENV_VAR} to a copy of the repository's conf/ folder")


def compose(config_name: str, overrides: Iterable[str] = ()):
    """The ``config_name`` config (``train``, ``eval``) with ``overrides``, composed from
    ``CONFIG_DIR`` outside a Hydra app (the study's jobs, the DenseCRF tuning)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


# The groups a user chooses from; the others (preset_data/*, paths, callbacks, hydra) are
# composed for them. `--help` lists these with their options (conf/hydra/help/).
USER_GROUPS = ("backbone", "head", "data", "trainer", "logger", "experiment", "preset", "metrics", "optim")


def group_options(*groups: str) -> str:
    """``group: option, option`` per group, as Hydra's loader sees them (the user's
    ``--config-dir`` included); for the ``--help`` template (resolver ``segrefine_groups``)."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    lines = []
    for group in groups or USER_GROUPS:
        if loader is not None:
            options = sorted(loader.get_group_options(group))
        else:
            options = sorted(p.stem for p in Path(CONFIG_DIR, group).glob("*.yaml"))
        lines.append(f"  {group}: {', '.join(options)}")
    return "\n".join(lines)


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("segrefine_groups", group_options, replace=True)


_register_resolvers()
