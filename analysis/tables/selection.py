"""The learning rate kept per method (``--select-lr``): the best mean over the tasks every
candidate lr was run on, and seeds (the highest, or the lowest for a loss-like metric)."""

from __future__ import annotations

import math
import warnings

import pandas as pd

from analysis.collect import format_value, label_runs
from analysis.tables.aggregation import aggregate, metric_sign
from analysis.tables.formatting import (
    Table,
    cell_text,
)
from analysis.tables.ordering import sort_frame


def _group_name(key: tuple) -> str:
    """``("tiny_llama", "lora", "lora")`` -> ``"tiny_llama, lora"`` (the label repeats the
    method when the runs differ only in lr and seed)."""
    return ", ".join(dict.fromkeys(map(str, key)))


def shared_tasks(frame: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """The rows of ``frame`` on the tasks that every candidate lr of their group has runs on,
    and a note per group whose grid is unbalanced (some task not run at every lr).

    A mean over different task sets ranks the tasks, not the lrs (an lr run on an easy task
    only beats one run mostly on a hard one), so lrs are compared on their common tasks only.
    A group with no common task has nothing to compare: that raises a ValueError."""
    kept, notes = [], []
    for key, group in frame.groupby(keys, dropna=False, sort=False):
        per_lr = group.groupby("optim.lr", dropna=False)["task"].agg(lambda t: set(map(str, t)))
        common = set.intersection(*per_lr)
        every = set.union(*per_lr)
        if not common:
            runs_on = "; ".join(
                f"lr {format_value(lr)}: {', '.join(sorted(tasks))}" for lr, tasks in per_lr.items()
            )
            raise ValueError(
                f"cannot select the lr for {_group_name(key)}: no task was run at every "
                f"candidate lr ({runs_on}); run every lr on a common task, or select on each "
                "task's runs apart."
            )
        if common != every:
            notes.append(
                f"{_group_name(key)}: unbalanced lr grid, the lrs are compared on "
                f"{', '.join(sorted(common))} only (the tasks every candidate lr was run on); "
                f"{', '.join(sorted(every - common))} left out of the comparison."
            )
        kept.append(group[group["task"].astype(str).isin(common)])
    return pd.concat(kept) if kept else frame.iloc[:0], notes


def select_learning_rate(
    runs: pd.DataFrame, metric: str = "score", by: tuple[str, ...] = ("model", "method")
) -> tuple[pd.DataFrame, Table]:
    """Keep, for each ``by`` group (and its other distinguishing settings), the ``optim.lr``
    whose completed runs have the best mean ``metric`` (over tasks and seeds): the highest,
    or the lowest for a loss-like metric (``final/eval/loss``, or ``score`` where the main
    metric is a loss).

    The lrs of a group are compared on the same tasks: those every candidate lr has runs on
    (:func:`shared_tasks`); an unbalanced grid is said in a warning and the table's notes,
    and so is a task with no run at the chosen lr (its runs enter no other table).

    ``metric`` is a column of ``runs``: ``score`` (the final main metric), or e.g.
    ``best/eval/acc`` or ``final/eval/acc_norm``. Returns the kept runs (every task's runs at
    the chosen lr) and a table of every candidate (mean metric over the compared tasks,
    completed runs / runs, chosen). A group that mixes a loss-like main metric with an
    accuracy, or has no task run at every lr, has no mean to rank: that raises a ValueError.
    """
    if metric not in runs.columns:
        raise ValueError(f"cannot select the lr on {metric!r}: not a column of the runs.")
    if "optim.lr" not in runs.columns:
        raise ValueError("cannot select the lr: the runs have no optim.lr.")
    runs = label_runs(runs.copy(), exclude=["optim.lr"])
    keys = [*by, "label"]
    named = runs["main_metric"] if metric == "score" else pd.Series(metric, index=runs.index)
    frame = runs.assign(value=pd.to_numeric(runs[metric], errors="coerce"), sign=metric_sign(named))
    frame, grid_notes = shared_tasks(frame, keys)
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
    grid_notes += _tasks_left_out(runs, kept, chosen, keys)
    for note in grid_notes:
        warnings.warn(f"--select-lr: {note}", stacklevel=2)
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
            "runs (all seeds, on the tasks every candidate lr was run on; the highest, the "
            "lowest for a loss-like metric); only the chosen lr's runs (of every task) enter "
            "the other tables.",
            *grid_notes,
        ],
        key_columns=len(keys),
    )
    return kept, table


def _tasks_left_out(
    runs: pd.DataFrame, kept: pd.DataFrame, chosen: pd.DataFrame, keys: list[str]
) -> list[str]:
    """A note per (group, task) with runs but none at the chosen lr: those runs enter no
    other table, which the report must say rather than drop them silently."""
    notes = []
    everything = runs.groupby(keys, dropna=False, sort=False)["task"]
    at_pick = kept.groupby(keys, dropna=False)["task"].agg(lambda t: set(map(str, t)))
    lrs = chosen.set_index(keys)["optim.lr"]
    for key, tasks in everything:
        missing = sorted(set(map(str, tasks)) - at_pick.get(key, set()))
        for task in missing:
            count = int((tasks.astype(str) == task).sum())
            notes.append(
                f"{_group_name(key)}: {task} has no run at the chosen lr "
                f"{format_value(lrs.get(key))}, so its {count} run(s) at other lrs enter no "
                f"other table; run {task} at that lr to report it."
            )
    return notes
