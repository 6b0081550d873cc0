"""The learning-rate selection curve of a tuned study: each method's score against lr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.collect import Collection
from analysis.plots.drawing import _labels_in_order, _setting_panels, register_plot


def lr_sweep_points(coll: Collection) -> pd.DataFrame:
    """One row per (model, task, label, lr) of a sweep over ``optim.lr``: ``value`` (the mean
    score over the completed runs, accuracies in %), ``std`` (over seeds, NaN for one),
    ``picked`` (:func:`~analysis.tables.tuned_lr.pick_learning_rates`'s pick) and ``metric``;
    empty when the runs do not vary the lr."""
    from analysis.tables import metric_scale
    from analysis.tables.tuned_lr import pick_learning_rates

    runs = coll.runs
    if runs.empty or "optim.lr" not in runs or runs["optim.lr"].nunique() < 2:
        return pd.DataFrame()
    points = pick_learning_rates(runs)
    metrics = runs.groupby(["model", "task"], dropna=False)["main_metric"].first()
    points = points.merge(metrics.rename("metric").reset_index(), on=["model", "task"])
    scale = points["metric"].map(metric_scale).astype(float)
    return points.assign(value=points["value"] * scale, std=points["std"] * scale)


@register_plot
def lr_sweep(coll: Collection, out_dir: Path) -> list[Path]:
    """The selection curve: each method's mean score against lr (log axis), bars = std over
    seeds, the picked lr ringed; a panel per (model, task)."""
    from analysis.tables import metric_scale

    points = lr_sweep_points(coll)
    if points.empty or points["value"].notna().sum() == 0:
        return []

    def draw(ax, rows: pd.DataFrame, colors: dict, notes: list[str]) -> None:
        rows = rows[rows["value"].notna()].sort_values("optim.lr")
        if rows.empty:  # no run of this setting completed
            return
        for label in _labels_in_order(rows["label"]):
            mine = rows[rows["label"] == label]
            ax.errorbar(
                mine["optim.lr"],
                mine["value"],
                yerr=np.nan_to_num(mine["std"].to_numpy(dtype=float)),
                color=colors[label],
                marker="o",
                markersize=3,
                capsize=2,
                label=label,
            )
            pick = mine[mine["picked"]]
            ax.scatter(
                pick["optim.lr"],
                pick["value"],
                s=90,
                facecolors="none",
                edgecolors=colors[label],
                linewidths=1.4,
                zorder=3,
            )
        metric = str(rows["metric"].iloc[0])
        unit = " (%)" if metric_scale(metric) != 1 else ""
        ax.set(xscale="log", xlabel="learning rate", ylabel=metric.removeprefix("eval/") + unit)

    split = coll.runs.get("task.eval_split", pd.Series(dtype=object)).dropna().unique()
    scored = f"on {split[0]}" if len(split) == 1 else "on the runs' eval splits"
    title = (
        f"Learning-rate selection: final score {scored} (mean over seeds, bars: std; "
        "ringed: the pick)"
    )
    return _setting_panels(out_dir, "lr_sweep", points, title, draw, step_axis=False)
