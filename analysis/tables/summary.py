"""Every run at a glance: ``summary`` (each model, task and method) and ``runs_not_completed``."""

from __future__ import annotations

import math

import pandas as pd

from analysis.collect import Collection, format_value
from analysis.tables.aggregation import (
    aggregate,
    check_mode,
    display_values,
    lower_is_better,
    metric_scale,
    not_completed_note,
    protocol_note,
)
from analysis.tables.formatting import (
    Table,
    cell_text,
    num_text,
)
from analysis.tables.ordering import sort_frame
from analysis.tables.registry import register_table


@register_table
def summary(coll: Collection, seeds: str = "mean") -> Table | None:
    """Every (model, task, method) group: runs by status and the main metric before, after
    and at its best evaluation."""
    check_mode(seeds)
    runs = coll.runs
    if runs.empty:
        return None
    keys = ["model", "task", "label", "method"]
    frame = display_values(runs).assign(
        initial=_main_metric_of(runs, "initial"),
        best=_main_metric_of(runs, "best"),
        train_loss=pd.to_numeric(runs["train_loss_final"], errors="coerce"),
    )
    cells = aggregate(frame, keys, seeds)
    extra = frame.groupby(keys, dropna=False, sort=False).agg(
        initial=("initial", "mean"),
        best=("best", "mean"),
        train_loss=("train_loss", "mean"),
        metric=("main_metric", "first"),
    )
    counts = frame.groupby([*keys, "status"], dropna=False).size().unstack("status", fill_value=0)
    counts = counts.add_prefix("status_")
    cells = cells.join(extra, on=keys).join(counts, on=keys)
    cells = sort_frame(cells, keys)
    status_columns = list(counts.columns)
    shown = pd.DataFrame(
        {
            "model": cells["model"],
            "task": cells["task"],
            "method": cells["label"],
            "runs": [
                ", ".join(f"{row[c]} {c.removeprefix('status_')}" for c in status_columns if row[c])
                for row in cells[status_columns].to_dict("records")
            ],
            "metric": cells["metric"].astype(str).str.removeprefix("eval/"),
            "before": cells["initial"].map(num_text),
            "final": [cell_text(cell, seeds) for cell in cells.to_dict("records")],
            "best eval": cells["best"].map(num_text),
            "train loss": cells["train_loss"].map(lambda v: num_text(v, 4)),
        }
    )
    notes = [
        protocol_note(seeds),
        "before: mean at step 0; best eval: mean over runs of the "
        "best evaluation during the run; train loss: mean of the last logged loss.",
    ]
    if runs["main_metric"].map(lower_is_better).any():
        notes.append("Loss-like metrics are shown as logged (not in %); their best is the lowest.")
    notes += not_completed_note(runs)
    return Table(
        "summary",
        "All runs by model, task and method",
        shown,
        cells,
        notes,
        key_columns=3,
    )


def _main_metric_of(runs: pd.DataFrame, section: str) -> pd.Series:
    """Each run's ``<section>/<its main metric>`` in display units (NaN where absent)."""
    values = pd.Series(math.nan, index=runs.index)
    for metric in runs["main_metric"].dropna().unique():
        column, rows = f"{section}/{metric}", runs["main_metric"] == metric
        if column in runs:
            values[rows] = pd.to_numeric(runs.loc[rows, column], errors="coerce")
            values[rows] *= metric_scale(metric)
    return values


@register_table
def runs_not_completed(coll: Collection, seeds: str = "mean") -> Table | None:
    """Every run that failed, diverged or did not finish, with its error."""
    runs = coll.runs
    if runs.empty:
        return None
    bad = sort_frame(runs[runs["status"] != "completed"], ["model", "task", "label", "seed"])
    if bad.empty:
        return None
    error = bad["error"].fillna("").astype(str).str.split("\n").str[0].str.slice(0, 160)
    display = pd.DataFrame(
        {
            "run": bad["run"].astype(str),
            "status": bad["status"].astype(str),
            "steps": [
                f"{format_value(s)}/{format_value(m)}"
                for s, m in zip(bad["steps"], bad["max_steps"])
            ],
            "error": error,
        }
    )
    columns = [
        "run_id",
        "sweep",
        "run",
        "model",
        "task",
        "method",
        "label",
        "seed",
        "status",
        "steps",
        "max_steps",
        "error",
    ]
    return Table(
        "runs_not_completed",
        "Runs that did not complete",
        display,
        bad[[c for c in columns if c in bad]],
        [],
        key_columns=4,
    )
