"""The reviewers' controls (AdamW with a large weight decay, shrinking for N steps) beside
LoRA and Stable-LoRA."""

from __future__ import annotations

import math

import pandas as pd

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
    cell_text,
    num_text,
)
from analysis.tables.ordering import sort_frame
from analysis.tables.registry import register_table


@register_table
def reviewer_controls(coll: Collection, seeds: str = "mean") -> Table | None:
    """The reviewers' controls beside LoRA and Stable-LoRA: accuracy, the difference from
    each, and when the layers stopped shrinking."""
    runs = table_runs(coll, seeds)
    if runs is None:
        return None
    fixed_steps = runs.get("optimizer.stop_rule", pd.Series("", index=runs.index)).astype(str)
    shrinks = pd.to_numeric(runs.get("optimizer.shrink_ratio", 0), errors="coerce") > 0
    is_control = (runs["method"] == "adamw_large_wd") | (
        shrinks & fixed_steps.str.startswith("steps:")
    )
    if not is_control.any():
        return None
    runs = display_values(runs)
    keys = ["model", "task", "label", "method"]
    cells = sort_frame(aggregate(runs, keys, seeds), keys)
    if "shrink/stop_step_median" in runs:
        # a diverged run's stops record its divergence, not the stop rule (it counts as
        # missing: not_completed_note below)
        sound = runs[runs["status"] != "diverged"]
        stops = sound.groupby(keys, dropna=False)["shrink/stop_step_median"].median()
        cells = cells.merge(stops.rename("median_stop_step").reset_index(), on=keys, how="left")
    else:
        cells["median_stop_step"] = math.nan
    # The references are the methods as the paper runs them: in a sweep that also varies the
    # scale of A0 (experiment=ablations), only their runs at peft's A0 (x 1).
    init_scale = pd.to_numeric(runs.get("adapter.init_scale", 1.0), errors="coerce")
    default_init = pd.Series(init_scale, index=runs.index).fillna(1.0) == 1.0
    lora = runs[(runs["method"] == "lora") & default_init]
    plain = runs[(runs["method"] == "stable_lora") & (fixed_steps == "norm") & default_init]
    for name, ref_runs in {"lora": lora, "stable_lora": plain}.items():
        ref = aggregate(ref_runs, ["model", "task"], seeds)[["model", "task", "value"]]
        cells = cells.merge(
            ref.rename(columns={"value": f"ref_{name}"}), on=["model", "task"], how="left"
        )
        cells[f"diff_{name}"] = cells["value"] - cells[f"ref_{name}"]
    shown = pd.DataFrame(
        {
            "model": cells["model"],
            "task": cells["task"],
            "method": cells["label"],
            "accuracy": [cell_text(cell, seeds) for cell in cells.to_dict("records")],
            "Δ vs lora": cells["diff_lora"].map(lambda v: num_text(v, signed=True)),
            "Δ vs stable_lora": cells["diff_stable_lora"].map(lambda v: num_text(v, signed=True)),
            "median stop step": cells["median_stop_step"].map(lambda v: num_text(v, 0)),
        }
    )
    notes = [
        protocol_note(seeds),
        "Δ: percentage points against the mean (or best) of the "
        "reference's runs on the same model and task; Stable-LoRA = the paper's stop rule "
        "(norm); both at peft's A0 (init scale 1). adamw_large_wd: AdamW with a large "
        "decoupled weight decay on A (or A and B); steps:N: shrink on steps 1..N only. "
        "median stop step: the median over layers of the step a layer stopped shrinking "
        "(median over seeds).",
    ]
    notes += not_completed_note(runs)
    return Table(
        "reviewer_controls",
        "Reviewer controls: accuracy (%)",
        shown,
        cells,
        notes,
        key_columns=3,
    )
