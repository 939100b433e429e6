"""Which code made a run: the package version and, for a source checkout, its git commit.

Recorded in every results.json (``provenance``) and wandb run config, so a number can be
traced back to the code that produced it. Never fails a run: what cannot be found is None.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

GIT_TIMEOUT_S = 2.0  # a hung git (network file system, lock) must not hold up a run


def package_version() -> str | None:
    import segrefine

    version = getattr(segrefine, "__version__", None)
    if version:
        return str(version)
    from importlib.metadata import PackageNotFoundError, version as installed_version

    try:
        return installed_version("segrefine")
    except PackageNotFoundError:
        return None


def source_checkout() -> Path | None:
    """The repository root when segrefine runs from a git checkout of its own source
    (``<root>/src/segrefine``), else None: an installed copy inside some other repository
    (a project's virtualenv) must not report that repository's commit."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / ".git").exists():  # .git is a file in a worktree
        return root
    return None


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files differ from it) of the checkout at ``root``;
    (None, None) when git is missing, fails or takes longer than ``GIT_TIMEOUT_S``.

    Untracked files do not count as dirty (as ``git describe --dirty``): outputs and data
    lie in the checkout too."""
    try:
        # One call for both; --no-optional-locks so parallel jobs do not contend for the index lock.
        proc = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(root), "status", "--porcelain=v2", "--branch",
             "--untracked-files=no"],
            capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    if proc.returncode != 0:
        return None, None
    commit, dirty = None, False
    for line in proc.stdout.splitlines():
        if line.startswith("# branch.oid "):
            oid = line.split()[-1]
            commit = oid if oid != "(initial)" else None
        elif not line.startswith("#"):
            dirty = True
    return commit, dirty


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """``{"version", "git_commit", "git_dirty"}``; the git fields None outside a checkout.

    Computed once per process: the code a process runs is the code it imported at start."""
    root = source_checkout()
    commit, dirty = git_state(root) if root is not None else (None, None)
    return {"version": package_version(), "git_commit": commit, "git_dirty": dirty}
