"""Sweeps (``python run.py -m``): the torch threads of one job of a parallel sweep, each
job's outcome reported to the sweep, a stop signal passed on to every job, and the line that
counts the outcomes at the end (the :class:`SweepSummary` Hydra callback)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from omegaconf import OmegaConf

from stablelora.records.summary import STATUSES  # the run statuses, counted in this order


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_num_threads(launcher_cfg, cores: int | None = None) -> int | None:
    """torch CPU threads for one job of a parallel (joblib) sweep: ``cores // n_jobs``, so
    that jobs do not oversubscribe the cores (two processes using every core each were
    measured about 8x slower); None (torch's default) outside such a sweep."""
    n_jobs = OmegaConf.select(launcher_cfg, "n_jobs") if launcher_cfg is not None else None
    if not n_jobs:
        return None
    cores = cores or available_cores()
    if n_jobs < 0:  # joblib: -1 uses every core, -2 all but one, ...
        n_jobs = max(cores + 1 + n_jobs, 1)
    return max(cores // n_jobs, 1)


# ---------------------------------------------------------------------------- sweeps
#: Set by :class:`SweepSummary` for the jobs of a multirun: the file they report to.
SWEEP_LOG_ENV = "STABLELORA_SWEEP_LOG"


#: The status a job reports when it starts (with its pid): whom a stopped sweep signals.
STARTED = "started"


def report_to_sweep(run_dir: Path, status: str) -> None:
    """A job's outcome (or :data:`STARTED`), one appended line in the sweep log, with the
    job's pid (a no-op outside a multirun)."""
    path = os.environ.get(SWEEP_LOG_ENV)
    if not path:
        return
    line = json.dumps({"run_dir": str(run_dir), "status": status, "pid": os.getpid()}) + "\n"
    with open(path, "a") as stream:  # one short append: atomic between processes
        stream.write(line)


def _stop_path() -> Path | None:
    path = os.environ.get(SWEEP_LOG_ENV)
    return Path(path + ".stop") if path else None


def stop_sweep(signum: int) -> None:
    """Mark the sweep as stopped by ``signum``: its jobs that have not started yet record
    themselves ``interrupted`` without running (a no-op outside a multirun)."""
    path = _stop_path()
    if path is not None and not path.exists():
        path.write_text(f"{signum}\n")


def sweep_stopped() -> int | None:
    """The signal that stopped this sweep (:func:`stop_sweep`), or None."""
    path = _stop_path()
    if path is None or not path.exists():
        return None
    text = path.read_text().strip()
    return int(text) if text.isdigit() else 0


def sweep_summary_line(outcomes: list[dict]) -> tuple[str, bool]:
    """``("sweep: 3 completed, 1 diverged, 1 failed (<dir>), 0 interrupted", any_failed)``:
    each job counted once, at its last outcome (a job a cluster preempted and requeued reports
    ``interrupted``, then how its resumed run ended)."""
    by_status: dict[str, list[str]] = {status: [] for status in STATUSES}
    last = {outcome["run_dir"]: outcome for outcome in outcomes}  # file order: the latest wins
    for outcome in last.values():
        by_status.setdefault(outcome["status"], []).append(outcome["run_dir"])
    counts = []
    for status, folders in by_status.items():
        text = f"{len(folders)} {status}"
        if status in ("failed", "interrupted") and folders:
            text += f" ({', '.join(sorted(folders))})"
        counts.append(text)
    return "stablelora sweep: " + ", ".join(counts), bool(by_status["failed"])


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency of the runner only
    Callback = object  # type: ignore[misc,assignment]  # a plain base class stands in


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): jobs report their status to
    a log file named in the environment (inherited by joblib workers and SLURM jobs); at the
    end of the multirun one line counts them and the process exits 1 if any job failed.

    A stop signal (SIGTERM, SIGUSR1, SIGUSR2; SIGINT too, which a terminal already sends to
    every process of the group) stops the sweep: the launching process passes it on to the
    jobs running in other processes (joblib workers), each of which checkpoints and records
    itself ``interrupted``; jobs not started yet record themselves ``interrupted`` without
    running; the line is printed and the process exits with 128 + the signal number."""

    def on_multirun_start(self, config, **kwargs) -> None:
        # Here, not at the top: run.py imports this module before Hydra starts, and
        # stablelora.runner.folder imports torch (seconds that `run.py --help` need not wait).
        from stablelora.runner.folder import STOP_SIGNALS

        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log = sweep_dir / f".outcomes-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
        log.touch()
        os.environ[SWEEP_LOG_ENV] = str(log.resolve())
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self.previous[signum] = signal.signal(signum, self._stop)

    def _stop(self, signum, frame) -> None:
        stop_sweep(signum)
        path = os.environ.get(SWEEP_LOG_ENV)
        if signum == signal.SIGINT or not path:
            return  # Ctrl-C reached every process of the terminal's group already
        for outcome in _outcomes(Path(path)):
            pid = outcome.get("pid")
            if outcome["status"] == STARTED and isinstance(pid, int) and pid != os.getpid():
                with contextlib.suppress(OSError):  # finished already
                    os.kill(pid, signum)

    def on_multirun_end(self, config, **kwargs) -> None:
        for signum, handler in getattr(self, "previous", {}).items():
            signal.signal(signum, handler)
        stopped = sweep_stopped()
        path = os.environ.pop(SWEEP_LOG_ENV, None)
        if not path or not Path(path).exists():
            return
        Path(path + ".stop").unlink(missing_ok=True)
        outcomes = [o for o in _outcomes(Path(path)) if o["status"] != STARTED]
        line, failed = sweep_summary_line(outcomes)
        print(line, flush=True)
        if stopped is not None:
            sys.exit(128 + stopped)
        if failed:
            sys.exit(1)


def _outcomes(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
