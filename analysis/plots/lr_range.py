"""The lr range study's figure (issue 31): Stable-LoRA minus LoRA against lr with the verdict
of each setting (top), and the mid-run delta1/delta2 of both methods against lr (bottom); the
runs at another scale of A0 (A0 x4) as separate points. A column per model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.collect import Collection, format_value
from analysis.plots.drawing import (
    MAX_PANELS,
    METHOD_COLORS,
    STYLE,
    _limit,
    _pyplot,
    _save,
    _suptitle,
    register_plot,
)

#: The marker of each verdict word (``analysis.tables.equivalence.verdict``): filled square
#: for a difference, filled circle for equivalence, open circle for inconclusive.
VERDICT_MARKERS = {
    "different": ("s", True),
    "equivalent": ("o", True),
    "inconclusive": ("o", False),
}
#: Points at another scale of A0 are drawn beside their lr, by this factor (log axis).
OFFSET = 1.12
#: Each method's points of the bottom panel drawn this far apart (log axis), so that equal
#: values stay visible.
METHOD_OFFSET = {"lora": 1 / 1.03, "stable_lora": 1.03}


def verdict_kind(verdict: str) -> str:
    """``"equivalent within ±1 pp"`` -> ``"equivalent"``."""
    return next((k for k in VERDICT_MARKERS if str(verdict).startswith(k)), "inconclusive")


def difference_points(coll: Collection) -> tuple[pd.DataFrame, float | None]:
    """The primary analysis of Stable-LoRA against LoRA per setting: one row per (model,
    setting) with ``diff``, ``ci_low``, ``ci_high`` (pp), ``verdict``, ``optim.lr`` and
    ``adapter.init_scale``; and the plan's margin (pp)."""
    from analysis.tables.equivalence import read_plan
    from analysis.tables.paired_examples import REFERENCE, STABLE
    from analysis.tables.verdicts import family_pairs, verdict_rows

    plan = read_plan(coll.runs, coll.plan_options)
    family = [(b, pairs) for b, pairs in family_pairs(coll) if b == REFERENCE]
    rows = verdict_rows(family, plan, primary_only=True)
    if rows.empty:
        return rows, plan.margin_pp
    runs = coll.runs[coll.runs["method"] == STABLE]
    for column in ("optim.lr", "adapter.init_scale"):
        values = runs.drop_duplicates("label").set_index("label")[column] if column in runs else {}
        rows[column] = rows["label"].map(values) if len(values) else np.nan
    return rows, plan.margin_pp


def ratio_points(coll: Collection) -> pd.DataFrame:
    """Per (model, method, lr, scale of A0): the mid-run delta1/delta2 over seeds (geometric
    mean ``value``, ``low``/``high`` the range) from :func:`mechanism_runs`."""
    from analysis.tables.lr_range import mechanism_runs

    runs = mechanism_runs(coll)
    if runs.empty or runs["delta_ratio_mid"].notna().sum() == 0:
        return pd.DataFrame()
    runs = runs[np.isfinite(runs["delta_ratio_mid"]) & (runs["delta_ratio_mid"] > 0)]
    keys = ["model", "method", "optim.lr", "adapter.init_scale"]
    logs = runs.assign(log=np.log(runs["delta_ratio_mid"]))
    grouped = logs.groupby(keys, dropna=False)
    out = grouped.agg(
        log=("log", "mean"),
        low=("delta_ratio_mid", "min"),
        high=("delta_ratio_mid", "max"),
        seeds=("seed", "size"),
    )
    out["value"] = np.exp(out.pop("log"))
    return out.reset_index()


def base_scale(*frames: pd.DataFrame) -> float:
    """The scale of A0 of most points (the lr axis; the others are the A0 axis)."""
    values = pd.concat([f["adapter.init_scale"] for f in frames if not f.empty])
    values = values.dropna()
    return float(values.mode().iloc[0]) if not values.empty else 1.0


@register_plot
def lr_range(coll: Collection, out_dir: Path) -> list[Path]:
    """Top: Stable-LoRA minus LoRA (pp, 95% CI bars, a marker per verdict) against lr, log
    axis; bottom: mid-run delta1/delta2 of each method against lr, a line at 1. Points at
    another scale of A0 are drawn apart. A column per model."""
    runs = coll.runs
    if runs.empty or "optim.lr" not in runs:
        return []
    diffs, margin = difference_points(coll)
    ratios = ratio_points(coll)
    if diffs.empty and ratios.empty:
        return []
    base = base_scale(diffs, ratios)
    models = list(dict.fromkeys([*diffs.get("model", []), *ratios.get("model", [])]))
    plt, notes = _pyplot(), []
    with plt.rc_context(STYLE):
        models = _limit(models, MAX_PANELS // 2, "models", notes)
        fig, axes = plt.subplots(
            2, len(models), figsize=(4.2 * len(models), 6.0), squeeze=False, sharex="col"
        )
        for col, model in enumerate(models):
            top, bottom = axes[0][col], axes[1][col]
            _draw_differences(
                top, diffs[diffs["model"] == model] if not diffs.empty else diffs, base, margin
            )
            mine = ratios[ratios["model"] == model] if not ratios.empty else ratios
            _draw_ratios(bottom, mine, base)
            top.set(title=str(model), ylabel="stable_lora - lora (pp)", xscale="log")
            bottom.set(
                xlabel="learning rate", ylabel="delta1/delta2 mid-run", xscale="log", yscale="log"
            )
            for ax in (top, bottom):
                handles, labels = ax.get_legend_handles_labels()
                if handles:
                    unique = dict(zip(labels, handles))
                    ax.legend(unique.values(), unique.keys())
        _suptitle(
            fig,
            "Stable-LoRA against LoRA across the lr range\ntop: task-average difference (95% CI, "
            "verdict of the primary analysis)\nbottom: mid-run delta1/delta2 (geometric mean "
            "over seeds, bars: range)",
            notes,
        )
        return _save(plt, fig, out_dir, "lr_range", step_axis=False)


def _draw_differences(ax, rows: pd.DataFrame, base: float, margin: float | None) -> None:
    ax.axhline(0.0, color="grey", linewidth=0.8)
    if margin is not None:
        ax.axhspan(
            -margin, margin, color="grey", alpha=0.12, linewidth=0, label=f"±{margin:g} pp margin"
        )
    if rows.empty:
        return
    rows = rows.sort_values("optim.lr")
    for is_base, part in rows.groupby(np.isclose(rows["adapter.init_scale"].astype(float), base)):
        color = METHOD_COLORS["stable_lora"] if is_base else "#7f7f7f"
        x = part["optim.lr"].astype(float) * (1.0 if is_base else OFFSET)
        if is_base:
            ax.plot(x, part["diff"], color=color, linewidth=0.8, alpha=0.6)
        for xi, (_, row) in zip(x, part.iterrows()):
            kind = verdict_kind(row["verdict"])
            marker, filled = VERDICT_MARKERS[kind]
            scale = "" if is_base else f"A0 × {format_value(float(row['adapter.init_scale']))}, "
            ax.errorbar(
                [xi],
                [row["diff"]],
                # a percentile interval need not contain the observed difference
                yerr=[
                    [max(row["diff"] - row["ci_low"], 0.0)],
                    [max(row["ci_high"] - row["diff"], 0.0)],
                ],
                color=color,
                marker=marker,
                markerfacecolor=color if filled else "white",
                markersize=6,
                capsize=3,
                linestyle="none",
                label=f"{scale}{kind}",
            )


def _draw_ratios(ax, rows: pd.DataFrame, base: float) -> None:
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    if rows.empty:
        return
    for method, part in rows.groupby("method", sort=True):
        color = METHOD_COLORS.get(str(method), "#333333")
        at_base = np.isclose(part["adapter.init_scale"].astype(float), base)
        for is_base, points in ((True, part[at_base]), (False, part[~at_base])):
            if points.empty:
                continue
            points = points.sort_values("optim.lr")
            shift = METHOD_OFFSET.get(str(method), 1.0)
            x = points["optim.lr"].astype(float) * (1.0 if is_base else OFFSET) * shift
            scales = ", ".join(
                f"A0 × {format_value(float(s))}" for s in points["adapter.init_scale"].unique()
            )
            ax.errorbar(
                x,
                points["value"],
                yerr=[
                    (points["value"] - points["low"]).clip(lower=0),
                    (points["high"] - points["value"]).clip(lower=0),
                ],
                color=color,
                marker="o" if is_base else "D",
                markerfacecolor=color if is_base else "white",
                markersize=5,
                capsize=3,
                linestyle="-" if is_base else "none",
                label=str(method) if is_base else f"{method}, {scales}",
            )
