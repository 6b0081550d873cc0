"""Dialogue tasks (every task family of ``KIND = "dialogue"``: chatterbot, WizardLM...):
held-out reply loss, perplexity and ROUGE-L."""

from __future__ import annotations

import math

import pandas as pd

from analysis.collect import Collection
from analysis.tables.aggregation import (
    aggregate,
    check_mode,
    lower_is_better,
    metric_scale,
    not_completed_note,
)
from analysis.tables.formatting import Table, cell_text
from analysis.tables.ordering import sort_frame
from analysis.tables.registry import register_table

#: The ``KIND`` of the dialogue task families (``stablelora.tasks.chatterbot``...): what a run
#: records as its ``task_kind``, whatever the family.
KIND = "dialogue"

#: (metric of the runs' ``eval/<metric>``, column title, digits shown).
METRICS = (("loss", "loss", 3), ("ppl", "ppl", 2), ("rougeL", "ROUGE-L (%)", 2))
KEYS = ["model", "task", "label", "method"]
BEFORE = "before training"


def _cells(runs: pd.DataFrame, section: str, seeds: str) -> pd.DataFrame:
    """One row per (model, task, label, method): per metric the aggregated value (in display
    units: ROUGE-L in %), its std, n and runs; ``section`` is ``final`` or ``initial``."""
    wide = None
    for metric, _, _ in METRICS:
        column = f"{section}/eval/{metric}"
        values = pd.to_numeric(runs[column], errors="coerce") if column in runs else math.nan
        frame = runs.assign(
            value=values * metric_scale(metric), sign=-1.0 if lower_is_better(metric) else 1.0
        )
        frame.loc[frame["status"] != "completed", "value"] = math.nan
        cells = aggregate(frame, KEYS, seeds).rename(
            columns={k: f"{metric}_{k}" for k in ("value", "std", "n", "runs", "statuses")}
        )
        wide = cells if wide is None else wide.merge(cells, on=KEYS, how="outer")
    assert wide is not None
    return wide


def _stats(row: dict, metric: str) -> dict:
    return {k: row[f"{metric}_{k}"] for k in ("value", "std", "n", "runs", "statuses")}


@register_table(owns={"task_kind": KIND})
def dialogue(coll: Collection, seeds: str = "mean") -> Table | None:
    """Rows (model, task, method), columns the held-out ``loss``, ``ppl`` and ROUGE-L (%):
    mean ± sample std over seeds (or the best seed per column); a ``before training`` row
    (the step-0 evaluation, where the runs recorded one) comes first in each setting."""
    check_mode(seeds)
    runs = coll.runs
    if runs.empty:
        return None
    runs = runs[runs["task_kind"] == KIND]
    if runs.empty:
        return None
    cells = _cells(runs, "final", seeds)
    if any(f"initial/eval/{metric}" in runs for metric, _, _ in METRICS):
        before = _cells(runs.assign(label=BEFORE, method=""), "initial", seeds)
        before = before[before[[f"{m}_n" for m, _, _ in METRICS]].sum(axis=1) > 0]
        cells = pd.concat([before, cells], ignore_index=True)
    cells = cells.assign(is_run=cells["label"] != BEFORE)
    cells = sort_frame(cells, ["model", "task", "is_run", "method", "label"])
    records = cells.to_dict("records")
    display = pd.DataFrame(
        {
            "model": cells["model"],
            "task": cells["task"],
            "method": cells["label"],
            **{
                title: [cell_text(_stats(row, metric), seeds, digits) for row in records]
                for metric, title, digits in METRICS
            },
        }
    )
    data = cells.rename(columns={f"{m}_value": m for m, _, _ in METRICS}).drop(
        columns=["is_run", *(f"{m}_statuses" for m, _, _ in METRICS)]
    )
    aggregation = (
        "the best run over seeds, per column"
        if seeds == "best"
        else "mean ± sample std over seeds, n = runs with a value"
    )
    notes = [
        f"Cells: {aggregation}; '{BEFORE}': the step-0 evaluation of the same runs.",
        "loss: the token-weighted negative log-likelihood of the held-out reply tokens (their "
        "total over all replies / their number, nats per token); ppl = exp(loss) per run, then "
        "aggregated (so the mean ppl is at least exp(mean loss)); ROUGE-L: the mean F1 (%) of "
        "the greedy replies against the references (rouge-score, stemmed). Lower loss and ppl "
        "are better, higher ROUGE-L.",
    ]
    notes += not_completed_note(runs)
    return Table(
        "dialogue",
        "Dialogue: held-out reply loss, perplexity and ROUGE-L",
        display,
        data,
        notes,
        key_columns=3,
    )
