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
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api.types import union_categoricals

from stablelora.layer_records import read_layer_table, with_gamma
from stablelora.records import (
    RecordsError,
    flatten,
    read_jsonl,
    read_summary,
    summary_from_wandb,
)

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
#: The probe's per-layer feature magnitudes and gamma estimates: many keys per row, and the
#: tables and plots use only their means over layers (``feat/delta1``) and the per-layer
#: norms (``lora/<layer>/norm_A``), so by default they are not loaded. The runner writes
#: per-layer values to ``layers.parquet`` (:mod:`stablelora.layer_records`); runs recorded
#: before that have them in ``metrics.jsonl``: both are read, into the same history keys.
PER_LAYER_PROBE = re.compile(r"^(feat|gamma)/.+/")
#: Config keys that can tell runs of one method apart (besides the seed): the label of a run
#: shows those that vary within its (model, task, method), and every ``optimizer.*``.
#: Keys that name the optimizer config rather than set one of its options.
OPTIMIZER_IDENTITY = ("optimizer.name", "optimizer.builder")
VARIANT_KEYS = (
    "adapter.target_modules",
    "adapter.rank",
    "adapter.alpha",
    "adapter.scaling",
    "adapter.init",
    "adapter.init_scale",
    "adapter.use_dora",
    "adapter.dropout",
    "optimizer.shrink_ratio",
    "optimizer.stop_rule",
    "optimizer.loraplus_lr_ratio",
    "optim.lr",
    "optim.weight_decay",
    "optim.schedule",
    "optim.warmup_steps",
    "trainer.max_steps",
    "trainer.batch_size",
    "trainer.grad_accum",
    "model.config.hidden_size",
    "model.width",
    "lr_width_exponent",
)
#: W&B run states for runs whose summary has no ``status`` (the runner writes one at the end).
WANDB_STATES = {
    "finished": "completed",
    "running": "incomplete",
    "crashed": "failed",
    "failed": "failed",
    "killed": "failed",
    "preempted": "interrupted",
}


@dataclass
class Collection:
    """The runs of one or more sweeps: ``runs`` (one row per run), ``history`` (long metric
    histories) and ``shrink`` (long per-layer shrink stops); see the module docstring."""

    runs: pd.DataFrame
    history: pd.DataFrame
    shrink: pd.DataFrame

    def __len__(self) -> int:
        return len(self.runs)

    def subset(self, run_ids: Iterable[str]) -> Collection:
        """The collection restricted to ``run_ids`` (histories and shrink stops included)."""
        keep = set(run_ids)
        return Collection(
            self.runs[self.runs["run_id"].isin(keep)].reset_index(drop=True),
            self.history[self.history["run_id"].isin(keep)].reset_index(drop=True),
            self.shrink[self.shrink["run_id"].isin(keep)].reset_index(drop=True),
        )


# ---------------------------------------------------------------------------- files
def find_run_dirs(root: str | Path) -> list[Path]:
    """Every run directory under ``root`` (``root`` itself if it is one), sorted.

    A run directory holds ``summary.json``, ``config.yaml`` or ``metrics.jsonl``; run folders
    are not nested, so the walk stops at the first one on each branch.
    """
    root = Path(root)
    found = []
    for folder, subdirs, files in os.walk(root):
        if any(name in files for name in RUN_FILES):
            found.append(Path(folder))
            subdirs[:] = []
            continue
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS)
    return sorted(found)


def _yaml_loader():
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_config(run_dir: Path) -> dict:
    """The run's resolved ``config.yaml``, else Hydra's ``.hydra/config.yaml`` (written before
    the job starts, so a job that failed early still has it), else ``{}``."""
    import yaml

    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.exists():
            try:
                return yaml.load(path.read_text(), Loader=_yaml_loader()) or {}
            except yaml.YAMLError:
                continue
    return {}


def unique_rows(run_id: str, metrics: list[dict]) -> list[dict]:
    """The rows of one run merged per step (ascending), each (step, key) once: the last value
    logged wins, and a warning says how many values were logged more than once."""
    by_step: dict[int, dict] = {}
    repeated = 0
    for row in metrics:
        merged = by_step.setdefault(row.get("step", 0), {})
        repeated += sum(1 for key in row if key in merged and key != "step")
        merged.update(row)
    if repeated:
        warnings.warn(
            f"{run_id}: {repeated} metric values were logged more than once for the same step "
            "(two processes on one run folder, or an older runner's resume); kept the last of "
            "each.",
            stacklevel=3,
        )
    return [by_step[step] for step in sorted(by_step)]


# ---------------------------------------------------------------------------- one run
#: What a run is routed to its tables by (besides its main metric): recorded by the runner
#: (``stablelora.tasks.task_record``), or derived by :func:`task_fields` for older records.
TASK_FIELDS = ("task_family", "task_kind", "protocol")
#: The ``KIND`` of the task families that existed before ``summary.json`` recorded
#: ``task_kind``: runs recorded earlier get their kind from here. Frozen: a family added since
#: records its own kind (tests/test_analysis_tables.py checks these against the families).
LEGACY_KINDS = {
    "arc": "multiple_choice",
    "arithmetic": "math",
    "bbc_news": "multiple_choice",
    "chatterbot": "dialogue",
    "gsm8k": "math",
    "hellaswag": "multiple_choice",
    "llm_adapters": "math",
    "merged_qa": "multiple_choice",
    "obqa": "multiple_choice",
    "siqa": "multiple_choice",
    "toy_teacher": "regression",
    "wizardlm": "dialogue",
}


def task_fields(summary: dict, flat: dict, task: str) -> dict:
    """The run's :data:`TASK_FIELDS`: as its summary recorded them, else (a run recorded
    before the runner wrote them) from its config's ``task.family`` and ``task.protocol`` and
    :data:`LEGACY_KINDS`. The one place where old and new records are made to route alike.

    A record with no config at all takes its task's name as the family when that names a
    legacy family (``chatterbot``...); a maths task with no recorded protocol generates (the
    only protocol ``stablelora.tasks`` accepts for it)."""
    if any(key in summary for key in TASK_FIELDS):
        return {key: summary.get(key) for key in TASK_FIELDS}
    family = flat.get("task.family") or (task if task in LEGACY_KINDS else None)
    kind = LEGACY_KINDS.get(family)
    protocol = flat.get("task.protocol") or ("generate" if kind == "math" else None)
    return {"task_family": family, "task_kind": kind, "protocol": protocol}


def run_row(
    config: dict,
    summary: dict,
    *,
    run_id: str,
    sweep: str,
    run: str,
    history_steps: int | None = None,
) -> dict:
    """One row of ``Collection.runs`` from a run's resolved config and its summary.

    The summary has the runner's schema (``status``, ``initial``/``final``/``best`` dicts,
    ...); a run with no summary is ``incomplete`` and its ``steps`` are the last logged step.
    """
    config = {k: v for k, v in config.items() if k != "hydra"}
    flat = flatten(config, join_lists=True)
    status = summary.get("status") or "incomplete"
    main_metric = summary.get("main_metric") or "eval/acc"
    final = summary.get("final") or {}
    row = {
        "run_id": run_id,
        "sweep": sweep,
        "run": run,
        "status": status,
        "error": summary.get("error"),
        "steps": summary.get("steps", history_steps),
        "max_steps": summary.get("max_steps", flat.get("trainer.max_steps")),
        "main_metric": main_metric,
        # Never missing, so that grouping on them keeps every run.
        "model": summary.get("model") or flat.get("model.name") or "—",
        "task": summary.get("task") or flat.get("task.name") or "—",
        "method": summary.get("method") or flat.get("method.name") or "—",
        "seed": summary.get("seed", flat.get("seed")),
        "score": final.get(main_metric, math.nan) if status == "completed" else math.nan,
    }
    row.update(task_fields(summary, flat, row["task"]))
    for section in ("initial", "final", "best"):
        for key, value in (summary.get(section) or {}).items():
            row[f"{section}/{key}"] = value
    for key in ("train_loss_final", "wall_time_s", "train_time_s", "attempts", "peak_memory_mb"):
        row[key] = summary.get(key)
    row.update(_shrink_stats(summary))
    row.update(flat)
    return row


def _shrink_stats(summary: dict) -> dict:
    """Layers, stopped layers and the last stop step from the per-layer ``shrink``; the median
    stop step as the run recorded it (``shrink_layers``, from
    ``stablelora.optim.stable_lora.shrink_counts``), not computed a second time here."""
    shrink = summary.get("shrink")
    if not shrink:
        return {}
    stopped = [
        layer["stop_step"] for layer in shrink.values() if layer.get("stop_step") is not None
    ]
    median = (summary.get("shrink_layers") or {}).get("median_stop_step")
    return {
        "shrink/layers": len(shrink),
        "shrink/stopped": len(stopped),
        "shrink/stop_step_median": math.nan if median is None else median,
        "shrink/stop_step_max": max(stopped) if stopped else math.nan,
    }


def shrink_rows(run_id: str, shrink: dict | None) -> list[tuple]:
    return [
        (run_id, layer, bool(state.get("shrinking")), state.get("stop_step"))
        for layer, state in (shrink or {}).items()
    ]


def _key_filter(per_layer_probes: bool) -> Callable[[str], bool]:
    if per_layer_probes:
        return lambda key: True
    cache: dict[str, bool] = {}

    def keep(key: str) -> bool:
        if key not in cache:
            cache[key] = PER_LAYER_PROBE.match(key) is None
        return cache[key]

    return keep


# ---------------------------------------------------------------------------- frames
def _jsonl_history(records: list[tuple], keep: Callable[[str], bool]) -> pd.DataFrame:
    # One wide frame of every logged row, then a single melt: much faster than building the
    # long frame value by value (1,000 runs in about a second).
    wide_rows, owners = [], []
    for row, metrics, *_ in records:
        for metric_row in metrics:
            wide_rows.append({k: v for k, v in metric_row.items() if keep(k)})
            owners.append(row["run_id"])
    if not wide_rows:
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    wide = pd.DataFrame.from_records(wide_rows)
    wide["run_id"] = owners
    history = wide.melt(id_vars=["run_id", "step"], var_name="key", value_name="value")
    history["value"] = pd.to_numeric(history["value"], errors="coerce")
    return history.dropna(subset=["value"])


def _layer_history(records: list[tuple], per_layer_probes: bool) -> pd.DataFrame:
    """The runs' ``layers.parquet`` rows as long history rows, key ``<section>/<layer>/<q>``
    (the keys the probe returned; the per-layer gamma recomputed when ``per_layer_probes``)."""
    import pyarrow as pa

    owned = [(row["run_id"], table) for row, _, _, table in records if table is not None]
    owned = [(run_id, table) for run_id, table in owned if table.num_rows]
    if not owned:
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    # One table of every run, converted once: much faster than a frame per run.
    tables = [table for _, table in owned]
    wide = pa.concat_tables(tables, promote_options="default").to_pandas()
    wide["run_id"] = np.repeat([run_id for run_id, _ in owned], [t.num_rows for t in tables])
    if per_layer_probes:
        wide = with_gamma(wide)
    wide = wide.drop(columns="width")
    wide["layer"] = wide["layer"].astype("category")
    long = wide.melt(id_vars=["run_id", "step", "layer"], var_name="quantity", value_name="value")
    # Only finite values, like metrics.jsonl (where the recorder writes inf and NaN as null).
    long = long[np.isfinite(long["value"].to_numpy(np.float64))]
    quantity = long["quantity"].astype("category")
    layers, quantities = wide["layer"].cat.categories, quantity.cat.categories
    names = [(q.split("/", 1)[0], q.split("/", 1)[1]) for q in quantities]
    keys = [f"{section}/{layer}/{name}" for layer in layers for section, name in names]
    codes = long["layer"].cat.codes.to_numpy(np.int64) * len(names) + quantity.cat.codes.to_numpy()
    key = pd.Categorical.from_codes(codes, categories=keys)
    return pd.DataFrame(
        {
            "run_id": long["run_id"].to_numpy(),
            "step": long["step"].to_numpy(),
            "key": key,
            "value": long["value"].to_numpy(np.float64),
        }
    )


def _frames(records: list[tuple], per_layer_probes: bool) -> Collection:
    """(run row, metric rows, shrink rows, per-layer table or None) of every run ->
    a :class:`Collection`."""
    runs = pd.DataFrame([record[0] for record in records])
    if runs.empty:
        columns = ["run_id", "status", "model", "task", "method", "seed", *TASK_FIELDS]
        runs = pd.DataFrame(columns=columns)
    parts = [
        _jsonl_history(records, _key_filter(per_layer_probes)),
        _layer_history(records, per_layer_probes),
    ]
    parts = [part for part in parts if len(part)]
    if parts:
        history = pd.DataFrame(
            {
                column: union_categoricals([part[column].astype("category") for part in parts])
                for column in ("run_id", "key")
            }
            | {
                column: np.concatenate([part[column].to_numpy() for part in parts])
                for column in ("step", "value")
            }
        )
        history = history.astype({"step": "int64", "value": "float64"})
        history = history.sort_values(["run_id", "key", "step"], kind="stable")
        history = history[HISTORY_COLUMNS].reset_index(drop=True)
    else:
        history = pd.DataFrame(columns=HISTORY_COLUMNS)
    shrink = pd.DataFrame([r for record in records for r in record[2]], columns=SHRINK_COLUMNS)
    collection = Collection(runs, history, shrink)
    label_runs(collection.runs)
    return collection


def _read_layers(run_dir: Path, per_layer_probes: bool):
    """The run's per-layer rows (a pyarrow table, or None): only the ``lora/`` columns unless
    ``per_layer_probes``."""
    try:
        return read_layer_table(run_dir, None if per_layer_probes else _is_lora_column)
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
            :data:`PER_LAYER_PROBE`; the per-layer ``lora/<layer>/norm_A`` keys are always kept).

    Returns:
        A :class:`Collection`; ``run_id`` is the run directory's path, ``sweep`` the given
        directory and ``run`` the run's path relative to it.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    records = []
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist: give a sweep or run directory.")
        for run_dir in find_run_dirs(root):
            run_id = str(run_dir)
            metrics = unique_rows(run_id, read_jsonl(run_dir / "metrics.jsonl")) if history else []
            layers = _read_layers(run_dir, per_layer_probes) if history else None
            try:
                summary = read_summary(run_dir)
            except RecordsError as error:  # the run is kept, as one with no summary
                warnings.warn(f"{error}; the run is shown as incomplete.", stacklevel=2)
                summary = {}
            row = run_row(
                read_config(run_dir),
                summary,
                run_id=run_id,
                sweep=str(root),
                run=run_dir.relative_to(root).as_posix(),
                history_steps=max((m.get("step", 0) for m in metrics), default=None),
            )
            records.append((row, metrics, shrink_rows(run_id, summary.get("shrink")), layers))
    return _frames(records, per_layer_probes)


def concat(collections: Iterable[Collection]) -> Collection:
    """Several collections as one (labels recomputed over all runs)."""
    collections = list(collections)
    runs = pd.concat([c.runs for c in collections], ignore_index=True)
    history = pd.concat(
        [c.history.astype({"run_id": str, "key": str}) for c in collections], ignore_index=True
    )
    history = history.astype({"run_id": "category", "key": "category"})
    shrink = pd.concat([c.shrink for c in collections], ignore_index=True)
    label_runs(runs)
    return Collection(runs, history, shrink)


# ---------------------------------------------------------------------------- labels
def format_value(value) -> str:
    """A config value as it appears in a label or a table: compact and exact enough."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def short_key(key: str) -> str:
    """``optimizer.large_weight_decay`` -> ``large_weight_decay``."""
    return key.rsplit(".", 1)[-1]


def _group_ids(runs: pd.DataFrame, within: Iterable[str]) -> pd.Series:
    return runs[list(within)].astype(str).agg("\x1f".join, axis=1)


def variant_keys(
    runs: pd.DataFrame,
    exclude: Iterable[str] = (),
    within: tuple[str, ...] = ("model", "task", "method"),
) -> list[str]:
    """The config keys whose value differs between runs of some (model, task, method)."""
    exclude = set(exclude)
    candidates = [
        *VARIANT_KEYS,
        *sorted(
            c
            for c in runs.columns
            if c.startswith("optimizer.") and c not in (*VARIANT_KEYS, *OPTIMIZER_IDENTITY)
        ),
    ]
    groups = _group_ids(runs, within)
    keys = []
    for key in candidates:
        if key in exclude or key not in runs.columns:
            continue
        if (runs[key].map(format_value).groupby(groups).nunique() > 1).any():
            keys.append(key)
    return keys


def label_runs(runs: pd.DataFrame, exclude: Iterable[str] = ()) -> pd.DataFrame:
    """Set ``runs["variant"]`` and ``runs["label"]`` in place and return ``runs``.

    The variant names the hyper-parameters that tell a run apart from the other runs of its
    (model, task, method), e.g. ``"stop_rule=never, lr=0.0002"`` (see :data:`VARIANT_KEYS`
    and ``optimizer.*``); the label is the method name followed by the variant
    (``"stable_lora, stop_rule=never"``; just ``"lora"`` when its runs differ only in seed).
    ``exclude`` keys are left out: a table that shows them in a column of their own.
    """
    if runs.empty:
        runs["variant"], runs["label"] = pd.Series(dtype=str), pd.Series(dtype=str)
        return runs
    groups = _group_ids(runs, ("model", "task", "method"))
    variant = pd.Series("", index=runs.index)
    for key in variant_keys(runs, exclude):
        values = runs[key].map(format_value)
        varies = values.groupby(groups).transform("nunique") > 1
        part = (short_key(key) + "=" + values).where(varies, "")
        variant = variant.str.cat(part, sep=", ").str.strip(", ")
    runs["variant"] = variant
    methods = runs["method"].map(format_value)
    runs["label"] = methods.where(variant == "", methods + ", " + variant)
    return runs


# ---------------------------------------------------------------------------- W&B
def wandb_run_records(run, *, history: bool = True) -> tuple[dict, list[dict], list[tuple]]:
    """One W&B run (an object of ``wandb.Api().runs(...)``) -> (run row, metric rows, shrink
    rows), the same shapes as a run read from disk.

    The runner's W&B run holds the resolved config, the metrics logged with ``step=`` (W&B's
    ``_step``) and a flat summary: the scalar fields of ``summary.json`` plus ``final/<k>`` and
    ``best/<k>`` (the initial metrics and the shrink stops are only on disk).
    """
    config = dict(run.config or {})
    raw = getattr(run.summary, "_json_dict", None)
    summary = summary_from_wandb(dict(raw if raw is not None else run.summary or {}))
    if summary["status"] == "incomplete":  # no runner summary: W&B's own state says more
        summary["status"] = WANDB_STATES.get(getattr(run, "state", None), "incomplete")
    metrics = []
    if history:
        for row in run.scan_history():
            if "_step" not in row:
                continue
            values = {k: v for k, v in row.items() if not k.startswith("_") and v is not None}
            if values:
                metrics.append({"step": int(row["_step"]), **values})
    metrics = unique_rows(f"wandb:{run.id}", metrics)
    path = "/".join(getattr(run, "path", None) or [run.id])
    row = run_row(
        config,
        summary,
        run_id=f"wandb:{path}",
        sweep=f"wandb:{getattr(run, 'group', '')}",
        run=getattr(run, "name", None) or run.id,
        history_steps=max((m["step"] for m in metrics), default=None),
    )
    return row, metrics, shrink_rows(row["run_id"], summary.get("shrink"))


def collect_wandb(
    path: str,
    *,
    group: str | None = None,
    tags: Iterable[str] = (),
    filters: dict | None = None,
    history: bool = True,
    per_layer_probes: bool = False,
    api=None,
) -> Collection:
    """The runs of a W&B project (``"entity/project"``) that were synced, as a Collection.

    Args:
        path: ``"entity/project"``.
        group: keep runs of this W&B group (the runner's group is the sweep name).
        tags: keep runs having any of these tags.
        filters: further W&B (MongoDB-style) filters, e.g. ``{"config.task.name": "hellaswag"}``.
        history: also download the metric histories (``run.scan_history()``).
        per_layer_probes: as in :func:`collect` (the runner sends W&B the per-layer values
            only as tables and histograms every ``logger.per_layer_every`` steps: the
            per-layer series are in the run directories).
        api: a ``wandb.Api()`` (made here when None).
    """
    if api is None:
        import wandb

        api = wandb.Api()
    query = dict(filters or {})
    if group:
        query["group"] = group
    tags = list(tags)
    if tags:
        query["tags"] = {"$in": tags}
    records = [
        (*wandb_run_records(run, history=history), None) for run in api.runs(path, filters=query)
    ]
    return _frames(records, per_layer_probes)
