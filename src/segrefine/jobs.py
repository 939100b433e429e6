"""What guards a job of ``segrefine-train`` / ``segrefine-eval`` from the outside world: the
run-folder lock, the stop on SIGTERM / SIGINT, and short, true messages for the errors a
user causes (a full disk, no network for wandb, bad data or config).

Nothing here imports torch or Lightning (the command line answers ``--help`` without them).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from segrefine.atomic import disk_full

log = logging.getLogger(__name__)

LOCK_FILE = ".segrefine.lock"


class RunFolderError(RuntimeError):
    """The output folder belongs to another job (running, or finished with other results)."""


# -- the run-folder lock -------------------------------------------------------------------


def _describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')} (a {holder.get('job', 'segrefine')} job started "
            f"{holder.get('started')})")


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return isinstance(pid, int)  # someone else's live process; a malformed pid is no holder
    return True


@contextmanager
def run_folder_lock(folder: str | Path, job: str) -> Iterator[Path]:
    """Hold ``folder/.segrefine.lock`` (pid, host, start time) for the duration of a job.

    A second process on the same folder is refused, naming the holder. The lock is an
    ``flock`` on the file, which the kernel releases when its holder dies however it dies;
    a lock file left by a process that is gone (on this host: its pid is not running) is
    taken over with a message. A lock file naming a live process of this host that holds no
    flock (written by hand, or the flock does not work on this filesystem) is refused too."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "job": job, "slurm_job": os.environ.get("SLURM_JOB_ID")}
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_lock(fd)
            os.close(fd)
            raise RunFolderError(f"{folder} is in use by {_describe(holder)}; wait for it to end or choose another "
                                 "folder (hydra.run.dir=...)") from None
        try:  # the file may have been removed and recreated between open and flock: lock the one at the path
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        holder = _read_lock(fd)
        if holder and holder.get("pid") != me["pid"]:
            here = holder.get("host") == me["host"]
            requeued = holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]
            if here and _alive(holder.get("pid")) and not requeued:
                raise RunFolderError(f"{folder} is in use by {_describe(holder)} (its lock file {path}); wait for "
                                     f"it to end, or delete the lock file if that process is not a segrefine job")
            gone = "no longer running" if here else "its lock is released"
            log.warning("taking over the lock of %s: %s", _describe(holder), gone)
            print(f"segrefine: {folder}: taking over the stale lock of {_describe(holder)} ({gone})", flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield path
    finally:
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                path.unlink()  # still the flock holder: nobody else can have locked the file meanwhile
        except OSError:
            pass
        os.close(fd)


def _read_lock(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_first_process() -> bool:
    """Whether this process is rank 0 of its job (or the job's only process): the one that
    holds the folder's lock and records its end. Ranks Lightning starts by re-running the
    command (``LOCAL_RANK``), torchrun's (``RANK``, ``GROUP_RANK``), other nodes
    (``NODE_RANK``) and SLURM tasks (``SLURM_PROCID``) share rank 0's folder."""
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        try:
            if int(os.environ.get(key) or 0) != 0:
                return False
        except ValueError:
            continue
    return True


def foreign_folder_problem(folder: Path) -> str | None:
    """Why an evaluation may not write into ``folder`` whatever its config (None if it may):
    a training run's checkpoints, or results.json of a job other than an evaluation."""
    if (folder / "checkpoints").exists():
        return f"{folder} holds a training run's checkpoints: an evaluation there would mix its results with that run's"
    path = folder / "results.json"
    if not path.is_file():
        return None
    try:
        kind = json.loads(path.read_text()).get("job_type")
    except (OSError, ValueError, AttributeError):
        return f"{path} is unreadable: it may be another job's"
    if kind != "eval":
        whose = {"train": "a training run's"}.get(kind, f"a {kind!r} job's")
        return f"{path} holds {whose} results, which an evaluation would replace"
    return None


def _evaluation_results(folder: Path) -> str | None:
    try:
        kind = json.loads((folder / "results.json").read_text()).get("job_type")
    except (OSError, ValueError, AttributeError):
        return None  # none, or unreadable: the training job decides (an unreadable file is redone)
    return f"{folder / 'results.json'} holds an evaluation's results, which training would replace" if kind == "eval" else None


class FolderGuard(Callback):
    """Hydra callback: before a single run writes anything (Hydra writes ``.hydra/`` into the
    output folder before the job starts), refuse a folder another job is running in, and an
    evaluation's folder that holds a training run. The job itself checks again (and a sweep's
    folders are checked by their jobs)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_first_process():
            return  # a DDP rank started by rank 0 shares its folder
        folder = Path(str(config.hydra.run.dir))
        evaluation = "split" in config and "ckpt_path" in config and "backbone" not in config
        try:
            if folder.is_dir() and (folder / LOCK_FILE).exists():
                with run_folder_lock(folder, "eval" if evaluation else "train"):
                    pass
            problem = foreign_folder_problem(folder) if evaluation else _evaluation_results(folder)
            if problem:
                raise RunFolderError(f"{problem}; choose another output folder (hydra.run.dir=...)")
        except RunFolderError as error:
            print(f"segrefine: RunFolderError: {error}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None


# -- SIGTERM / SIGINT: stop at a safe point -------------------------------------------------


class JobInterrupted(Exception):
    """The job was stopped by a signal (a SLURM pre-emption, ``timeout``, ``kill``, Ctrl+C)."""

    def __init__(self, signum: int, forced: bool = False):
        self.signum = int(signum)
        self.signal_name = signal.Signals(self.signum).name
        self.forced = forced  # a second signal: stopped at once, not at a safe point
        super().__init__(f"interrupted by {self.signal_name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process killed by the signal: 143, 130


_STOP = {"signum": None, "deferred": 0}


@contextmanager
def defer_interrupts() -> Iterator[None]:
    """Inside, a first SIGTERM / SIGINT only asks to stop; ``check_interrupt`` (at the safe
    points: Lightning's batch ends) then raises. Outside, the signal raises at once."""
    _STOP["deferred"] += 1
    try:
        yield
    finally:
        _STOP["deferred"] = max(0, _STOP["deferred"] - 1)


def check_interrupt() -> None:
    if _STOP["signum"] is not None:
        raise JobInterrupted(_STOP["signum"])


def interruption(error: BaseException) -> JobInterrupted | None:
    """``error`` as the interruption it stands for: ours, Lightning's SIGTERMException (its own
    SIGTERM handler stops the loops too), or a KeyboardInterrupt from a handler not ours."""
    if isinstance(error, JobInterrupted):
        return error
    if type(error).__name__ == "SIGTERMException":
        return JobInterrupted(_STOP["signum"] or signal.SIGTERM)
    if isinstance(error, KeyboardInterrupt):
        return JobInterrupted(signal.SIGINT, forced=True)
    return None


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT stop the job instead of killing it (SIGTERM's default) or raising
    KeyboardInterrupt anywhere (SIGINT's): see ``defer_interrupts``. A second signal stops at
    once. A SIGTERM handler installed before (submitit's, which logs it) still runs; Lightning
    adds its own on top while it trains (its SLURM auto-requeue on SIGUSR1 is untouched)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        first = _STOP["signum"] is None
        if first:
            _STOP["signum"] = signum
        before = previous.get(signum)
        if signum == signal.SIGTERM and callable(before):
            before(signum, frame)
        if not first or not _STOP["deferred"]:
            raise JobInterrupted(signum, forced=not first)
        log.warning("received %s: stopping at the end of the current batch", signal.Signals(signum).name)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, before in previous.items():
            signal.signal(s, before)
        _STOP["signum"], _STOP["deferred"] = None, 0


# -- short, true errors ----------------------------------------------------------------------


def short_error(error: BaseException, output_dir: str | Path | None = None) -> str | None:
    """One or two lines for an error the user can fix (the culprit and the fix), or None for
    an error that needs its traceback (a bug)."""
    from segrefine.validation import ConfigValueError  # torch-free

    full = disk_full(error)
    if full is not None:
        where = Path(full.filename).parent if full.filename else output_dir or "the device"
        return f"no space left on {where}: free some (or choose another folder) and rerun to resume"
    kind = type(error)
    if kind.__module__.startswith("wandb"):
        return (f"wandb failed ({type(error).__name__}: {' '.join(str(error).split())[:200]}). To log without the "
                "server run offline: logger.mode=offline (or WANDB_MODE=offline), then upload with wandb sync")
    user_errors = (ConfigValueError, RunFolderError, *_optional_user_errors())
    if isinstance(error, user_errors):
        return " ".join(f"{kind.__name__}: {error}".split())
    return None


def _optional_user_errors() -> tuple[type, ...]:
    """Error types of modules that import torch: counted only when already loaded."""
    import sys

    found = []
    for module, name in (("segrefine.data.common", "DataError"), ("segrefine.checkpoints", "CheckpointError"),
                         ("segrefine.callbacks", "NonFiniteLossError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)
