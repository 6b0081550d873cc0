"""The scale of A0: accuracy (``init_scale``) and self-stability (``init_scale_stability``)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.collect import Collection, format_value
from analysis.tables.aggregation import (
    aggregate,
    display_values,
    not_completed_note,
    protocol_note,
    table_runs,
)
from analysis.tables.formatting import (
    DASH,
    Table,
    pivot_with_paper,
)
from analysis.tables.registry import register_table


def _last_value(coll: Collection, run_ids: set, key: str, first: bool = False) -> pd.Series:
    history = coll.history
    values = history[(history["key"] == key) & history["run_id"].isin(run_ids)]
    values = values.astype({"run_id": str}).sort_values("step")
    values = values.groupby("run_id")["value"]
    return values.first() if first else values.last()


def stability_measures(coll: Collection, runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: ``delta1/delta2`` at the last probed step where delta2 > 0 (the paper's
    self-stability: about one when both factors learn; large when the excess of A0 Z makes
    delta1 dominate) and ``||A|| last/first`` (the growth of ||A||_F over the run; the
    paper's Figure 2: it never falls below its initial value under AdamW)."""
    ids = set(runs["run_id"])
    history = coll.history[coll.history["run_id"].isin(ids)].astype({"run_id": str, "key": str})
    deltas = history[history["key"].isin(["feat/delta1", "feat/delta2"])]
    wide = deltas.pivot_table(index=["run_id", "step"], columns="key", values="value")
    ratio = pd.Series(dtype=float)
    if {"feat/delta1", "feat/delta2"} <= set(wide.columns):
        wide = wide[(wide["feat/delta2"] > 0) & np.isfinite(wide["feat/delta1"])]
        ratio = (wide["feat/delta1"] / wide["feat/delta2"]).groupby(level="run_id").last()
    growth = _last_value(coll, ids, "lora/norm_A") / _last_value(coll, ids, "lora/norm_A", True)
    return pd.DataFrame({"run_id": runs["run_id"]}).assign(
        ratio=lambda f: f["run_id"].map(ratio), growth=lambda f: f["run_id"].map(growth)
    )


@register_table
def init_scale(coll: Collection, seeds: str = "mean") -> Table | None:
    """Accuracy by the scale of A0 (``adapter.init_scale``): rows methods, columns scales."""
    runs = table_runs(coll, seeds, "adapter.init_scale")
    if runs is None:
        return None
    runs = display_values(runs)
    cells = aggregate(runs, ["model", "task", "label", "method", "adapter.init_scale"], seeds)
    scales = sorted(cells["adapter.init_scale"].unique())
    display, data = pivot_with_paper(
        cells,
        ["model", "task", "label"],
        "adapter.init_scale",
        scales,
        seeds,
        lambda r, s: math.nan,
        lambda s: f"A0 × {format_value(s)}",
    )
    display = display.rename(columns={"label": "method"})
    notes = [
        protocol_note(seeds),
        "A0 × c: peft's A0 multiplied by c (0: the A = B = 0 "
        "saddle, no learning). The claim: a larger A0 breaks self-stability under "
        "AdamW, and shrinking repairs it (see init_scale_stability).",
    ]
    notes += not_completed_note(runs)
    return Table(
        "init_scale",
        "Accuracy (%) by the scale of A0",
        display,
        data,
        notes,
        key_columns=display.shape[1] - len(scales),
    )


@register_table
def init_scale_stability(coll: Collection, seeds: str = "mean") -> Table | None:
    """By the scale of A0: the delta1/delta2 ratio at the last probed step and the growth of
    ||A||_F over the run (geometric means over seeds)."""
    if coll.history.empty:
        return None
    runs = table_runs(coll, "mean", "adapter.init_scale")  # geometric means, whatever seeds
    if runs is None:
        return None
    measures = stability_measures(coll, runs)
    runs = runs.merge(measures, on="run_id")
    if runs[["ratio", "growth"]].isna().all().all():
        return None
    scales = sorted(runs["adapter.init_scale"].unique())
    long = []
    for measure, title in (("ratio", "delta1/delta2 (last probe)"), ("growth", "||A|| last/first")):
        values = runs[measure].where(runs[measure] > 0)
        long.append(runs.assign(quantity=title, value=np.log10(values)))
    cells = aggregate(
        pd.concat(long, ignore_index=True),
        ["model", "task", "label", "quantity", "adapter.init_scale"],
        "mean",
    )
    cells["value"] = 10 ** cells["value"]
    cells["std"] = math.nan
    display, data = pivot_with_paper(
        cells,
        ["model", "task", "label", "quantity"],
        "adapter.init_scale",
        scales,
        "mean",
        lambda r, s: math.nan,
        lambda s: f"A0 × {format_value(s)}",
        fmt=lambda v: f"{v:.3g}" if np.isfinite(v) else DASH,
    )
    display = display.rename(columns={"label": "method"})
    notes = [
        "Geometric mean over seeds (n = runs with a value). delta1 = s (B'-B) A Z, "
        "delta2 = s B (A'-A) Z (the paper's numbering), RMS means over layers from the "
        "probe; self-stable training keeps delta1/delta2 near 1. ||A|| = the mean over "
        "layers of ||A||_F, last logged / first logged."
    ]
    return Table(
        "init_scale_stability",
        "Self-stability by the scale of A0",
        display,
        data,
        notes,
        key_columns=4,
    )
