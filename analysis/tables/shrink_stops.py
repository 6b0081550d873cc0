"""When the layers stopped shrinking (Figure 2's stop steps), over layers and seeds."""

from __future__ import annotations

import pandas as pd

from analysis.collect import Collection, format_value
from analysis.tables.formatting import (
    Table,
    num_text,
)
from analysis.tables.ordering import sort_frame
from analysis.tables.registry import register_table


def stop_layers(coll: Collection, columns: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """The shrink rows (one per layer and run) with the runs' ``columns``, diverged runs left
    out, and a note naming those: the steps a diverged run's layers "stopped" on (often its
    first ones, as its norms ran away) record its divergence, not the stop rule in training.
    Empty rows when no run is left."""
    runs = coll.runs[list(dict.fromkeys(["run_id", "run", "status", *columns]))]
    layers = coll.shrink.merge(runs, on="run_id")
    diverged = layers["status"] == "diverged"
    names = sorted(layers.loc[diverged, "run"].astype(str).unique())
    notes = (
        [
            f"Left out: {len(names)} diverged run{'s' * (len(names) > 1)} (a diverged run's "
            f"stops record its divergence, not the stop rule): {'; '.join(names)}."
        ]
        if names
        else []
    )
    return layers[~diverged], notes


@register_table
def shrink_stops(coll: Collection, seeds: str = "mean") -> Table | None:
    """When the layers stopped shrinking (Stable-LoRA's stop rule), over layers and seeds."""
    if coll.shrink.empty:
        return None
    keys = ["model", "task", "label", "method"]
    layers, left_out = stop_layers(coll, [*keys, "steps"])
    if layers.empty:
        return None
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
        "that did not stop shrank on every step of the run.",
        *left_out,
    ]
    return Table(
        "shrink_stops",
        "When each layer stopped shrinking",
        pd.DataFrame(rows_shown),
        pd.DataFrame(data_rows),
        notes,
        key_columns=3,
    )


def layer_position(layer: str) -> tuple[str, int | None]:
    """``model.layers.12.self_attn.v_proj`` -> (``v_proj``, 12); depth None without one."""
    parts = layer.split(".")
    depth = next((int(p) for p in parts if p.isdigit()), None)
    return parts[-1].split(":")[0], depth


@register_table
def shrink_stops_by_layer(coll: Collection, seeds: str = "mean", bands: int = 4) -> Table | None:
    """Stop steps by projection and by depth (``bands`` equal bands of the layer index), over
    layers and seeds: where in the network the stop rule fires first."""
    if coll.shrink.empty:
        return None
    keys = ["model", "task", "label", "method"]
    layers, left_out = stop_layers(coll, keys)
    if layers.empty:
        return None
    positions = layers["layer"].map(layer_position)
    layers = layers.assign(projection=[p for p, _ in positions], depth=[d for _, d in positions])
    deepest = layers["depth"].max()
    width = (int(deepest) + 1 + bands - 1) // bands if pd.notna(deepest) else None

    def band(depth) -> str:
        if width is None or pd.isna(depth):
            return "all"
        first = int(depth) // width * width
        return f"{first}-{min(first + width - 1, int(deepest))}"

    layers["depth_band"] = layers["depth"].map(band)
    rows_shown, data_rows = [], []
    groups = sort_frame(layers, keys).groupby(
        [*keys, "projection", "depth_band"], dropna=False, sort=False
    )
    for key, group in groups:
        stops = group["stop_step"].dropna().astype(float)
        data = dict(zip([*keys, "projection", "depth_band"], key)) | {
            "layer_runs": len(group),
            "stopped": len(stops),
            "first": stops.min(),
            "median": stops.median(),
            "last": stops.max(),
        }
        data_rows.append(data)
        rows_shown.append(
            {
                "model": data["model"],
                "task": data["task"],
                "method": data["label"],
                "projection": data["projection"],
                "layers": data["depth_band"],
                "stopped": f"{data['stopped']}/{data['layer_runs']}",
                "first stop": num_text(data["first"], 0),
                "median stop": num_text(data["median"], 0),
                "last stop": num_text(data["last"], 0),
            }
        )
    notes = [
        "Per projection and band of layer indices (depth), over every (layer, seed): stopped "
        "= layers that met the stop rule / all, and the steps on which they stopped.",
        *left_out,
    ]
    return Table(
        "shrink_stops_by_layer",
        "When each layer stopped shrinking, by projection and depth",
        pd.DataFrame(rows_shown),
        pd.DataFrame(data_rows),
        notes,
        key_columns=5,
    )
