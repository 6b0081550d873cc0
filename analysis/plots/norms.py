"""The LoRA factors' norms (Figure 2) and the steps at which the layers stopped shrinking."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.collect import Collection
from analysis.plots.drawing import (
    MAX_LINES,
    MAX_PANELS,
    SETTING,
    STYLE,
    _by,
    _combos,
    _grid,
    _history,
    _labels_in_order,
    _legend,
    _limit,
    _lines,
    _pyplot,
    _save,
    _suptitle,
    _title,
    label_colors,
    register_plot,
)


@register_plot
def figure2_norms(coll: Collection, out_dir: Path) -> list[Path]:
    """Figure 2: ||A||_F and ||B||_F against step per method (band over seeds and layers)."""
    per_layer = _history(coll, lambda k: k.str.match(r"^lora/.+/norm_[AB]$"))
    frame = per_layer
    if frame.empty:
        frame = _history(coll, lambda k: k.str.match(r"^lora/norm_[AB]$"))
    if frame.empty:
        return []
    frame = frame.assign(factor=frame["key"].str[-1])
    plt, notes = _pyplot(), []
    with plt.rc_context(STYLE):
        settings = _limit(_combos(frame, SETTING), MAX_PANELS // 2, "settings", notes)
        fig, axes = _grid(plt, 2 * len(settings), ncols=2)
        colors = label_colors(_labels_in_order(frame["label"]))
        groups = _by(frame, [*SETTING, "factor"])
        stops = _stop_steps(coll)
        for i, setting in enumerate(settings):
            for j, factor in enumerate("AB"):
                ax = axes[2 * i + j]
                rows = groups.get((*setting, factor))
                if rows is not None:
                    _lines(ax, rows, colors, notes)
                _stop_marks(ax, stops.get(setting), colors)
                ax.set(
                    title=f"||{factor}||_F · {_title(setting)}",
                    xlabel="step",
                    ylabel=f"||{factor}||_F",
                )
                _legend(ax)
        source = "layers and seeds" if not per_layer.empty else "seeds (mean over layers)"
        marks = "; ticks: a layer stops shrinking" if not coll.shrink.empty else ""
        _suptitle(fig, f"LoRA factor norms (mean, band: range over {source}{marks})", notes)
        return _save(plt, fig, out_dir, "figure2_norms")


def _stop_steps(coll: Collection) -> dict[tuple, pd.DataFrame]:
    """Per setting: the (label, stop_step) of every layer that stopped shrinking."""
    if coll.shrink.empty:
        return {}
    frame = coll.shrink.dropna(subset=["stop_step"]).astype({"run_id": str})
    frame = frame.merge(coll.runs[["run_id", *SETTING, "label"]].astype({"run_id": str}))
    return _by(frame, SETTING)


def _stop_marks(ax, stops: pd.DataFrame | None, colors: dict) -> None:
    """A tick at the bottom of the panel at each layer's stop step (a method's colour; taller
    where several layers stop on the same step)."""
    if stops is None:
        return
    for label, rows in stops.groupby("label", sort=False):
        counts = rows["stop_step"].astype(float).value_counts()
        for step, count in counts.items():
            ax.plot(
                [step, step],
                [0.0, 0.03 + 0.02 * min(count, 10)],
                transform=ax.get_xaxis_transform(),
                color=colors.get(label, "k"),
                linewidth=0.8,
            )


@register_plot
def shrink_stops(coll: Collection, out_dir: Path) -> list[Path]:
    """The step at which each layer stopped shrinking; a cross at the run's end for a layer
    that never stopped. A panel per setting, a colour per method, seeds side by side."""
    if coll.shrink.empty:
        return []
    columns = ["run_id", *SETTING, "label", "seed", "steps"]
    frame = coll.shrink.merge(coll.runs[columns].astype({"run_id": str}), on="run_id")
    if frame.empty:
        return []
    plt, notes = _pyplot(), []
    with plt.rc_context(STYLE):
        settings = _limit(_combos(frame, SETTING), MAX_PANELS, "settings", notes)
        layers_max = frame.groupby(SETTING)["layer"].nunique().max()
        fig, axes = _grid(
            plt, len(settings), ncols=2, width=5.0, height=max(2.8, 0.18 * layers_max + 1.0)
        )
        colors = label_colors(_labels_in_order(frame["label"]))
        groups = _by(frame, SETTING)
        for ax, setting in zip(axes, settings):
            rows = groups[setting]
            layers = sorted(rows["layer"].unique(), key=_layer_order)
            position = {layer: i for i, layer in enumerate(layers)}
            labels = _limit(_labels_in_order(rows["label"]), MAX_LINES, "methods", notes)
            for k, label in enumerate(labels):
                mine = rows[rows["label"] == label]
                offset = (k - (len(labels) - 1) / 2) * 0.8 / max(len(labels), 1)
                y = mine["layer"].map(position) + offset
                stopped = mine["stop_step"].notna()
                ax.scatter(
                    mine.loc[stopped, "stop_step"].astype(float),
                    y[stopped],
                    s=12,
                    color=colors[label],
                    label=label,
                )
                if (~stopped).any():
                    ax.scatter(
                        mine.loc[~stopped, "steps"].astype(float),
                        y[~stopped],
                        s=14,
                        marker="x",
                        color=colors[label],
                        label=f"{label}: still shrinking at the end",
                    )
            ax.set_yticks(range(len(layers)), [_short_layer(layer) for layer in layers], fontsize=6)
            ax.set(title=_title(setting), xlabel="step the layer stopped shrinking")
            _legend(ax)
        _suptitle(fig, "Shrink stop step per layer (x: still shrinking at the end)", notes)
        return _save(plt, fig, out_dir, "shrink_stops")


def _layer_order(layer: str):
    return [int(p) if p.isdigit() else p for p in layer.split(".")]


def _short_layer(layer: str) -> str:
    return layer.removeprefix("base_model.model.").removeprefix("model.").replace("self_attn.", "")
