"""Fit the width exponents of the feature updates from a width sweep's records.

For each method, learning-rate mode, chosen step and quantity q (delta1, delta2, delta3, dY,
gAZ, AZ, Z: the mean over layers of the per-layer RMS logged by
:class:`stablelora.probes.gamma.FeatureProbe` as ``feat/<q>``), fit by least squares::

    log(rms_q) = exponent * log(n) + c        over every (width, seed) run

and report the exponent with a 95% confidence interval (Student t, N - 2 degrees of freedom,
N = widths x seeds points). The paper's stable feature learning is exponent 0 for the three
deltas and dY; its Assumption 1 is exponent 1 for gAZ (with Z itself at exponent 0).

Usage::

    python -m analysis.width_fit outputs/width_sweep/records.jsonl --out outputs/width_sweep

writes ``exponents.csv`` (every fit), ``exponents.md`` (the table and the Assumption 1
check), ``width_fit.png/.pdf`` (magnitudes against width at the last chosen step) and
``exponents_vs_step.png/.pdf`` (the exponent of each quantity at every logged step).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

QUANTITIES = ("delta1", "delta2", "delta3", "dY", "gAZ", "AZ", "Z")
DECOMPOSITION = ("delta1", "delta2", "delta3", "dY")
DEFAULT_STEPS = (2, 10, 50, 100)
RUN_KEYS = ["method", "lr_mode", "width", "seed"]
GROUP_KEYS = ["method", "lr_mode", "step", "quantity"]


def load_records(path: str | Path) -> pd.DataFrame:
    """Sweep records (jsonl, one run a line) -> long table with columns
    method, lr_mode, width, seed, step, quantity, value (the ``feat/<q>`` aggregates)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        run = {key: record[key] for key in RUN_KEYS}
        for metrics in record["metrics"]:
            for q in QUANTITIES:
                value = metrics.get(f"feat/{q}")
                if value is not None:
                    rows.append({**run, "step": metrics["step"], "quantity": q, "value": value})
    return pd.DataFrame(rows, columns=[*RUN_KEYS, "step", "quantity", "value"])


@functools.cache
def t_quantile(prob: float, dof: int) -> float:
    """Inverse CDF of Student's t with ``dof`` degrees of freedom at ``prob`` in (0.5, 1)."""
    # Integrate the density on a grid in u = atan(x) (a finite range that covers the heavy
    # tails of small dof), then invert the cumulative sum by interpolation.
    u = np.linspace(0.0, math.pi / 2, 200_001)[:-1]
    x = np.tan(u)
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    density = np.exp(log_norm - (dof + 1) / 2 * np.log1p(x**2 / dof)) / np.cos(u) ** 2
    du = u[1] - u[0]
    cdf = 0.5 + np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * du)])
    return float(np.interp(prob, cdf, x))


def fit_slope(log_width: np.ndarray, log_value: np.ndarray) -> dict[str, float]:
    """Least-squares slope of log_value on log_width, its 95% CI and R^2."""
    points = len(log_width)
    out = {"exponent": math.nan, "ci_low": math.nan, "ci_high": math.nan, "r2": math.nan}
    out["points"] = points
    if points < 2 or np.ptp(log_width) == 0:
        return out
    x = log_width - log_width.mean()
    slope = float((x * (log_value - log_value.mean())).sum() / (x**2).sum())
    residuals = log_value - log_value.mean() - slope * x
    total = ((log_value - log_value.mean()) ** 2).sum()
    out["exponent"] = slope
    out["r2"] = float(1 - (residuals**2).sum() / total) if total > 0 else math.nan
    if points > 2:
        stderr = math.sqrt((residuals**2).sum() / (points - 2) / (x**2).sum())
        half = t_quantile(0.975, points - 2) * stderr
        out["ci_low"], out["ci_high"] = slope - half, slope + half
    return out


def fit_exponents(table: pd.DataFrame, steps=None) -> pd.DataFrame:
    """One fit per (method, lr_mode, step, quantity) of ``table`` (from :func:`load_records`)
    at ``steps`` (all steps when None). Zero or non-finite magnitudes are left out of a fit."""
    if steps is not None:
        table = table[table["step"].isin(list(steps))]
    table = table[np.isfinite(table["value"]) & (table["value"] > 0)]
    rows = []
    for key, group in table.groupby(GROUP_KEYS, sort=True):
        fit = fit_slope(np.log(group["width"].to_numpy(float)), np.log(group["value"].to_numpy()))
        rows.append({**dict(zip(GROUP_KEYS, key)), **fit, "widths": group["width"].nunique()})
    return pd.DataFrame(rows)


def common_steps(table: pd.DataFrame) -> list[int]:
    """The steps logged by every run."""
    per_run = table.groupby(RUN_KEYS)["step"].apply(set)
    return sorted(set.intersection(*per_run)) if len(per_run) else []


def choose_steps(table: pd.DataFrame, steps=None) -> list[int]:
    """``steps`` (default :data:`DEFAULT_STEPS` plus the last step) among those every run logged."""
    logged = common_steps(table)
    wanted = set(DEFAULT_STEPS) | set(logged[-1:]) if steps is None else set(steps)
    return sorted(wanted & set(logged))


def fit_records(records: str | Path, steps=None) -> tuple[pd.DataFrame, list[int], pd.DataFrame]:
    """A width sweep's ``records.jsonl`` fitted: its long table (:func:`load_records`), the
    steps chosen (:func:`choose_steps`) and the fits at them (:func:`fit_exponents`)."""
    table = load_records(records)
    if table.empty:
        raise ValueError(f"{records} holds no feat/* metrics: was the FeatureProbe enabled?")
    chosen = choose_steps(table, steps)
    return table, chosen, fit_exponents(table, chosen)


def _cell(row) -> str:
    if not math.isfinite(row.exponent):
        return "n/a"
    if not math.isfinite(row.ci_low):
        return f"{row.exponent:+.2f}"
    return f"{row.exponent:+.2f} [{row.ci_low:+.2f}, {row.ci_high:+.2f}]"


def _markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def exponent_table(fits: pd.DataFrame, quantities=(*DECOMPOSITION, "gAZ", "Z")) -> pd.DataFrame:
    """Rows (method, lr_mode, step), one column per quantity: "exponent [95% CI]"."""
    fits = fits[fits["quantity"].isin(quantities)]
    return _by_quantity(fits.assign(cell=fits.apply(_cell, axis=1)), quantities)


def _by_quantity(fits: pd.DataFrame, quantities) -> pd.DataFrame:
    """``fits``' ``cell`` texts with rows (method, lr_mode, step), a column per quantity."""
    wide = fits.pivot_table(
        index=["method", "lr_mode", "step"], columns="quantity", values="cell", aggfunc="first"
    )
    return wide.reindex(columns=[q for q in quantities if q in wide.columns]).reset_index()


def assumption1_table(fits: pd.DataFrame) -> pd.DataFrame:
    """The gAZ exponent per (method, lr_mode, step) and whether its 95% CI contains 1."""
    gaz = fits[fits["quantity"] == "gAZ"].copy()
    gaz["holds"] = (gaz["ci_low"] <= 1.0) & (gaz["ci_high"] >= 1.0)
    gaz["exponent [95% CI]"] = gaz.apply(_cell, axis=1)
    return gaz[["method", "lr_mode", "step", "exponent [95% CI]", "holds", "points"]]


#: The learning rate's width exponent of each mode of experiments/width_sweep.py: eta ~ n^-c.
LR_WIDTH_EXPONENT = {"fixed": 0.0, "scaled": 0.5}


def predicted_exponent(quantity: str, lr_mode: str, step: int) -> float:
    """The width exponent the paper's gamma rules predict for ``feat/<quantity>`` on ``step``.

    Inputs: gamma[s] = 0 (s = alpha/r or alpha/sqrt(r), r fixed), B0 = 0, gamma[A0 Z] = 0
    (peft's A0 has variance ~ 1/n), gamma[Z] = 0, Adam directions with Theta(1) entries,
    Assumption 1 (gamma[g_A Z] = 1) and gamma[eta] = -c (``lr_mode``). A's gradient is
    s B^T dL/dY Z^T, zero while B = 0: A first moves on step 2. The probe of step t measures
    the update of step t from (A_{t-1}, B_{t-1}). So:

    - step 1 (B = 0, A = A0): delta1 = s dB A0 Z -> gamma[eta]; delta2 = delta3 = 0.
    - step 2 (B_1 = Theta(eta), A_1 = A0): delta1 -> gamma[eta]; delta2 = s B_1 dA Z and
      delta3 = s dB dA Z -> 2 gamma[eta] + 1.
    - step t >= 3: A_{t-1} Z = A0 Z + (A_{t-1} - A0) Z -> max(0, gamma[eta] + 1), so
      delta1 -> gamma[eta] + max(0, gamma[eta] + 1); delta2, delta3 -> 2 gamma[eta] + 1.

    dY is the max of the deltas present (asymptotically; at finite widths a sum of terms with
    different exponents has a slope in between). Stable-LoRA's shrink, LoRA+'s fixed lr ratio
    and rsLoRA's 1/sqrt(r) are width-free: the same predictions. NaN where the rules give none
    (Z of deeper blocks, the zero deltas of step 1).
    """
    if lr_mode not in LR_WIDTH_EXPONENT:
        return math.nan
    lr = -LR_WIDTH_EXPONENT[lr_mode]
    if step <= 1:
        first = {"delta1": lr, "dY": lr, "gAZ": 1.0, "AZ": 0.0}
        return first.get(quantity, math.nan)
    a_z = 0.0 if step == 2 else max(0.0, lr + 1.0)
    rules = {
        "delta1": lr + a_z,
        "delta2": 2 * lr + 1.0,
        "delta3": 2 * lr + 1.0,
        "gAZ": 1.0,
        "AZ": a_z,
    }
    rules["dY"] = max(rules["delta1"], rules["delta2"], rules["delta3"])
    return rules.get(quantity, math.nan)


def theory_table(fits: pd.DataFrame, quantities=(*DECOMPOSITION, "gAZ")) -> pd.DataFrame:
    """Rows (method, lr_mode, step), a column per quantity: the predicted exponent and
    ``ok`` when the fit's 95% CI contains it, else the measured minus the predicted."""
    fits = fits[fits["quantity"].isin(quantities)].copy()
    fits["predicted"] = [
        predicted_exponent(q, m, int(t))
        for q, m, t in zip(fits["quantity"], fits["lr_mode"], fits["step"])
    ]

    def verdict(row) -> str:
        if not (math.isfinite(row.predicted) and math.isfinite(row.ci_low)):
            return "n/a"
        if row.ci_low <= row.predicted <= row.ci_high:
            return f"{row.predicted:+.1f} ok"
        return f"{row.predicted:+.1f} off by {row.exponent - row.predicted:+.2f}"

    fits["cell"] = fits.apply(verdict, axis=1)
    return _by_quantity(fits, quantities)


def _grid(table: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(table["method"]))
    modes = list(dict.fromkeys(table["lr_mode"]))
    fig, axes = plt.subplots(
        len(modes),
        len(methods),
        figsize=(3.6 * len(methods), 3.2 * len(modes)),
        squeeze=False,
        sharex=True,
        sharey="row",
    )
    return plt, fig, axes, methods, modes


def plot_magnitudes(table: pd.DataFrame, fits: pd.DataFrame, step: int, stem: Path) -> list[Path]:
    """log-log magnitudes of the decomposition against width at ``step``, with the fits."""
    table = table[(table["step"] == step) & table["quantity"].isin(DECOMPOSITION)]
    table = table[np.isfinite(table["value"]) & (table["value"] > 0)]
    plt, fig, axes, methods, modes = _grid(table)
    colors = dict(zip(DECOMPOSITION, ["C0", "C1", "C2", "k"]))
    for row, mode in enumerate(modes):
        for col, method in enumerate(methods):
            ax = axes[row][col]
            runs = table[(table["method"] == method) & (table["lr_mode"] == mode)]
            for q in DECOMPOSITION:
                points = runs[runs["quantity"] == q]
                if points.empty:
                    continue
                fit = fits[
                    (fits["method"] == method)
                    & (fits["lr_mode"] == mode)
                    & (fits["step"] == step)
                    & (fits["quantity"] == q)
                ]
                label = q if fit.empty else f"{q}: {_cell(fit.iloc[0])}"
                ax.scatter(points["width"], points["value"], s=10, color=colors[q], alpha=0.6)
                if not fit.empty and math.isfinite(fit.iloc[0].exponent):
                    widths = np.array(sorted(points["width"].unique()), dtype=float)
                    log_n, log_v = np.log(points["width"].to_numpy(float)), np.log(points["value"])
                    intercept = log_v.mean() - fit.iloc[0].exponent * log_n.mean()
                    line = np.exp(intercept + fit.iloc[0].exponent * np.log(widths))
                    ax.plot(widths, line, color=colors[q], label=label)
            ax.set(xscale="log", yscale="log", title=f"{method}, lr {mode}, step {step}")
            ticks = sorted(table["width"].unique().tolist())
            ax.set_xticks(ticks, [str(w) for w in ticks], minor=False, fontsize=7)
            ax.set_xticks([], minor=True)
            ax.set_xlabel("width n")
            ax.legend(fontsize=6)
        axes[row][0].set_ylabel("RMS (mean over layers)")
    return _save(plt, fig, stem)


def plot_exponents(fits: pd.DataFrame, stem: Path) -> list[Path]:
    """The fitted exponent of each quantity against the step, with its 95% CI band."""
    plt, fig, axes, methods, modes = _grid(fits)
    colors = dict(zip((*DECOMPOSITION, "gAZ"), ["C0", "C1", "C2", "k", "C3"]))
    for row, mode in enumerate(modes):
        for col, method in enumerate(methods):
            ax = axes[row][col]
            for q, color in colors.items():
                f = fits[(fits["method"] == method) & (fits["lr_mode"] == mode)]
                f = f[f["quantity"] == q].sort_values("step")
                ax.plot(f["step"], f["exponent"], color=color, label=q)
                ax.fill_between(f["step"], f["ci_low"], f["ci_high"], color=color, alpha=0.15)
            ax.axhline(0.0, color="grey", lw=0.5)
            ax.axhline(1.0, color="grey", lw=0.5, ls="--")
            ax.set(xscale="log", title=f"{method}, lr {mode}")
            ax.set_xlabel("step")
            ax.legend(fontsize=6)
        axes[row][0].set_ylabel("width exponent (95% CI)")
    return _save(plt, fig, stem)


def _save(plt, fig, stem: Path) -> list[Path]:
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    from analysis.plots import save_figure

    for path in paths:
        save_figure(fig, path, dpi=150)
    plt.close(fig)
    return paths


def analyze(records: str | Path, out_dir: str | Path, steps=None) -> dict:
    """Fit, tabulate and plot a sweep's records; return the tables and the files written.

    Returns:
        ``{"fits": every fit at the chosen steps (DataFrame), "table": the exponent table,
        "assumption1": its check, "markdown": the text of exponents.md, "files": [paths]}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table, chosen, fits = fit_records(records, steps)
    wide, check = exponent_table(fits), assumption1_table(fits)
    runs = table[RUN_KEYS].drop_duplicates()
    widths, seeds = sorted(runs["width"].unique().tolist()), sorted(runs["seed"].unique().tolist())
    markdown = "\n\n".join(
        [
            "# Width exponents of the feature updates",
            f"Slope of log(RMS) on log(n), 95% CI; widths {widths}, seeds {seeds}; stable feature "
            "learning is 0 for the deltas and dY (the paper's numbering: delta1 = s dB A Z, "
            "delta2 = s B dA Z).",
            _markdown(wide),
            "## Assumption 1: gamma[g_A Z] = 1 (holds: the 95% CI of the gAZ slope contains 1)",
            _markdown(check),
            "## Against the gamma rules",
            "The exponent the paper's gamma rules predict (analysis.width_fit.predicted_exponent:"
            " lr ~ n^0 (fixed) or n^-1/2 (scaled), B0 = 0, gamma[A0 Z] = 0, Assumption 1) and "
            "whether the fit's 95% CI contains it (ok), else the measured minus the predicted.",
            _markdown(theory_table(fits)),
        ]
    )
    files = [out_dir / "exponents.csv", out_dir / "exponents.md"]
    from analysis.tables.formatting import write_csv

    write_csv(fits, files[0])
    files[1].write_text(markdown + "\n")
    files += plot_magnitudes(table, fits, chosen[-1], out_dir / "width_fit")
    files += plot_exponents(
        fit_exponents(table, common_steps(table)), out_dir / "exponents_vs_step"
    )
    return {"fits": fits, "table": wide, "assumption1": check, "markdown": markdown, "files": files}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", help="records.jsonl written by experiments/width_sweep.py")
    parser.add_argument("--out", default=None, help="output folder (default: the records' own)")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="steps to fit")
    args = parser.parse_args(argv)
    result = analyze(args.records, args.out or Path(args.records).parent, args.steps)
    print(result["markdown"])
    return result


if __name__ == "__main__":
    main()
