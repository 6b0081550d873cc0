"""The stop-rule ablation: shrinking methods by stop rule, beside the published numbers."""

from __future__ import annotations

import math

import pandas as pd

from analysis import published
from analysis.collect import Collection
from analysis.tables.aggregation import (
    aggregate,
    check_mode,
    display_values,
    not_completed_note,
    protocol_note,
    setting_column,
    setting_runs,
)
from analysis.tables.formatting import (
    Table,
    pivot_with_paper,
)
from analysis.tables.ordering import sort_frame
from analysis.tables.registry import register_table


@register_table
def ablation_stop_rule(coll: Collection, seeds: str = "mean") -> Table | None:
    """Shrinking methods by stop rule: rows (method, stop rule), columns models."""
    check_mode(seeds)
    if "optimizer.stop_rule" not in coll.runs or "optimizer.shrink_ratio" not in coll.runs:
        return None
    runs = setting_runs(coll, ["optimizer.stop_rule"])
    runs = runs[pd.to_numeric(runs["optimizer.shrink_ratio"], errors="coerce") > 0]
    if runs["optimizer.stop_rule"].nunique() < 2:
        return None
    runs = display_values(runs).assign(
        setting=setting_column(runs), stop_rule=runs["optimizer.stop_rule"].astype(str)
    )
    cells = aggregate(runs, ["label", "method", "stop_rule", "setting", "model", "task"], seeds)
    settings = sort_frame(cells[["model", "task", "setting"]].drop_duplicates(), ["model", "task"])[
        "setting"
    ].tolist()
    setting_info = cells.drop_duplicates("setting").set_index("setting")
    methods = dict(zip(cells["label"], cells["method"]))

    def paper(row, setting):
        info = setting_info.loc[setting]
        if methods[row["label"]] != "stable_lora" or info["task"] != "merged_qa":
            return math.nan
        return published.STOP_RULE_ABLATION.get(info["model"], {}).get(row["stop_rule"], math.nan)

    display, data = pivot_with_paper(
        cells, ["label", "stop_rule"], "setting", settings, seeds, paper
    )
    display = display.rename(columns={"label": "method", "stop_rule": "stop rule"})
    notes = [
        protocol_note(seeds),
        "Stop rules: norm = the paper's (stop once ||A||/n < "
        "||B||/m), never = shrink for the whole run, steps:N = shrink on steps 1..N. "
        "Paper: Stable-LoRA on the merged QA mixture.",
    ]
    notes += not_completed_note(runs)
    return Table(
        "ablation_stop_rule",
        "Stop-rule ablation: accuracy (%)",
        display,
        data,
        notes,
        key_columns=display.shape[1] - len(settings),
    )
