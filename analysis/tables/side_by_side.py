"""Methods side by side: accuracy, shrink and self-stability (main job, tuned study)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.collect import Collection, format_value
from analysis.tables.aggregation import metric_scale
from analysis.tables.formatting import DASH, Table, num_text
from analysis.tables.ordering import sort_frame
from analysis.tables.registry import register_table

#: The mid-run window of delta1/delta2: the probed steps in (1/4, 3/4] of the run.
WINDOW = (0.25, 0.75)


def _first_last(history: pd.DataFrame, key: str) -> pd.DataFrame:
    """Per run: the first and last logged value of ``key``."""
    rows = history[history["key"] == key].sort_values("step").groupby("run_id")["value"]
    return pd.DataFrame({"first": rows.first(), "last": rows.last()})


def _window_ratio(history: pd.DataFrame, steps: pd.Series) -> pd.Series:
    """Per run: mean delta1 / mean delta2 over the probed steps of the mid-run window."""
    deltas = history[history["key"].isin(["feat/delta1", "feat/delta2"])]
    wide = deltas.pivot_table(index=["run_id", "step"], columns="key", values="value")
    if not {"feat/delta1", "feat/delta2"} <= set(wide.columns):
        return pd.Series(dtype=float)
    wide = wide.reset_index()
    total = wide["run_id"].map(steps).astype(float)
    inside = (wide["step"] > WINDOW[0] * total) & (wide["step"] <= WINDOW[1] * total)
    means = wide[inside].groupby("run_id")[["feat/delta1", "feat/delta2"]].mean()
    return means["feat/delta1"] / means["feat/delta2"]


@register_table
def side_by_side(coll: Collection, seeds: str = "mean") -> Table | None:
    """Per (model, task, method): accuracy before and after training, how many LoRA layers
    stopped shrinking and the median stop step, ||A||_F (mean over layers) at the first and
    last probe, and delta1/delta2 over the mid-run window; means over seeds."""
    runs = coll.runs[coll.runs["status"] == "completed"].astype({"run_id": str})
    if runs.empty:
        return None
    history = coll.history.astype({"run_id": str, "key": str})
    history = history[history["run_id"].isin(set(runs["run_id"]))]
    norms = _first_last(history, "lora/norm_A")
    ratio = _window_ratio(history, runs.set_index("run_id")["steps"])
    per_run = runs.assign(
        before=[row.get(f"initial/{row['main_metric']}", math.nan) for _, row in runs.iterrows()],
        after=runs["score"],
        norm_first=runs["run_id"].map(norms["first"]),
        norm_last=runs["run_id"].map(norms["last"]),
        ratio=runs["run_id"].map(ratio),
    )
    for column in ("shrink/stopped", "shrink/layers", "shrink/stop_step_median"):
        if column not in per_run:
            per_run[column] = math.nan
    keys = ["model", "task", "label"]
    shown, data = [], []
    for key, group in sort_frame(per_run, keys).groupby(keys, sort=False):
        scale = metric_scale(group["main_metric"].iloc[0])
        values = {
            "before": group["before"].mean() * scale,
            "after": group["after"].mean() * scale,
            "stopped": group["shrink/stopped"].mean(),
            "layers": group["shrink/layers"].mean(),
            "median_stop_step": group["shrink/stop_step_median"].mean(),
            "norm_A_first": group["norm_first"].mean(),
            "norm_A_last": group["norm_last"].mean(),
            "delta_ratio_mid": np.exp(np.log(group["ratio"]).mean()),
        }
        data.append(dict(zip(keys, key)) | {"runs": len(group)} | values)
        stopped = (
            f"{num_text(values['stopped'], 0)}/{num_text(values['layers'], 0)}"
            if np.isfinite(values["layers"])
            else DASH
        )
        shown.append(
            {
                "method": key[2],
                "runs": str(len(group)),
                f"{group['main_metric'].iloc[0]} before": num_text(values["before"], 1),
                "after": num_text(values["after"], 1),
                "layers stopped": stopped,
                "median stop step": format_value(float(values["median_stop_step"])),
                "‖A‖_F first -> last": (
                    f"{num_text(values['norm_A_first'], 3)} -> {num_text(values['norm_A_last'], 3)}"
                ),
                "delta1/delta2 mid-run": num_text(values["delta_ratio_mid"], 2),
            }
        )
    settings = sorted({f"{m} on {t}" for m, t in zip(per_run["model"], per_run["task"])})
    notes = [
        f"{', '.join(settings)}; means over the runs (geometric for delta1/delta2). Accuracy "
        "in %: before = the step-0 evaluation, after = the final one.",
        "layers stopped: LoRA layers that met Stable-LoRA's stop rule / all (— for optimizers "
        "without a shrink); ||A|| = the mean over layers of ||A||_F at the first and last "
        "probe; delta1/delta2 = mean delta1 / mean delta2 over the probed steps in the middle "
        f"half of the run ({WINDOW[0]:g}-{WINDOW[1]:g} of the steps): about 1 when both "
        "factors learn, large when the update of B on the excess of A dominates.",
    ]
    return Table(
        "side_by_side",
        "Methods side by side: accuracy, shrink and self-stability",
        pd.DataFrame(shown),
        pd.DataFrame(data),
        notes,
        key_columns=1,
    )
