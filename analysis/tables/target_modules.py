"""The target-module ablation: accuracy by LoRA target-module set and method."""

from __future__ import annotations

import math

from analysis import published
from analysis.collect import Collection
from analysis.tables.aggregation import (
    aggregate,
    display_values,
    not_completed_note,
    protocol_note,
    table_runs,
)
from analysis.tables.formatting import (
    Table,
    pivot_with_paper,
)
from analysis.tables.ordering import sort_frame
from analysis.tables.registry import register_table

MODULE_SHORT = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}


def modules_text(modules: str) -> str:
    """``"q_proj,v_proj"`` -> ``"q,v"``."""
    return ",".join(MODULE_SHORT.get(m, m) for m in str(modules).split(","))


@register_table
def ablation_target_modules(coll: Collection, seeds: str = "mean") -> Table | None:
    """Accuracy by target-module set: rows (model, task, modules), columns methods."""
    runs = table_runs(coll, seeds, "adapter.target_modules")
    if runs is None:
        return None
    order = {m: i for i, m in enumerate(published.ALL_PROJECTIONS)}
    runs = display_values(runs).assign(
        modules=runs["adapter.target_modules"].map(
            lambda m: ",".join(sorted(str(m).split(","), key=lambda x: (order.get(x, 99), x)))
        )
    )
    cells = aggregate(runs, ["model", "task", "modules", "label", "method"], seeds)
    labels = sort_frame(cells[["label"]].drop_duplicates(), ["label"])["label"].tolist()
    methods = dict(zip(cells["label"], cells["method"]))

    def paper(row, label):
        table = published.TARGET_MODULES_ABLATION.get((row["model"], row["task"]), {})
        modules = tuple(sorted(row["modules"].split(",")))
        return table.get(modules, {}).get(methods[label], math.nan)

    display, data = pivot_with_paper(
        cells, ["model", "task", "modules"], "label", labels, seeds, paper
    )
    display["modules"] = display["modules"].map(lambda m: modules_text(m) if m else m)
    notes = [protocol_note(seeds), "modules: the LoRA target projections (q = q_proj, ...)."]
    notes += not_completed_note(runs)
    return Table(
        "ablation_target_modules",
        "Target-module ablation: accuracy (%)",
        display,
        data,
        notes,
        key_columns=display.shape[1] - len(labels),
    )
