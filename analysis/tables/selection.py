"""The learning rate kept per method (``--select-lr``): the best mean over tasks and seeds (the
highest, or the lowest for a loss-like metric)."""

from __future__ import annotations

import math

import pandas as pd

from analysis.collect import format_value, label_runs
from analysis.tables.aggregation import aggregate, metric_sign
from analysis.tables.formatting import (
    Table,
    cell_text,
)
from analysis.tables.ordering import sort_frame


def select_learning_rate(
    runs: pd.DataFrame, metric: str = "score", by: tuple[str, ...] = ("model", "method")
) -> tuple[pd.DataFrame, Table]:
    """Keep, for each ``by`` group (and each variant other than the lr), the ``optim.lr``
    whose completed runs have the best mean ``metric`` (over tasks and seeds): the highest,
    or the lowest for a loss-like metric (``final/eval/loss``, or ``score`` where the main
    metric is a loss).

    ``metric`` is a column of ``runs``: ``score`` (the final main metric), or e.g.
    ``best/eval/acc`` or ``final/eval/acc_norm``. Returns the kept runs and a table of every
    candidate (mean metric, completed runs / runs, chosen). A group that mixes a loss-like
    main metric with an accuracy has no mean to rank: that raises a ValueError.
    """
    if metric not in runs.columns:
        raise ValueError(f"cannot select the lr on {metric!r}: not a column of the runs.")
    if "optim.lr" not in runs.columns:
        raise ValueError("cannot select the lr: the runs have no optim.lr.")
    runs = label_runs(runs.copy(), exclude=["optim.lr"])
    keys = [*by, "label"]
    named = runs["main_metric"] if metric == "score" else pd.Series(metric, index=runs.index)
    frame = runs.assign(value=pd.to_numeric(runs[metric], errors="coerce"), sign=metric_sign(named))
    mixed = frame.groupby(keys, dropna=False)["sign"].nunique()
    if (mixed > 1).any():
        group = ", ".join(map(str, mixed[mixed > 1].index[0]))
        raise ValueError(
            f"cannot select the lr for {group}: its runs' {metric} mixes loss-like and accuracy "
            "metrics; report those tasks separately or choose --select-metric."
        )
    frame.loc[frame["status"] != "completed", "value"] = math.nan
    stats = aggregate(frame, [*keys, "optim.lr", "sign"], "mean")  # one sign per group
    stats["chosen"] = False
    for _, group in stats.groupby(keys, dropna=False, sort=False):
        signed = (group["value"] * group["sign"]).dropna()
        stats.loc[group.index[0] if signed.empty else signed.idxmax(), "chosen"] = True
    stats = stats.drop(columns="sign")
    chosen = stats.loc[stats["chosen"], [*keys, "optim.lr"]]
    kept = runs.merge(chosen, on=[*keys, "optim.lr"], how="inner")
    label_runs(kept)
    stats = sort_frame(stats, [*keys, "optim.lr"])
    display = (
        stats[list(keys)]
        .astype(str)
        .assign(
            lr=stats["optim.lr"].map(format_value),
            **{metric: stats.apply(lambda r: cell_text(r, "mean", 4), axis=1)},
            chosen=stats["chosen"].map({True: "yes", False: ""}),
        )
    )
    table = Table(
        "lr_selection",
        f"Learning rate chosen per method on {metric}",
        display,
        stats.rename(columns={"value": metric}),
        [
            f"For each {', '.join(keys)}: the lr with the best mean {metric} over its completed "
            "runs (all tasks and seeds; the highest, the lowest for a loss-like metric); only "
            "the chosen lr's runs enter the other tables."
        ],
        key_columns=len(keys),
    )
    return kept, table
