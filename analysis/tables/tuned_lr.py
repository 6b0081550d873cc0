"""Learning-rate selection on held-out data (``tuned_lr``): the first stage of a tuned study.

A selection sweep trains every method at every lr of a shared grid and scores it on the
validation split (``task.eval_split=validation``). For each (model, task, method and its other
hyper-parameters) this picks the lr with the best mean final main metric (``score``) over
its completed selection runs (seeds): the highest, or the lowest for a loss-like main metric
(a dialogue task's held-out ``loss``); a tie goes to the **smaller** lr (the cheaper step, and
the order of the grid; it is stated in the table's notes). An lr none of whose runs completed
(diverged, failed) cannot be picked, and a method gets no pick until it has a completed or
diverged run at every lr of the grid (all lrs any method of the same model and task ran), so
a selection run over several sittings never hands a partial pick to the final stage, while an
lr too large for a method (its run diverged) does not block its pick. A pick on the grid's
smallest or largest lr is flagged: the grid should be extended there.

The picks are written by ``analysis.report`` next to the table, as ``tuned_lr.json`` (see
:func:`picks_record`); the final stage (``python -m experiments tuned_final``) reads that
file and runs each method at its pick, so the selection is never redone by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from analysis.collect import Collection, format_value, label_runs
from analysis.tables.aggregation import aggregate, check_mode, metric_sign
from analysis.tables.formatting import Table, cell_text
from analysis.tables.ordering import sort_frame
from analysis.tables.registry import register_table

PICKS_FILE = "tuned_lr.json"
#: The record's ``metric``: what the picks were ranked on. The final stage refuses a file that
#: says otherwise (experiments.common.PICKS_METRIC, the same text).
PICKS_METRIC = (
    "score (final main metric), mean over the selection runs' seeds; the highest wins (the "
    "lowest for a loss-like metric)"
)
TIE_RULE = "ties go to the smaller lr"
KEYS = ["model", "task", "label", "method"]
#: Run statuses that are a result at their lr (a diverged run is one: that lr is too large).
ENDED = ("completed", "diverged")


def pick_learning_rates(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, task, label, method, lr): the mean ``score`` over completed runs
    (``value``), ``std``, ``n``/``runs``, ``picked`` (the best mean: the highest, the lowest
    for a loss-like main metric) and ``edge`` (the pick is the grid's smallest or largest lr);
    ``label`` leaves the lr out."""
    runs = label_runs(runs.copy(), exclude=["optim.lr"])
    frame = runs.assign(
        value=pd.to_numeric(runs["score"], errors="coerce"),
        ended=runs["status"].isin(ENDED),
        sign=metric_sign(runs["main_metric"]),
    )
    frame["optim.lr"] = frame["optim.lr"].astype(float)
    frame.loc[frame["status"] != "completed", "value"] = math.nan
    by_lr = [*KEYS, "optim.lr"]
    # the main metric is one per task, so its sign is one per group: a key changes nothing
    stats = aggregate(frame, [*by_lr, "sign"], "mean")
    # The grid: every lr any method of the same model and task ran. A method without an
    # ended run (completed, or diverged: a result, unlike a failed or unfinished run) at each
    # of them gets no pick yet: a selection over several sittings must not hand a partial
    # pick to the final stage.
    ended = frame.groupby(by_lr, dropna=False)["ended"].any().reset_index()
    stats = stats.merge(ended, on=by_lr, how="left")
    stats["picked"], stats["edge"], stats["incomplete"] = False, False, False
    grids = stats.groupby(["model", "task"], dropna=False)["optim.lr"].agg(frozenset)
    for _, group in stats.groupby(KEYS, dropna=False, sort=False):
        scored = group[group["value"].notna()]
        first = group.iloc[0]
        if set(group.loc[group["ended"], "optim.lr"]) != grids[(first["model"], first["task"])]:
            stats.loc[group.index, "incomplete"] = True
            continue
        if scored.empty:  # every lr diverged: nothing to pick
            continue
        # the best mean; among equal means the smallest lr
        best = (
            scored.assign(signed=scored["value"] * scored["sign"])
            .sort_values(["signed", "optim.lr"], ascending=[False, True])
            .index[0]
        )
        stats.loc[best, "picked"] = True
        grid = group["optim.lr"]
        lr = stats.loc[best, "optim.lr"]
        stats.loc[best, "edge"] = len(grid) > 1 and lr in (grid.min(), grid.max())
    return sort_frame(stats.drop(columns=["ended", "sign"]), by_lr).reset_index(drop=True)


def picks_record(data: pd.DataFrame) -> dict:
    """The content of ``tuned_lr.json`` from the table's data: the rule and one entry per
    pick."""
    picked = data[data["picked"]]
    split = data["split"].iloc[0] if len(data) else None
    return {
        "metric": PICKS_METRIC,
        "split": None if pd.isna(split) else split,
        "tie_rule": TIE_RULE,
        "picks": [
            {
                "model": row["model"],
                "task": row["task"],
                "method": row["method"],
                "label": row["label"],
                "lr": float(row["optim.lr"]),
                "score": float(row["value"]),
                "seeds": int(row["n"]),
                "on_grid_edge": bool(row["edge"]),
            }
            for _, row in picked.iterrows()
        ],
    }


def write_picks(table: Table, out: Path) -> Path:
    """``out/tuned_lr.json``: the picks of the ``tuned_lr`` table (:func:`picks_record`), the
    record the final stage of a tuned study reads; ``analysis.report`` writes it beside the
    report."""
    path = out / PICKS_FILE
    path.write_text(json.dumps(picks_record(table.data), indent=2) + "\n")
    return path


def selection_split(runs: pd.DataFrame) -> str | None:
    """The eval split the runs were scored on (``"validation"``...), or None if mixed."""
    splits = set(runs["task.eval_split"].dropna()) if "task.eval_split" in runs else set()
    return next(iter(splits)) if len(splits) == 1 else None


@register_table
def tuned_lr(coll: Collection, seeds: str = "mean") -> Table | None:
    """Every (method, lr) of the selection sweep with its mean validation score, and the pick."""
    check_mode(seeds)
    runs = coll.runs
    if runs.empty or "optim.lr" not in runs or runs["optim.lr"].nunique() < 2:
        return None
    split = selection_split(runs)
    data = pick_learning_rates(runs).assign(split=split)
    display = pd.DataFrame(
        {
            "model": data["model"].astype(str),
            "task": data["task"].astype(str),
            "method": data["label"].astype(str),
            "lr": data["optim.lr"].map(format_value),
            "score (mean ± std)": data.apply(lambda r: cell_text(r, "mean", 4), axis=1),
            "picked": [
                ("yes" + (" (grid edge)" if edge else ""))
                if picked
                else ("not yet (grid incomplete)" if incomplete else "")
                for picked, edge, incomplete in zip(
                    data["picked"], data["edge"], data["incomplete"]
                )
            ],
        }
    )
    notes = [
        "score: the final main metric (a mixture's: the unweighted mean over its tasks) on the "
        f"{split or 'runs eval'} split, mean ± sample std over the completed selection runs "
        "(n/runs when some did not complete).",
        "Pick: the lr with the best mean score per model, task and method (the highest; the "
        f"lowest for a loss-like main metric); {TIE_RULE}; an "
        "lr with no completed run is never picked, and a method gets a pick only once it has a "
        "completed or diverged run at every lr of the grid (every lr some method ran). A pick "
        "on the grid's edge means the grid should be extended beyond it.",
    ]
    if split != "validation":
        notes.append(
            "These runs were not all scored on the held-out validation split "
            f"(task.eval_split: {split or 'mixed'}): the pick is not a held-out selection."
        )
    title = "Learning rate picked per method on validation"
    return Table("tuned_lr", title, display, data, notes, key_columns=3)
