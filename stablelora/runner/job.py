"""``run_job``: what ``run.py`` calls. It runs :func:`stablelora.runner.train.train` and turns
every way a run can end into records, one line and an exit code: a config error (exit code 2, no
folder left behind), a busy or foreign run folder, short or damaged records (left as found), a
full disk, a stop signal (``interrupted``, resumable), any other error (``failed``, with its
traceback). A diverged run is a result (exit code 0).
"""

from __future__ import annotations

import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

from stablelora.config.check import check_config
from stablelora.config.errors import CONFIG_ERROR_EXIT, ConfigError
from stablelora.config.spec import RunSpec, plain_config
from stablelora.records.atomic import FULL_DISK
from stablelora.records.console import result_table
from stablelora.records.folder import RunFolder
from stablelora.records.layers import RecordsError
from stablelora.records.summary import make_summary, write_json_atomic
from stablelora.runner.folder import RunFolderError, StopSignals, run_launcher_handler
from stablelora.runner.sweep import STARTED, report_to_sweep, stop_sweep, sweep_stopped
from stablelora.runner.train import RunInterrupted, train
from stablelora.tasks import task_record


def run_job(cfg, run_dir: Path, multirun: bool = False):
    """Train, turning errors into records and one line each: a bad config (its run folder
    removed when it holds nothing but Hydra's files); a folder that is busy, holds another
    configuration or has only damaged checkpoints (nothing recorded in it); short or damaged
    records (left as found, to be repaired); a full disk; a stop signal (``interrupted``,
    resumable). Any other error marks the run ``failed`` with its traceback. In a multirun a
    failed job is recorded and the sweep goes on (the sweep summary counts it); in a single
    run the process exits non-zero. A diverged run is a result: exit code 0."""

    spec: RunSpec | None = None  # the checked config, once check_config has returned it

    def fail(message: str, record: bool = True, trace: str | None = None, code: int = 1):
        if record:
            _record_failure(spec or cfg, run_dir, message, trace)
        report_to_sweep(run_dir, "failed")
        if multirun:
            print(f"stablelora: {run_dir.name}: {message}", file=sys.stderr)
            return None
        if code == 1:
            sys.exit(f"stablelora: {message}")  # one line on stderr, exit code 1
        print(f"stablelora: {message}", file=sys.stderr, flush=True)
        sys.exit(code)  # CONFIG_ERROR_EXIT for a usage error

    run_dir = Path(run_dir)
    if multirun and sweep_stopped() is not None:  # a stop signal ended the sweep before it
        report_to_sweep(run_dir, "interrupted")
        print(
            f"stablelora: {run_dir} not started: the sweep was stopped by signal "
            f"{sweep_stopped()}; rerun the same command to resume it.",
            file=sys.stderr,
            flush=True,
        )
        return None
    try:
        # From here a stop signal (one the sweep passes on too) is kept for the training loop.
        with StopSignals():
            report_to_sweep(run_dir, STARTED)  # the sweep passes a stop signal on to this pid
            spec = check_config(cfg)
            summary = train(cfg, run_dir, spec)
    except ConfigError as error:  # found before training: nothing is left behind
        _remove_unused(run_dir)
        return fail(f"config error: {error}", record=False, code=CONFIG_ERROR_EXIT)
    except RunFolderError as error:
        return fail(str(error), record=False)
    except RecordsError as error:  # the records are left as found, to be repaired
        return fail(str(error), record=False)
    except RunInterrupted as error:
        report_to_sweep(run_dir, "interrupted")
        print(
            f"stablelora: {run_dir} interrupted by signal {error.signum} after step "
            f"{error.step} (checkpoint saved); rerun the same command to resume.",
            file=sys.stderr,
            flush=True,
        )
        run_launcher_handler(error.signum)  # e.g. submitit: requeue the job
        if multirun:  # the sweep stops: its line and exit code come at its end
            stop_sweep(error.signum)
            return None
        sys.exit(128 + error.signum if error.signum else 1)
    except OSError as error:
        if error.errno not in FULL_DISK:
            return fail(f"{type(error).__name__}: {error}", trace=traceback.format_exc())
        what, fix = FULL_DISK[error.errno]
        return fail(
            f"{what} ({error.filename or run_dir} could not be written): {fix} and rerun the "
            "same command to resume from the last checkpoint."
        )
    except Exception as error:
        message, trace = f"{type(error).__name__}: {error}", traceback.format_exc()
        _record_failure(spec or cfg, run_dir, message, trace)
        report_to_sweep(run_dir, "failed")
        if multirun:
            print(f"stablelora: run {run_dir} failed: {error}", file=sys.stderr)
            return None
        raise
    report_to_sweep(run_dir, summary["status"])
    if int(os.environ.get("RANK", "0")) == 0:
        print(result_table(summary) + f"\nrecords: {run_dir}")
    return summary


#: What a run folder holds before its run has recorded anything: Hydra's copy of the config
#: and its log, the lock and the resolved config.
UNUSED_FOLDER = (".hydra", ".lock", "config.yaml")


def _remove_unused(run_dir: Path) -> None:
    """Remove ``run_dir`` when it holds nothing but :data:`UNUSED_FOLDER` and logs (a config
    error found before training); a folder with records is left as it is."""
    if int(os.environ.get("RANK", "0")) != 0 or not run_dir.is_dir():
        return
    names = [path.name for path in run_dir.iterdir()]
    if all(name in UNUSED_FOLDER or name.endswith(".log") for name in names):
        shutil.rmtree(run_dir, ignore_errors=True)


def _record_failure(
    spec: RunSpec | Any, run_dir: Path, message: str, trace: str | None = None
) -> None:
    """A ``failed`` summary of the run of ``spec`` (a config that failed before its check
    returned: that config node); on a full disk this write may fail too, and then the previous
    summary stays (it is replaced atomically)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    run_dir = Path(run_dir)
    steps = [row["step"] for row in RunFolder(run_dir).metrics]
    config = spec.config if isinstance(spec, RunSpec) else plain_config(spec)
    task = spec.task if isinstance(spec, RunSpec) else config.get("task")
    summary = make_summary(
        "failed",
        config,
        error=message,
        traceback=trace,
        steps=max(steps, default=0),
        **task_record(task),
    )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "summary.json", summary)
    except OSError:
        pass
