"""The learning-rate selection curve of a tuned study: each method's score against lr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.collect import Collection
from analysis.plots.drawing import (
    MAX_PANELS,
    SETTING,
    STYLE,
    _by,
    _combos,
    _grid,
    _labels_in_order,
    _legend,
    _limit,
    _pyplot,
    _suptitle,
    _title,
    label_colors,
    register_plot,
    save_figure,
)


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
    plt, notes = _pyplot(), []
    with plt.rc_context(STYLE):
        settings = _limit(_combos(points, SETTING), MAX_PANELS, "settings", notes)
        fig, axes = _grid(plt, len(settings))
        colors = label_colors(_labels_in_order(points["label"]))
        groups = _by(points, SETTING)
        for ax, setting in zip(axes, settings):
            rows = groups[setting].sort_values("optim.lr")
            for label in _labels_in_order(rows["label"]):
                mine = rows[(rows["label"] == label) & rows["value"].notna()]
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
            ylabel = metric.removeprefix("eval/") + unit
            ax.set(xscale="log", title=_title(setting), xlabel="learning rate", ylabel=ylabel)
            _legend(ax)
        split = coll.runs.get("task.eval_split", pd.Series(dtype=object)).dropna().unique()
        scored = f"on {split[0]}" if len(split) == 1 else "on the runs' eval splits"
        _suptitle(
            fig,
            f"Learning-rate selection: final score {scored} (mean over seeds, bars: std; "
            "ringed: the pick)",
            notes,
        )
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / "lr_sweep.png", out_dir / "lr_sweep.pdf"]
        for path in paths:
            save_figure(fig, path)
        plt.close(fig)
        return paths
