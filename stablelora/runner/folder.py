"""What keeps a run folder trustworthy: one process at a time (a lock), checkpoints that
survive a crash mid-write (the last two kept, each fsynced before its rename), and stop
signals that let the current step finish (SLURM preemption, Ctrl-C, submitit's requeue).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import torch

from stablelora.config.identity import computed_config
from stablelora.records.atomic import fsync_folder, writing
from stablelora.records.console import say
from stablelora.records.folder import RunFolder
from stablelora.records.layers import RecordsError
from stablelora.records.rows import flatten

#: What ``signal.signal`` takes and returns: a function, SIG_DFL / SIG_IGN, or None.
SignalHandler = Callable[[int, FrameType | None], Any] | int | None
#: The newest checkpoint first; a save shifts the newest to the second name.
CHECKPOINTS = ("checkpoint.pt", "checkpoint.prev.pt")
#: Signals that stop a run after its current step: SLURM's preemption and time limit
#: (SIGTERM), Ctrl-C (SIGINT) and the requeue signal of submitit (SIGUSR1 / SIGUSR2).
STOP_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
)


class RunFolderError(RuntimeError):
    """The run folder cannot be used as it is (held by another process, holds another
    configuration, unreadable checkpoints): one line saying what to do. Nothing is written
    into the folder."""


# ---------------------------------------------------------------------------- lock
class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``, held while a process runs the folder.

    The kernel drops the lock when the process dies (even by ``kill -9``), so a stale lock
    never blocks a rerun. The file names the holder (pid and host) for the error message.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._file: TextIO | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open while the run lasts
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderError(
                f"{self.path.parent} is being run by {holder}: two processes must not write "
                "one run folder; wait for it to finish (or stop it) and rerun."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint_file(payload: dict, run_dir: Path) -> Path:
    """Write ``checkpoint.pt`` keeping the previous one as ``checkpoint.prev.pt``.

    The new file is written under a temporary name and fsynced before any rename, so a kill
    or a full disk at any point leaves at least one complete checkpoint.
    """
    run_dir = Path(run_dir)
    newest, older = (run_dir / name for name in CHECKPOINTS)
    tmp = newest.with_name(newest.name + ".tmp")
    try:
        with writing(newest), open(tmp, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if newest.exists():
        os.replace(newest, older)
    os.replace(tmp, newest)
    fsync_folder(run_dir)
    return newest


def load_checkpoint_file(run_dir: Path, map_location) -> dict | None:
    """The newest readable checkpoint of ``run_dir``, or None when there is none.

    An unreadable newest checkpoint (truncated, empty, foreign) falls back to the older one
    with a one-line warning; when checkpoints exist but none can be read, one line says what
    to do (:class:`RunFolderError`).
    """
    run_dir = Path(run_dir)
    existing = [run_dir / name for name in CHECKPOINTS if (run_dir / name).exists()]
    problems = []
    for path in existing:
        try:
            # Our own file, holding Python RNG state: not loadable with weights_only.
            payload = torch.load(path, map_location=map_location, weights_only=False)
            if not isinstance(payload, dict) or "state" not in payload:
                raise ValueError("not a stablelora checkpoint")
        except Exception as error:  # noqa: BLE001 - any damage reads as "unreadable"
            problems.append(f"{path.name}: {type(error).__name__}")
            continue
        if problems:
            say(
                f"{'; '.join(problems)} cannot be read; resuming from {path.name} "
                f"(step {payload['state']['step']})."
            )
        return payload
    if existing:
        raise RunFolderError(
            f"no checkpoint in {run_dir} can be read ({'; '.join(problems)}): delete "
            f"{' and '.join(p.name for p in existing)} to restart the run from step 0, or "
            "rerun with trainer.resume=false."
        )
    return None


def remove_checkpoints(run_dir: Path) -> None:
    for name in CHECKPOINTS:
        (Path(run_dir) / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------- contents
def check_run_folder(run_dir: Path, config: dict) -> None:
    """Stop (one line) when ``run_dir`` already holds a run of another configuration (a
    folder belongs to exactly one resolved configuration, display-only keys aside), or when
    its ``config.yaml`` or ``summary.json`` cannot be read: the folder is left as found."""
    folder = RunFolder(run_dir)
    try:
        _ = folder.summary  # read and checked
    except RecordsError as error:
        raise RunFolderError(
            f"{error}: restore it, or delete it to run this run again (from its last "
            "checkpoint, or from step 0 if it has none)."
        ) from None
    try:
        stored = folder.stored_config
    except RecordsError as error:
        raise RunFolderError(
            f"{error}: restore it, or delete it if this folder holds this configuration's run "
            "(its name is the configuration's hash)."
        ) from None
    if stored is None:
        return
    flat_old, flat_new = flatten(computed_config(stored)), flatten(computed_config(config))
    differing = sorted(
        k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k)
    )
    if differing:
        shown = ", ".join(differing[:5]) + (", ..." if len(differing) > 5 else "")
        raise RunFolderError(
            f"{run_dir} holds a run of another configuration (differs in {shown}); its records "
            "are not reused: give another output folder or delete this one."
        )


def save_adapter(model, run_dir: Path) -> None:
    """peft's ``save_pretrained`` into a temporary folder renamed to ``adapter/``: a run whose
    ``adapter/`` exists has all of it."""
    target, tmp = run_dir / "adapter", run_dir / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(target):
            model.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


# ---------------------------------------------------------------------------- signals
class StopRequested(Exception):
    """A stop signal arrived during work that polls :func:`check_stop` (an evaluation): it
    ends that work at once; the runner checkpoints and records the run ``interrupted``."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


#: The stop signal received while a :class:`StopSignals` context is active (process-wide, so
#: that long loops deep in a task can poll it through :func:`check_stop`).
_stop_received: int | None = None
_depth = 0  # nested StopSignals contexts


def check_stop() -> None:
    """Raise :class:`StopRequested` once a stop signal has arrived in a run; call it once per
    evaluation batch, so that a stop is honoured within one batch (a cluster gives 30-90 s
    between SIGTERM and SIGKILL). Does nothing outside a run."""
    if _stop_received is not None:
        raise StopRequested(_stop_received)


class StopSignals:
    """Within the context, SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 only set :attr:`received` (and
    the flag :func:`check_stop` polls): the loop finishes its step (an evaluation its batch),
    checkpoints and stops. A second SIGINT stops at once
    (KeyboardInterrupt). Outside the main thread (where Python cannot install handlers)
    it does nothing.

    The handlers found on entry are put back on exit, so that a launcher's own handler
    (submitit's requeue) can run after the run has checkpointed: :func:`run_launcher_handler`.
    Contexts nest (``run_job`` holds one while a job starts, ``train`` its own): a signal the
    enclosing one caught is the inner one's from its entry, and the flag is cleared when the
    outermost one exits.
    """

    def __init__(self):
        self.received: int | None = None
        self.previous: dict[int, SignalHandler] = {}

    def _handle(self, signum, frame) -> None:
        global _stop_received
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = _stop_received = signum

    def __enter__(self) -> StopSignals:
        global _depth
        _depth += 1
        self.received = _stop_received  # one an enclosing context caught before this one
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        global _stop_received, _depth
        _depth -= 1
        if _depth == 0:
            _stop_received = None
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def run_launcher_handler(signum: int) -> None:
    """Once the run has checkpointed and :class:`StopSignals` has put the previous handlers
    back: run the one for ``signum`` if a launcher installed a Python function there
    (submitit's checkpoint-and-requeue); the defaults are left to the caller's exit."""
    handler = signal.getsignal(signum)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signum, None)
