"""Seeds and runs -> cells: the mean ± sample std or the best of seeds, the paper's order
of models, tasks and methods, and which runs each table reads."""

from __future__ import annotations

import math

import pandas as pd

from analysis.collect import Collection, label_runs
from analysis.tables.registry import owned_by_a_table

SEED_MODES = ("mean", "best")
SCALE = 100.0  # accuracies are stored as fractions and shown in percent, like the paper's
AVG = "Avg"  # the task-average column
LOWER_IS_BETTER = ("loss", "ppl", "perplexity")  # metric names where the best run is the lowest


def aggregate(frame: pd.DataFrame, keys: list[str], mode: str = "mean") -> pd.DataFrame:
    """Aggregate ``frame`` (one row per run: ``keys``, ``value``, ``status``) over the rest.

    Returns one row per group: ``keys``, ``value`` (mean, or the best run for
    ``mode="best"``: the max, or the min where the optional ``sign`` column is -1),
    ``std`` (over the runs with a value, NaN for best-of), ``n`` (runs with a value),
    ``runs`` (all runs) and ``statuses`` ("1 failed, 1 diverged" for the others). To rank
    groups by ``sign * value``, put ``sign`` among the ``keys`` (it is one per group).
    """
    check_mode(mode)
    columns = [*keys, "value", "std", "n", "runs", "statuses"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    # An optional "sign" column (-1 where lower is better, constant within a group) makes
    # the best run the max of sign * value.
    sign = frame.get("sign", 1.0)
    frame = frame.assign(has_value=frame["value"].notna(), group_sign=sign)
    frame["signed"] = frame["value"] * frame["group_sign"]
    grouped = frame.groupby(keys, dropna=False, sort=False)
    out = grouped.agg(
        mean=("value", "mean"),
        best_signed=("signed", "max"),
        group_sign=("group_sign", "first"),
        std=("value", "std"),
        n=("has_value", "sum"),
        runs=("value", "size"),
    ).reset_index()
    out["value"] = out["best_signed"] * out["group_sign"] if mode == "best" else out["mean"]
    if mode == "best":
        out["std"] = math.nan
    missing = frame[~frame["has_value"]].copy()
    missing["status"] = missing["status"].where(missing["status"] != "completed", "no value")
    if missing.empty:
        out["statuses"] = ""
    else:
        counts = missing.groupby([*keys, "status"], dropna=False, sort=True).size()
        text = counts.reset_index(name="count").assign(
            part=lambda f: f["count"].astype(str) + " " + f["status"].astype(str)
        )
        text = text.groupby(keys, dropna=False, sort=False)["part"].agg(", ".join)
        out = out.merge(text.rename("statuses").reset_index(), on=keys, how="left")
        out["statuses"] = out["statuses"].fillna("")
    return out[columns]


def check_mode(mode: str) -> None:
    if mode not in SEED_MODES:
        raise ValueError(f"seeds must be one of {SEED_MODES}, got {mode!r}.")


def protocol_note(mode: str) -> str:
    if mode == "best":
        return (
            "Cells: the best run over seeds (the paper's protocol), accuracy in %; "
            "'best of 2/3': one of three runs did not complete."
        )
    return (
        "Cells: mean ± std over seeds (sample std), accuracy in %; n = completed runs, "
        "'n=2/3': one of three runs did not complete."
    )


def not_completed_note(runs: pd.DataFrame) -> list[str]:
    bad = runs[runs["status"] != "completed"]
    if bad.empty:
        return []
    listed = "; ".join(f"{r.run} ({r.status})" for r in bad.itertuples())
    return [f"{len(bad)} of {len(runs)} runs did not complete and count as missing: {listed}."]


def lower_is_better(metric: str) -> bool:
    """``eval/loss``-like metrics: the best run is the lowest, and they are not percentages."""
    name = str(metric).rsplit("/", 1)[-1]
    return any(word in name for word in LOWER_IS_BETTER)


def metric_sign(metrics: pd.Series) -> pd.Series:
    """-1.0 where the metric is loss-like (lower is better), else 1.0: ``aggregate``'s
    ``sign``."""
    return metrics.map(lower_is_better).astype(bool).map({True: -1.0, False: 1.0}).astype(float)


def metric_scale(metric: str) -> float:
    """Accuracies (fractions) are shown in percent; losses as they are."""
    return 1.0 if lower_is_better(metric) else SCALE


def display_values(runs: pd.DataFrame, column: str = "score") -> pd.DataFrame:
    """``runs`` with ``value`` (the column in display units) and ``sign`` (-1 where lower is
    better, so that best-of-seeds takes the lowest)."""
    scale = runs["main_metric"].map(metric_scale).astype(float)
    value = runs[column] * scale if column in runs else math.nan
    return runs.assign(value=value, sign=metric_sign(runs["main_metric"]))


def accuracy_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs scored by log-likelihood accuracy (Table 1 and the ablations): runs scored by
    generation (GSM8K-like, by step budget), runs a table of their own shows (dialogue,
    LLM-Adapters: ``owns`` in :mod:`analysis.tables.registry`) and loss-scored runs (the toy
    width task) are left out."""
    if runs.empty:
        return runs
    lower = runs["main_metric"].map(lower_is_better).astype(bool)
    return runs[~is_generation(runs) & ~owned_by_a_table(runs) & ~lower]


def is_generation(runs: pd.DataFrame) -> pd.Series:
    """Runs scored by generating an answer (``protocol``, as the run recorded it: see
    ``analysis.collect.task_fields``), shown by step budget, not in Table 1; runs that a table
    of their own shows (the dialogue and LLM-Adapters families generate too) are not."""
    return runs["protocol"].eq("generate") & ~owned_by_a_table(runs)


def setting_runs(coll: Collection, exclude_label: list[str]) -> pd.DataFrame:
    runs = accuracy_runs(coll.runs).copy()
    if not runs.empty:
        label_runs(runs, exclude=exclude_label)
    return runs


def table_runs(
    coll: Collection, seeds: str, setting: str | None = None, *, relabel: bool = True
) -> pd.DataFrame | None:
    """The runs an accuracy table (Table 1, an ablation) shows, or None when it has nothing to
    show: the opening every such builder shares. Checks ``seeds``; takes the runs scored by
    log-likelihood accuracy (:func:`accuracy_runs`), labelled anew without ``setting`` (the
    config key the table varies, e.g. ``adapter.init_scale``: the labels then name what else
    differs; ``relabel=False`` keeps the collection's labels); None when there are no such runs,
    or when ``setting`` is given and the runs lack it or do not take two values of it."""
    check_mode(seeds)
    if setting is not None and setting not in coll.runs:
        return None
    if relabel:
        runs = setting_runs(coll, [] if setting is None else [setting])
    else:
        runs = accuracy_runs(coll.runs)
    if runs.empty or (setting is not None and runs[setting].nunique() < 2):
        return None
    return runs


def setting_column(runs: pd.DataFrame) -> pd.Series:
    """``model`` when one task is present, else ``model · task``."""
    if runs["task"].nunique() <= 1:
        return runs["model"].astype(str)
    return runs["model"].astype(str) + " · " + runs["task"].astype(str)
