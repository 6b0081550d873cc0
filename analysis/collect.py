"""Collect run records into pandas DataFrames: from sweep directories on disk, or from W&B.

A run directory (see docs/records.md) holds ``summary.json``, ``config.yaml`` (the
resolved config; ``.hydra/config.yaml`` when the job failed before writing it),
``metrics.jsonl`` and ``layers.parquet`` (the per-layer probe values; older runs have them in
``metrics.jsonl``). :func:`collect` finds every run under the given directories and returns a
:class:`Collection`:

- ``runs``: one row per run: ``run_id``, ``sweep``, ``run``, ``status`` (``completed``,
  ``diverged``, ``failed``, ``interrupted``, or ``incomplete`` for a run without a summary),
  ``error``,
  ``steps``, ``max_steps``, ``main_metric``, ``model``, ``task``, ``method``, ``seed``,
  ``task_family``, ``task_kind`` and ``protocol`` (what the tables route the run on: as the
  run recorded them, or derived for older records by :func:`task_fields`),
  ``score`` (the final value of the main metric), ``initial/<metric>``, ``final/<metric>``,
  ``best/<metric>`` and ``best/step``, ``train_loss_final`` (NaN or infinite for a diverged
  run), ``wall_time_s``, ``train_time_s`` (totals over the run's ``attempts``),
  ``peak_memory_mb``, shrink statistics (``shrink/layers``,
  ``shrink/stopped``, ``shrink/stop_step_median``) and the flattened config (``optim.lr``,
  ``adapter.target_modules`` as ``"q_proj,v_proj"``, ...). ``label`` names the method and the
  hyper-parameters that distinguish its runs (see :func:`label_runs`).
- ``history``: the metric histories, long: ``run_id``, ``step``, ``key``, ``value`` (finite
  values; the per-layer ones under the probe's keys, e.g. ``lora/<layer>/norm_A``); a value
  logged twice for one step (records written by two processes at once, or by a runner older
  than the exactly-once records) is kept once, the last, with a warning naming the run.
- ``shrink``: Stable-LoRA's stop steps, long: ``run_id``, ``layer``, ``shrinking``,
  ``stop_step`` (null for a layer still shrinking at the end).

Runs that failed, diverged or never finished are kept, with their status: the tables count
them and say so. :func:`collect_wandb` builds the same frames from a W&B project.

The parts: :mod:`analysis.run_rows` (one run's row), :mod:`analysis.frames` (the
:class:`Collection`), :mod:`analysis.labels` (labels of runs) and :mod:`analysis.wandb_runs`;
their public names are importable from here.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from analysis.frames import Collection, build_collection, concat
from analysis.labels import format_value, label_runs
from analysis.run_rows import (
    LEGACY_KINDS,
    TASK_FIELDS,
    run_row,
    shrink_rows,
    task_fields,
    unique_rows,
)
from analysis.wandb_runs import collect_wandb, wandb_run_records
from stablelora.records.folder import RunFolder
from stablelora.records.layers import RecordsError

__all__ = [
    "LEGACY_KINDS",
    "TASK_FIELDS",
    "Collection",
    "collect",
    "collect_wandb",
    "concat",
    "find_run_dirs",
    "format_value",
    "label_runs",
    "scan_run_dirs",
    "task_fields",
    "wandb_run_records",
]

RUN_FILES = ("summary.json", "config.yaml", "metrics.jsonl")
#: Folders inside a run (or a report) that never hold runs: not walked.
SKIP_DIRS = {
    ".hydra",
    "adapter",
    "wandb",
    "report",
    "plots",
    "tables",
    "__pycache__",
    "layers.parts",
}
HISTORY_COLUMNS = ["run_id", "step", "key", "value"]
SHRINK_COLUMNS = ["run_id", "layer", "shrinking", "stop_step"]


#: Hydra's folder in every job folder, written before the job starts.
HYDRA_DIR = ".hydra"


@dataclass
class RunFolders:
    """What a walk of a sweep directory found: the run folders, the job folders whose job
    never started (Hydra's ``.hydra/`` and no records: a sweep stopped before them), and a
    note per folder or link left out (read through another path already, or a broken link)."""

    runs: list[Path] = field(default_factory=list)
    not_started: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def scan_run_dirs(root: str | Path, seen: dict[str, Path] | None = None) -> RunFolders:
    """The run folders under ``root`` (``root`` itself if it is one), sorted.

    A run folder holds ``summary.json``, ``config.yaml`` or ``metrics.jsonl``; run folders
    are not nested, so the walk stops at the first one on each branch. Symlinked folders are
    followed, as the runner follows them (a sweep may link runs kept elsewhere), after every
    folder reached without a link, so that a run both in the sweep and linked to is read under
    its own path. A folder reached a second time (through a link, or under another root
    sharing ``seen``: real path -> the path it was first read through) is read once and noted,
    which also ends link cycles.
    """
    root = Path(root)
    seen = {} if seen is None else seen
    found = RunFolders()
    # Folders to visit: those reached without a link first, then those below a link.
    direct: deque[Path] = deque([root])
    linked: deque[Path] = deque()
    while direct or linked:
        via_link = not direct
        here = linked.popleft() if via_link else direct.popleft()
        real = os.path.realpath(here)
        if real in seen:
            found.skipped.append(f"{here} is {seen[real]} again (a symlink, or a folder given "
                                 "twice): read once")  # fmt: skip
            continue
        seen[real] = here
        try:
            entries = sorted(os.scandir(here), key=lambda entry: entry.name)
        except OSError as error:
            found.skipped.append(f"{here} cannot be read ({error.strerror}): skipped")
            continue
        if any(entry.name in RUN_FILES and entry.is_file() for entry in entries):
            found.runs.append(here)
            continue
        if any(entry.name == HYDRA_DIR and entry.is_dir() for entry in entries):
            found.not_started.append(here)  # Hydra prepared the job, which recorded nothing
            continue
        for entry in entries:
            if entry.is_symlink() and not os.path.exists(entry.path):
                found.skipped.append(f"{entry.path} links to {os.readlink(entry.path)}, which "
                                     "does not exist: skipped")  # fmt: skip
            elif entry.is_dir() and entry.name not in SKIP_DIRS:
                (linked if via_link or entry.is_symlink() else direct).append(Path(entry.path))
    found.runs.sort()
    found.not_started.sort()
    return found


def find_run_dirs(root: str | Path) -> list[Path]:
    """Every run directory under ``root`` (``root`` itself if it is one), sorted; symlinked
    folders followed, each folder once (:func:`scan_run_dirs`)."""
    return scan_run_dirs(root).runs


def _read_layers(folder: RunFolder, per_layer_probes: bool):
    """The run's per-layer rows (a pyarrow table, or None): only the ``lora/`` columns unless
    ``per_layer_probes``."""
    try:
        return folder.layers(None if per_layer_probes else _is_lora_column)
    except RecordsError as error:
        warnings.warn(f"{error}; the run's per-layer values are left out.", stacklevel=2)
        return None


def _is_lora_column(column: str) -> bool:
    return column.startswith("lora/")


def collect(
    paths: str | Path | Iterable[str | Path],
    *,
    history: bool = True,
    per_layer_probes: bool = False,
) -> Collection:
    """Read every run under ``paths`` (sweep directories, or run directories).

    Args:
        paths: one or more directories, searched recursively for run directories.
        history: also load ``metrics.jsonl`` and ``layers.parquet`` (the plots and step tables
            need them).
        per_layer_probes: keep the probe's per-layer ``feat/<layer>/...`` and
            ``gamma/<layer>/...`` keys in the history (off by default: see
            :data:`analysis.frames.PER_LAYER_PROBE`; the per-layer ``lora/<layer>/norm_A``
            keys are always kept).

    Returns:
        A :class:`Collection`; ``run_id`` is the run directory's path, ``sweep`` the given
        directory and ``run`` the run's path relative to it. What was left out (a job that
        never started, a folder reached twice, a broken link) is in ``notes``, each also a
        warning.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    records, notes = [], []
    seen: dict[str, Path] = {}  # shared by the roots: a run under two of them is read once
    roots = [Path(path) for path in paths]
    for root in roots:
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist: give a sweep or run directory.")
        folders = scan_run_dirs(root, seen)
        notes += folders.skipped
        notes += [
            f"{folder} never started (Hydra's {HYDRA_DIR}/ and no records): rerun the sweep's "
            "command to run it"
            for folder in folders.not_started
        ]
        for run_dir in folders.runs:
            run_id, folder = str(run_dir), RunFolder(run_dir)
            metrics = unique_rows(run_id, folder.metrics) if history else []
            layers = _read_layers(folder, per_layer_probes) if history else None
            try:
                summary = folder.summary
            except RecordsError as error:  # the run is kept, as one with no summary
                warnings.warn(f"{error}; the run is shown as incomplete.", stacklevel=2)
                summary = {}
            row = run_row(
                folder.config,
                summary,
                run_id=run_id,
                sweep=str(root),
                run=run_dir.relative_to(root).as_posix(),
                history_steps=max((m.get("step", 0) for m in metrics), default=None),
            )
            records.append((row, metrics, shrink_rows(run_id, summary.get("shrink")), layers))
    for note in notes:  # said, never dropped silently; the report lists them too
        warnings.warn(note, stacklevel=2)
    collection = build_collection(records, per_layer_probes)
    collection.notes, collection.roots = notes, roots
    return collection
