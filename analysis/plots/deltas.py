"""The feature-update magnitudes (delta1, delta2, delta3, dY), their ratio delta1/delta2,
and both by the scale of A0."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.collect import Collection, format_value, label_runs
from analysis.plots.drawing import (
    DELTA_STYLES,
    MAX_PANELS,
    SETTING,
    STYLE,
    _band,
    _by,
    _combos,
    _grid,
    _history,
    _legend,
    _limit,
    _per_setting,
    _pyplot,
    _save,
    _suptitle,
    _title,
    register_plot,
)


@register_plot
def deltas(coll: Collection, out_dir: Path) -> list[Path]:
    """delta1, delta2, delta3 and dY (RMS, mean over layers) against step, a panel per
    (setting, method); log scale."""
    frame = _history(coll, lambda k: k.isin(list(DELTA_STYLES)))
    if frame.empty:
        return []
    plt, notes = _pyplot(), []
    with plt.rc_context(STYLE):
        panels = _limit(_combos(frame, [*SETTING, "label"]), MAX_PANELS, "panels", notes)
        fig, axes = _grid(plt, len(panels))
        groups = _by(frame, [*SETTING, "label"])
        for ax, panel in zip(axes, panels):
            rows = groups[panel]
            for key, (color, linestyle) in DELTA_STYLES.items():
                _band(
                    ax,
                    rows[rows["key"] == key],
                    color,
                    key.removeprefix("feat/"),
                    linestyle,
                    log=True,
                )
            ax.set(
                yscale="log",
                title=f"{panel[-1]} · {_title(panel[:-1])}",
                xlabel="step",
                ylabel="RMS of the output update",
            )
            _legend(ax)
        _suptitle(
            fig,
            "Feature-update magnitudes (paper's numbering: delta1 = s dB A Z, delta2 = s B dA Z)",
            notes,
        )
        return _save(plt, fig, out_dir, "deltas")


def _ratio_frame(coll: Collection, columns: Iterable[str] = ()) -> pd.DataFrame:
    """delta1/delta2 per (run, step) where delta2 > 0, with the runs' columns."""
    frame = _history(coll, lambda k: k.isin(["feat/delta1", "feat/delta2"]), columns)
    if frame.empty:
        return frame
    by_key = {
        key: rows.set_index(["run_id", "step"])["value"] for key, rows in frame.groupby("key")
    }
    if set(by_key) != {"feat/delta1", "feat/delta2"}:
        return frame.iloc[0:0]
    delta2 = by_key["feat/delta2"]
    ratio = (by_key["feat/delta1"] / delta2[delta2 > 0]).dropna()
    ratio = ratio[np.isfinite(ratio)].rename("value").reset_index()
    info = frame.drop(columns=["key", "value", "step"]).drop_duplicates("run_id")
    return ratio.merge(info, on="run_id")


@register_plot
def delta_ratio(coll: Collection, out_dir: Path) -> list[Path]:
    """delta1/delta2 against step, a curve per method, a panel per setting; log scale."""
    return _per_setting(
        out_dir,
        "delta_ratio",
        _ratio_frame(coll),
        "delta1 / delta2",
        "delta1/delta2 (1: both factors move the output alike; mean over seeds, band: range)",
        log=True,
    )


@register_plot
def init_scale(coll: Collection, out_dir: Path) -> list[Path]:
    """Against step, per scale of A0: delta1/delta2 (top) and ||A||_F (bottom), a column per
    (setting, method); the claim is that a larger A0 makes delta1 dominate under AdamW and
    that shrinking brings the ratio back."""
    runs = coll.runs
    if "adapter.init_scale" not in runs or runs["adapter.init_scale"].nunique() < 2:
        return []
    relabelled = Collection(
        label_runs(runs.copy(), exclude=["adapter.init_scale"]), coll.history, coll.shrink
    )
    ratio = _ratio_frame(relabelled, ["adapter.init_scale"])
    norms = _history(relabelled, lambda k: k == "lora/norm_A", ["adapter.init_scale"])
    if ratio.empty and norms.empty:
        return []
    plt, notes = _pyplot(), []
    with plt.rc_context(STYLE):
        keys = [*SETTING, "label"]
        both = pd.concat([ratio[keys], norms[keys]])
        columns = _limit(_combos(both, keys), MAX_PANELS // 2, "methods", notes)
        fig, axes = plt.subplots(2, len(columns), figsize=(3.6 * len(columns), 5.4), squeeze=False)
        scales = sorted(runs["adapter.init_scale"].dropna().unique())
        cmap = plt.get_cmap("viridis")
        # Viridis up to 0.85: its last yellow is too pale on white.
        colors = {s: cmap(0.85 * i / max(len(scales) - 1, 1)) for i, s in enumerate(scales)}
        rows_of = [
            (_by(ratio, keys) if not ratio.empty else {}, "delta1 / delta2", True),
            (_by(norms, keys) if not norms.empty else {}, "||A||_F (mean over layers)", False),
        ]
        for col, panel in enumerate(columns):
            for row, (groups, ylabel, log) in enumerate(rows_of):
                ax = axes[row][col]
                mine = groups.get(panel)
                for scale in scales if mine is not None else []:
                    _band(
                        ax,
                        mine[mine["adapter.init_scale"] == scale],
                        colors[scale],
                        f"A0 × {format_value(scale)}",
                        log=log,
                    )
                if log:
                    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
                ax.set(
                    yscale="log" if log else "linear",
                    xlabel="step",
                    ylabel=ylabel,
                    title=f"{panel[-1]} · {_title(panel[:-1])}",
                )
                _legend(ax)
        _suptitle(fig, "Scale of A0: self-stability (mean over seeds, band: range)", notes)
        return _save(plt, fig, out_dir, "init_scale")
