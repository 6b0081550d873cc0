"""GSM8K after MetaMathQA: accuracy of generation tasks at each evaluated step budget."""

from __future__ import annotations

import math

import pandas as pd

from analysis import published
from analysis.collect import Collection
from analysis.tables.aggregation import (
    aggregate,
    check_mode,
    is_generation,
    metric_scale,
    not_completed_note,
    protocol_note,
)
from analysis.tables.formatting import (
    Table,
    pivot_with_paper,
)
from analysis.tables.registry import register_table


def eval_points(coll: Collection, runs: pd.DataFrame) -> pd.DataFrame:
    """The main metric of ``runs`` at every evaluation after step 0, accuracies in %.

    Long: the run's columns, ``step`` and ``value``; a run with no evaluation (one that
    failed early) has a single row with no step and no value."""
    history = coll.history
    wanted = runs[["run_id", "main_metric"]]
    points = history[history["run_id"].isin(set(runs["run_id"])) & (history["step"] > 0)]
    points = points.astype({"run_id": str, "key": str}).merge(
        wanted, left_on=["run_id", "key"], right_on=["run_id", "main_metric"]
    )[["run_id", "step", "value"]]
    merged = runs.merge(points, on="run_id", how="left")
    return merged.assign(value=merged["value"] * merged["main_metric"].map(metric_scale))


@register_table
def gsm8k(coll: Collection, seeds: str = "mean") -> Table | None:
    """Accuracy of generation tasks (MetaMathQA -> GSM8K) at each evaluated step budget."""
    check_mode(seeds)
    runs = coll.runs[is_generation(coll.runs)] if len(coll.runs) else coll.runs
    if runs.empty:
        return None
    points = eval_points(coll, runs)
    keys = ["model", "task", "label", "method"]
    steps = sorted(int(s) for s in points["step"].dropna().unique())
    if not steps:
        return None
    # A run without evaluations counts as missing at every step of its group.
    filled = []
    for _, group in points.groupby(keys, dropna=False, sort=False):
        group_steps = sorted(group["step"].dropna().unique()) or steps
        evaluated = group.dropna(subset=["step"])
        missing = group[group["step"].isna()].drop(columns="step")
        missing = missing.merge(pd.DataFrame({"step": group_steps}), how="cross")
        filled += [evaluated, missing]
    points = pd.concat(filled, ignore_index=True)
    points.loc[points["status"] != "completed", "value"] = math.nan
    cells = aggregate(points, [*keys, "step"], seeds)
    cells["step"] = cells["step"].astype(int)
    methods = dict(zip(cells["label"], cells["method"]))

    def paper(row, step):
        if row["task"] != "metamath_gsm8k":
            return math.nan
        return published.GSM8K.get((row["model"], step), {}).get(methods[row["label"]], math.nan)

    display, data = pivot_with_paper(
        cells, ["model", "task", "label"], "step", steps, seeds, paper, lambda s: f"step {s}"
    )
    display = display.rename(columns={"label": "method"})
    notes = [
        protocol_note(seeds),
        "Accuracy (%) of the main metric at each evaluation; the "
        "last column of a run is its final evaluation.",
    ]
    notes += not_completed_note(runs)
    return Table(
        "gsm8k",
        "GSM8K accuracy (%) by step budget",
        display,
        data,
        notes,
        key_columns=display.shape[1] - len(steps),
    )
