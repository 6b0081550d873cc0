"""What every figure shares: the style (a fixed colour per method), the history rows of a
plot, bands, grids of panels, titles, legends and saving (PNG and PDF, byte-identical when
rebuilt); and the registry of plots (``@register_plot``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.collect import Collection

#: Every plot builder, by name (in the report's order once ``analysis.plots`` is imported).
PLOTS: dict[str, Callable[[Collection, Path], list[Path]]] = {}


def register_plot(draw=None, *, name: str | None = None):
    """Register ``draw`` (``(collection, out_dir) -> paths written``, ``[]`` when the records
    lack what it draws) as the plot ``name`` (default: the function's name); use as
    ``@register_plot`` or ``@register_plot(name="eval")``."""

    def register(function):
        key = name or function.__name__
        if key in PLOTS and PLOTS[key].__module__ != function.__module__:
            raise ValueError(f"two plots are named {key!r}: rename one.")
        PLOTS[key] = function
        return function

    return register if draw is None else register(draw)


STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 7,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.4,
    "legend.frameon": False,
    "pdf.fonttype": 42,
}
#: A fixed colour per method, so that a method looks the same in every figure.
METHOD_COLORS = {
    "lora": "#1f77b4",
    "rslora": "#17becf",
    "loraplus": "#ff7f0e",
    "dora": "#aec7e8",
    "adalora": "#ffbb78",
    "riemann": "#2ca02c",
    "lora_rite": "#9467bd",
    "adamw_large_wd": "#7f7f7f",
    "shrink_fixed_steps": "#c49c94",
    "stable_lora": "#d62728",
    "stable_rslora": "#e377c2",
    "stable_loraplus": "#8c564b",
    "stable_dora": "#ff9896",
    "stable_adalora": "#f7b6d2",
}
EXTRA_COLORS = (
    "#bcbd22",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
    "#3182bd",
    "#e6550d",
    "#31a354",
    "#756bb1",
)
DELTA_STYLES = {
    "feat/delta1": ("C0", "-"),
    "feat/delta2": ("C1", "-"),
    "feat/delta3": ("C2", ":"),
    "feat/dY": ("k", "--"),
}
SETTING = ["model", "task"]
MAX_PANELS = 24  # a figure shows the first panels (in the tables' order), the title says so
MAX_LINES = 10  # and at most this many methods per panel


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_colors(labels: Iterable[str]) -> dict[str, str]:
    """A colour per label: the method's own for the first label of each method, then a fixed
    extra palette (in order) for its other labels, so a sweep always draws the same
    colours and a method looks the same in every figure."""
    colors, extra, seen = {}, iter(EXTRA_COLORS * 10), set()
    for label in labels:
        method = label.split(",")[0]
        first = method not in seen and method in METHOD_COLORS
        seen.add(method)
        colors[label] = METHOD_COLORS[method] if first else next(extra)
    return colors


def _labels_in_order(labels: Iterable[str]) -> list[str]:
    from analysis.tables import METHOD_ORDER

    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    unique = dict.fromkeys(labels)
    return sorted(unique, key=lambda lab: (rank.get(lab.split(",")[0], len(rank)), lab))


def _history(
    coll: Collection, keys: Callable[[pd.Series], pd.Series], columns: Iterable[str] = ()
) -> pd.DataFrame:
    """History rows whose key passes ``keys`` (a vectorised predicate on the key column),
    joined with the runs' model, task, label, method, seed (and ``columns``)."""
    history = coll.history
    if history.empty:
        return history.assign(**{c: [] for c in ["model", "task", "label", "method", "seed"]})
    key_names = pd.Series(
        history["key"].cat.categories if hasattr(history["key"], "cat") else history["key"].unique()
    )
    wanted = set(key_names[keys(key_names.astype(str)).to_numpy()])
    rows = history[history["key"].isin(wanted)].astype({"run_id": str, "key": str})
    info = coll.runs[["run_id", *SETTING, "label", "method", "seed", *columns]]
    return rows.merge(info.astype({"run_id": str}), on="run_id")


def _band(
    ax, frame: pd.DataFrame, color: str, label: str | None, linestyle: str = "-", log: bool = False
) -> None:
    """Mean line over everything at a step (seeds, layers), band = range."""
    frame = frame[np.isfinite(frame["value"])]
    if log:
        frame = frame[frame["value"] > 0]
    if frame.empty:
        return
    stats = frame.groupby("step")["value"].agg(["mean", "min", "max"])
    ax.plot(stats.index, stats["mean"], color=color, linestyle=linestyle, label=label)
    if (stats["max"] > stats["min"]).any():
        ax.fill_between(
            stats.index, stats["min"], stats["max"], color=color, alpha=0.15, linewidth=0
        )


def _grid(plt, panels: int, ncols: int = 3, width: float = 3.6, height: float = 2.8):
    ncols = max(1, min(ncols, panels))
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.set_visible(False)
    return fig, flat[:panels]


#: Figure metadata that changes between builds, left out so that a rebuilt report is
#: byte-identical to the committed one: the PDF's creation date. The matplotlib version stays
#: (PDF ``Creator``, PNG ``Software``): it says which build the plots' bytes belong to.
FIXED_METADATA = {".pdf": {"CreationDate": None}}


def save_figure(fig, path: Path, **kwargs) -> None:
    """``fig.savefig(path)`` without the metadata that changes between builds."""
    fig.savefig(path, metadata=FIXED_METADATA.get(Path(path).suffix), **kwargs)


def _save(plt, fig, out_dir: Path, name: str, step_axis: bool = True) -> list[Path]:
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    for ax in fig.axes if step_axis else ():  # the x axis is a step count
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for path in paths:
        save_figure(fig, path)
    plt.close(fig)
    return paths


def _combos(frame: pd.DataFrame, keys: list[str]) -> list[tuple]:
    """The (existing) combinations of ``keys`` in ``frame``, in the tables' order."""
    from analysis.tables import sort_frame

    return [tuple(r) for r in sort_frame(frame[keys].drop_duplicates(), keys).values]


def _by(frame: pd.DataFrame, keys: list[str]) -> dict[tuple, pd.DataFrame]:
    return {key: rows for key, rows in frame.groupby(keys, sort=False)}


def _limit(items: list, limit: int, what: str, notes: list[str]) -> list:
    """The first ``limit`` items; a note for the figure's title when some are left out (a
    figure with hundreds of panels is unreadable and takes minutes to draw)."""
    if len(items) > limit:
        notes.append(f"first {limit} of {len(items)} {what}")
    return items[:limit]


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def _suptitle(fig, title: str, notes: list[str]) -> None:
    fig.suptitle(title + (f" ({'; '.join(notes)})" if notes else ""), fontsize=9)


def _title(setting: tuple) -> str:
    return " · ".join(map(str, setting))


def _lines(ax, rows: pd.DataFrame, colors: dict, notes: list[str], log: bool = False) -> None:
    """One band per label of ``rows`` (at most :data:`MAX_LINES`)."""
    labels = _labels_in_order(rows["label"])
    for label in _limit(labels, MAX_LINES, "methods in a panel", notes):
        _band(ax, rows[rows["label"] == label], colors[label], label, log=log)


def _per_setting(
    out_dir: Path, name: str, frame: pd.DataFrame, ylabel: str, title: str, log: bool = False
) -> list[Path]:
    """A panel per (model, task), a band per method."""

    def draw(ax, rows: pd.DataFrame, colors: dict, notes: list[str]) -> None:
        _lines(ax, rows, colors, notes, log=log)
        if log:
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set(yscale="log" if log else "linear", xlabel="step", ylabel=ylabel)

    return _setting_panels(out_dir, name, frame, title, draw)


def _setting_panels(
    out_dir: Path,
    name: str,
    frame: pd.DataFrame,
    title: str,
    draw: Callable[..., None],
    step_axis: bool = True,
) -> list[Path]:
    """A panel per (model, task) of ``frame``, each drawn by ``draw(ax, rows, colors,
    notes)`` (``colors``: one per label of the whole frame, ``notes``: for the title)."""
    if frame.empty:
        return []
    plt, notes = _pyplot(), []
    with plt.rc_context(STYLE):
        settings = _limit(_combos(frame, SETTING), MAX_PANELS, "settings", notes)
        fig, axes = _grid(plt, len(settings))
        colors = label_colors(_labels_in_order(frame["label"]))
        groups = _by(frame, SETTING)
        for ax, setting in zip(axes, settings):
            draw(ax, groups[setting], colors, notes)
            ax.set_title(_title(setting))
            _legend(ax)
        _suptitle(fig, title, notes)
        return _save(plt, fig, out_dir, name, step_axis)
