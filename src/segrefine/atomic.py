"""Whole-or-absent file writes: every file segrefine leaves (results, predictions, caches,
checkpoints, error notes) is written to a temporary file in the same folder, flushed to
disk, then renamed over the target, so a crash or a full disk never leaves half a file."""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_open(path, "w") as f: ...`` writes ``path`` atomically.

    The temporary file (``.<name>-*.tmp`` beside ``path``) is removed on any error and the
    target keeps its old content; on success it replaces the target (mode 0644)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if disk_full(error) is not None and not (isinstance(error, OSError) and error.filename):
            # e.g. torch reports a failed write as "unexpected pos": say what and where
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from error
        raise


def disk_full(error: BaseException | None) -> OSError | None:
    """The ENOSPC (or quota) error behind ``error`` (itself, its cause or context: torch reports
    a failed write as "unexpected pos" with the OSError as its context), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)
