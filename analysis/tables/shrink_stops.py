"""When the layers stopped shrinking (Figure 2's stop steps), over layers and seeds."""

from __future__ import annotations

import pandas as pd

from analysis.collect import Collection, format_value
from analysis.tables.aggregation import (
    sort_frame,
)
from analysis.tables.formatting import (
    Table,
    num_text,
)


def shrink_stops(coll: Collection, seeds: str = "mean") -> Table | None:
    """When the layers stopped shrinking (Stable-LoRA's stop rule), over layers and seeds."""
    if coll.shrink.empty:
        return None
    keys = ["model", "task", "label", "method"]
    layers = coll.shrink.merge(coll.runs[["run_id", *keys, "steps"]], on="run_id")
    rows_shown, data_rows = [], []
    for key, group in sort_frame(layers, keys).groupby(keys, dropna=False, sort=False):
        stops = group["stop_step"].dropna().astype(float)
        runs = group["run_id"].nunique()
        data = dict(zip(keys, key)) | {
            "runs": runs,
            "layers": group["layer"].nunique(),
            "layer_runs": len(group),
            "stopped": len(stops),
            "first": stops.min(),
            "median": stops.median(),
            "last": stops.max(),
            "steps": group["steps"].max(),
        }
        data_rows.append(data)
        rows_shown.append(
            {
                "model": data["model"],
                "task": data["task"],
                "method": data["label"],
                "runs": str(runs),
                "layers": str(data["layers"]),
                "stopped": f"{data['stopped']}/{data['layer_runs']}",
                "first stop": num_text(data["first"], 0),
                "median stop": num_text(data["median"], 0),
                "last stop": num_text(data["last"], 0),
                "steps": format_value(data["steps"]),
            }
        )
    notes = [
        "Over every (layer, seed): stopped = layers that met the stop rule / all; the "
        "steps are those on which the layer stopped (it never shrinks again); layers "
        "that did not stop shrank on every step of the run."
    ]
    return Table(
        "shrink_stops",
        "When each layer stopped shrinking",
        pd.DataFrame(rows_shown),
        pd.DataFrame(data_rows),
        notes,
        key_columns=3,
    )
