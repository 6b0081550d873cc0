"""The paper's figures and the diagnostic curves, from a :class:`~analysis.collect.Collection`.

One style for every figure (:data:`STYLE`, a fixed colour per method), matplotlib's Agg
backend, each figure saved as ``<name>.png`` and ``<name>.pdf``. Each builder returns the
paths it wrote, or ``[]`` when the records lack what it draws:

================== =====================================================================
``figure2_norms``  Figure 2: ||A||_F and ||B||_F against step, per method: mean over seeds
                   and layers, band = their range, a tick at each layer's stop step
``deltas``         the feature-update magnitudes delta1, delta2, delta3, dY against step
``delta_ratio``    delta1/delta2 against step (about 1 when both factors learn)
``shrink_stops``   the step at which each layer stopped shrinking
``loss``           training loss against step
``eval``           the main evaluation metric against step
``init_scale``     delta1/delta2 and ||A||_F against step, one curve per scale of A0
================== =====================================================================

Curves are means over seeds with the range over seeds (and layers) as a band.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.collect import Collection, format_value, label_runs

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
    extra palette (in order) for its other variants, so a sweep always draws the same
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


def _save(plt, fig, out_dir: Path, name: str) -> list[Path]:
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    for ax in fig.axes:  # every x axis is a step count
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


# ---------------------------------------------------------------------------- figures
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


def _per_setting(
    out_dir: Path, name: str, frame: pd.DataFrame, ylabel: str, title: str, log: bool = False
) -> list[Path]:
    """A panel per (model, task), a band per method."""
    if frame.empty:
        return []
    plt, notes = _pyplot(), []
    with plt.rc_context(STYLE):
        settings = _limit(_combos(frame, SETTING), MAX_PANELS, "settings", notes)
        fig, axes = _grid(plt, len(settings))
        colors = label_colors(_labels_in_order(frame["label"]))
        groups = _by(frame, SETTING)
        for ax, setting in zip(axes, settings):
            _lines(ax, groups[setting], colors, notes, log=log)
            if log:
                ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set(
                yscale="log" if log else "linear",
                title=_title(setting),
                xlabel="step",
                ylabel=ylabel,
            )
            _legend(ax)
        _suptitle(fig, title, notes)
        return _save(plt, fig, out_dir, name)


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


def loss(coll: Collection, out_dir: Path) -> list[Path]:
    """Training loss against step (mean over seeds, band: range)."""
    frame = _history(coll, lambda k: k == "train/loss")
    return _per_setting(
        out_dir, "loss", frame, "train loss", "Training loss (mean over seeds, band: range)"
    )


def eval_curves(coll: Collection, out_dir: Path) -> list[Path]:
    """Each run's main evaluation metric against step, accuracies in % (mean over seeds,
    band: range)."""
    from analysis.tables import metric_scale

    frame = _history(coll, lambda k: k.str.startswith("eval/"), ["main_metric"])
    frame = frame[frame["key"] == frame["main_metric"]]
    frame = frame.assign(value=frame["value"] * frame["main_metric"].map(metric_scale))
    metrics = ", ".join(sorted(frame["main_metric"].unique()))
    return _per_setting(
        out_dir,
        "eval",
        frame,
        "main metric (accuracy in %)",
        f"Evaluation ({metrics}; mean over seeds, band: range)",
    )


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


#: Every plot builder, in the order the report draws them.
PLOTS: dict[str, Callable[[Collection, Path], list[Path]]] = {
    "figure2_norms": figure2_norms,
    "deltas": deltas,
    "delta_ratio": delta_ratio,
    "shrink_stops": shrink_stops,
    "loss": loss,
    "eval": eval_curves,
    "init_scale": init_scale,
}


def build_plots(
    coll: Collection, out_dir: str | Path, names: Iterable[str] | None = None
) -> list[Path]:
    """Draw every plot in ``names`` (default: all) that the records support into ``out_dir``."""
    names = list(PLOTS) if names is None else list(names)
    unknown = sorted(set(names) - set(PLOTS))
    if unknown:
        raise ValueError(f"unknown plots {unknown}: choose from {list(PLOTS)}.")
    paths = []
    for name in names:
        paths += PLOTS[name](coll, Path(out_dir))
    return paths
