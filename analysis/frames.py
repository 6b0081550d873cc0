"""The runs' rows, metric histories and shrink stops as one :class:`Collection` of pandas
frames (see :mod:`analysis.collect` for their columns)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api.types import union_categoricals

from analysis.labels import current_names, label_runs
from analysis.run_rows import TASK_FIELDS
from stablelora.records.layers import with_gamma

HISTORY_COLUMNS = ["run_id", "step", "key", "value"]
SHRINK_COLUMNS = ["run_id", "layer", "shrinking", "stop_step"]
#: The probe's per-layer feature magnitudes and gamma estimates: many keys per row, and the
#: tables and plots use only their means over layers (``feat/delta1``) and the per-layer
#: norms (``lora/<layer>/norm_A``), so by default they are not loaded. The runner writes
#: per-layer values to ``layers.parquet`` (:mod:`stablelora.records.layers`); runs recorded
#: before that have them in ``metrics.jsonl``: both are read, into the same history keys.
PER_LAYER_PROBE = re.compile(r"^(feat|gamma)/.+/")


@dataclass
class Collection:
    """The runs of one or more sweeps: ``runs`` (one row per run), ``history`` (long metric
    histories) and ``shrink`` (long per-layer shrink stops); see :mod:`analysis.collect`."""

    runs: pd.DataFrame
    history: pd.DataFrame
    shrink: pd.DataFrame
    #: The analysis plan given at report time (``analysis.report --plan KEY=VALUE``), for runs
    #: whose config declares none (:func:`analysis.tables.equivalence.read_plan`).
    plan_options: dict = field(default_factory=dict)
    #: What the collection left out and why, one line each: sweep jobs that never started, a
    #: folder reached twice, a broken link (:func:`analysis.collect.scan_run_dirs`).
    notes: list[str] = field(default_factory=list)
    #: The directories the runs were collected from, as given (:func:`analysis.collect.collect`;
    #: none from W&B): where a table finds what sits beside the runs (a width sweep's
    #: ``records.jsonl``, :mod:`analysis.tables.width`).
    roots: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.runs)

    def subset(self, run_ids: Iterable[str]) -> Collection:
        """The collection restricted to ``run_ids`` (histories and shrink stops included)."""
        keep = set(run_ids)
        return Collection(
            self.runs[self.runs["run_id"].isin(keep)].reset_index(drop=True),
            self.history[self.history["run_id"].isin(keep)].reset_index(drop=True),
            self.shrink[self.shrink["run_id"].isin(keep)].reset_index(drop=True),
            dict(self.plan_options),
            list(self.notes),
            list(self.roots),
        )


def _key_filter(per_layer_probes: bool) -> Callable[[str], bool]:
    if per_layer_probes:
        return lambda key: True
    cache: dict[str, bool] = {}

    def keep(key: str) -> bool:
        if key not in cache:
            cache[key] = PER_LAYER_PROBE.match(key) is None
        return cache[key]

    return keep


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


def build_collection(records: list[tuple], per_layer_probes: bool) -> Collection:
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
    collection = Collection(current_names(runs), history, shrink)
    label_runs(collection.runs)
    return collection


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
    return Collection(
        runs,
        history,
        shrink,
        notes=[n for c in collections for n in c.notes],
        roots=[r for c in collections for r in c.roots],
    )
