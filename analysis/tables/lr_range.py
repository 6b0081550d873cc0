"""The mechanism per setting of an lr sweep (the lr range study, issue 31): per (model, task,
setting, method), when the layers stop shrinking (q_proj and v_proj apart), ||A||_F at the
first and last probe, how many layers' ||A||_F ever fell below its start (the paper's Figure 2
claim is that under plain AdamW it does not), and the mid-run delta1/delta2.

``mechanism_runs`` gives the per-run numbers (the ``lr_range`` plot reads the same ones).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.collect import Collection, format_value
from analysis.labels import setting_labels
from analysis.tables.formatting import DASH, Table, num_text
from analysis.tables.ordering import sort_frame
from analysis.tables.registry import register_table
from analysis.tables.shrink_stops import layer_position
from analysis.tables.side_by_side import WINDOW

#: The projections the table shows apart (the paper's targets); others are counted in neither.
PROJECTIONS = ("q_proj", "v_proj")
#: A per-layer ||A||_F history key: ``lora/<layer>/norm_A``.
LAYER_NORM = ("lora/", "/norm_A")


def window_ratio(history: pd.DataFrame, steps: pd.Series) -> pd.Series:
    """Per run: the median over the probed steps in the middle half of the run (steps in
    (1/4, 3/4] of its length) of delta1/delta2, the ratio of the layer means (``feat/delta1``
    over ``feat/delta2`` at each probed step)."""
    deltas = history[history["key"].isin(["feat/delta1", "feat/delta2"])]
    if deltas.empty:
        return pd.Series(dtype=float)
    wide = deltas.pivot_table(index=["run_id", "step"], columns="key", values="value")
    if not {"feat/delta1", "feat/delta2"} <= set(wide.columns):
        return pd.Series(dtype=float)
    wide = wide.reset_index()
    wide = wide[wide["feat/delta2"] > 0]
    total = wide["run_id"].map(steps).astype(float)
    inside = (wide["step"] > WINDOW[0] * total) & (wide["step"] <= WINDOW[1] * total)
    ratio = wide["feat/delta1"] / wide["feat/delta2"]
    return ratio[inside].groupby(wide.loc[inside, "run_id"]).median()


def below_start(history: pd.DataFrame) -> pd.DataFrame:
    """Per (run, layer): whether the layer's ||A||_F at a later probe is below its first
    (``below``), with the layer's projection."""
    keys = history["key"]
    layered = history[keys.str.startswith(LAYER_NORM[0]) & keys.str.endswith(LAYER_NORM[1])]
    layered = layered[layered["key"] != "lora/norm_A"]
    if layered.empty:
        return pd.DataFrame(columns=["run_id", "layer", "projection", "below"])
    layered = layered.sort_values("step")
    grouped = layered.groupby(["run_id", "key"], sort=False)["value"]
    frame = pd.DataFrame(
        {
            "first": grouped.first(),
            "later_min": grouped.apply(lambda v: v.iloc[1:].min()),
            "probes": grouped.size(),
        }
    ).reset_index()
    frame = frame[frame["probes"] > 1]
    frame["layer"] = frame["key"].str.slice(len(LAYER_NORM[0]), -len(LAYER_NORM[1]))
    frame["projection"] = [layer_position(layer)[0] for layer in frame["layer"]]
    frame["below"] = frame["later_min"] < frame["first"]
    return frame[["run_id", "layer", "projection", "below"]]


def mechanism_runs(coll: Collection) -> pd.DataFrame:
    """One row per completed run: model, task, method, label, setting, seed, the setting's
    ``optim.lr`` and ``adapter.init_scale``, ``delta_ratio_mid`` (:func:`window_ratio`),
    ``norm_A_first`` / ``norm_A_last`` (mean over layers), per projection ``<p>_layers``,
    ``<p>_stopped``, ``<p>_median_stop`` (the median over its stopped layers) and
    ``<p>_below`` (layers whose ||A||_F fell below its start), and ``score``."""
    runs = coll.runs[coll.runs["status"] == "completed"].astype({"run_id": str}).copy()
    if runs.empty:
        return pd.DataFrame()
    runs["setting"] = setting_labels(runs)
    history = coll.history.astype({"run_id": str, "key": str})
    history = history[history["run_id"].isin(set(runs["run_id"]))]
    norms = history[history["key"] == "lora/norm_A"].sort_values("step").groupby("run_id")["value"]
    runs["norm_A_first"] = runs["run_id"].map(norms.first())
    runs["norm_A_last"] = runs["run_id"].map(norms.last())
    ratio = window_ratio(history, runs.set_index("run_id")["steps"])
    runs["delta_ratio_mid"] = runs["run_id"].map(ratio)
    below = below_start(history)
    shrink = coll.shrink.astype({"run_id": str}) if not coll.shrink.empty else coll.shrink
    for projection in PROJECTIONS:
        mine = below[below["projection"] == projection].groupby("run_id")["below"]
        runs[f"{projection}_below"] = runs["run_id"].map(mine.sum())
        runs[f"{projection}_norm_layers"] = runs["run_id"].map(mine.size())
        if shrink.empty:
            for column in ("layers", "stopped", "median_stop"):
                runs[f"{projection}_{column}"] = math.nan
            continue
        stops = shrink[shrink["layer"].map(lambda layer: layer_position(layer)[0]) == projection]
        by_run = stops.groupby("run_id")["stop_step"]
        runs[f"{projection}_layers"] = runs["run_id"].map(by_run.size())
        runs[f"{projection}_stopped"] = runs["run_id"].map(by_run.count())
        runs[f"{projection}_median_stop"] = runs["run_id"].map(by_run.median())
        runs[f"{projection}_stop_steps"] = runs["run_id"].map(
            by_run.apply(lambda s: tuple(s.dropna().astype(float)))
        )
    for column in ("optim.lr", "adapter.init_scale"):
        if column not in runs:
            runs[column] = math.nan
    return runs


def _geo(values: pd.Series) -> float:
    values = values[np.isfinite(values) & (values > 0)]
    return float(np.exp(np.log(values).mean())) if len(values) else math.nan


def _count(stopped: float, layers: float) -> str:
    if not np.isfinite(layers) or layers == 0:
        return DASH
    return f"{int(stopped)}/{int(layers)}"


def _ratio_text(row: dict) -> str:
    """``0.53 [0.51, 0.56]``: the geometric mean over seeds and the range."""
    if not np.isfinite(row["delta_ratio_mid"]):
        return DASH
    low, high = num_text(row["delta_ratio_min"], 2), num_text(row["delta_ratio_max"], 2)
    return f"{num_text(row['delta_ratio_mid'], 2)} [{low}, {high}]"


@register_table
def lr_mechanism(coll: Collection, seeds: str = "mean") -> Table | None:
    """Per setting (lr, A0 scale) and method: layers stopped and the median stop step (q_proj
    and v_proj apart), ||A||_F first -> last, layers whose ||A||_F fell below its start, and
    the mid-run delta1/delta2 (over seeds)."""
    runs = mechanism_runs(coll)
    if runs.empty:
        return None
    keys = ["model", "task", "setting", "label", "method"]
    shown, data = [], []
    ordered = sort_frame(runs, ["model", "task", "adapter.init_scale", "optim.lr", "label"])
    for key, group in ordered.groupby(keys, sort=False):
        row = dict(zip(keys, key)) | {
            "optim.lr": group["optim.lr"].iloc[0],
            "adapter.init_scale": group["adapter.init_scale"].iloc[0],
            "runs": len(group),
            "norm_A_first": group["norm_A_first"].mean(),
            "norm_A_last": group["norm_A_last"].mean(),
            "delta_ratio_mid": _geo(group["delta_ratio_mid"]),
            "delta_ratio_min": group["delta_ratio_mid"].min(),
            "delta_ratio_max": group["delta_ratio_mid"].max(),
            "accuracy": 100 * group["score"].mean(),
        }
        cells = {}
        for projection in PROJECTIONS:
            layers = group[f"{projection}_layers"].sum(min_count=1)
            stopped = group[f"{projection}_stopped"].sum(min_count=1)
            listed = group.get(f"{projection}_stop_steps", pd.Series(dtype=object)).dropna()
            steps = [step for steps_of_run in listed for step in steps_of_run]
            below = group[f"{projection}_below"].sum(min_count=1)
            norm_layers = group[f"{projection}_norm_layers"].sum(min_count=1)
            median = float(np.median(steps)) if steps else math.nan
            row |= {
                f"{projection}_layers": layers,
                f"{projection}_stopped": stopped,
                f"{projection}_median_stop": median,
                f"{projection}_below": below,
                f"{projection}_norm_layers": norm_layers,
            }
            shrinks = np.isfinite(stopped)
            cells[f"{projection} stopped"] = _count(stopped, layers if shrinks else math.nan)
            cells[f"{projection} median stop"] = num_text(median, 0)
            cells[f"{projection} ‖A‖ < start"] = _count(below, norm_layers)
        data.append(row)
        shown.append(
            {
                "model": key[0],
                "task": key[1],
                "setting": key[2] or DASH,
                "method": key[4],
                "runs": str(len(group)),
                "accuracy (%)": num_text(row["accuracy"], 2),
                **cells,
                "‖A‖_F first -> last": (
                    f"{num_text(row['norm_A_first'], 3)} -> {num_text(row['norm_A_last'], 3)}"
                ),
                "delta1/delta2 mid-run": _ratio_text(row),
            }
        )
    steps = format_value(float(runs["steps"].max()))
    notes = [
        "Per setting (the hyper-parameters the methods share and vary: lr, scale of A0) and "
        "method, over its completed runs (seeds). accuracy: the final main metric, mean over "
        "seeds.",
        "<proj> stopped: (layer, seed) pairs of that projection that met Stable-LoRA's stop rule "
        "/ all (— for optimizers without a shrink); median stop: the median step at which they "
        f"stopped (of {steps} steps).",
        "‖A‖ < start: (layer, seed) pairs whose ||A||_F at some later probe is below its value at "
        "the first probe / all with two probes or more (the paper's Figure 2 claims that under "
        "plain AdamW ||A||_F does not fall below its start).",
        "‖A‖_F first -> last: the mean over layers at the first and last probe, mean over seeds.",
        "delta1/delta2 mid-run: per run, the median over the probed steps in the middle half of "
        f"the run ({WINDOW[0]:g}-{WINDOW[1]:g} of the steps) of the ratio of the layer means of "
        "delta1 and delta2; the geometric mean over seeds [min, max]. Above 1: the update of B "
        "on A's excess dominates (where the paper expects shrinking A to help).",
    ]
    return Table(
        "lr_mechanism",
        "The mechanism per setting: stop steps, ||A||_F and delta1/delta2",
        pd.DataFrame(shown),
        pd.DataFrame(data),
        notes,
        key_columns=4,
    )
