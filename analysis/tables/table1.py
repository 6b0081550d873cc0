"""Table 1: QA accuracy per task and on average (``table1``), and in the paper's layout,
rows models and columns methods (``table1_avg``), beside the published averages."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd

from analysis import published
from analysis.collect import Collection
from analysis.tables.aggregation import (
    AVG,
    SCALE,
    aggregate,
    not_completed_note,
    protocol_note,
    table_runs,
)
from analysis.tables.formatting import (
    DASH,
    Table,
    cell_text,
    group_key,
    grouped,
    num_text,
    pivot_with_paper,
)
from analysis.tables.ordering import TASK_ORDER, sort_frame
from analysis.tables.registry import register_table


def qa_scores(runs: pd.DataFrame) -> pd.DataFrame:
    """Long per-(run, task) scores of the non-generation runs, in %.

    A run trained on one task gives one row (its main metric; ``training="per-task"``). A run
    trained on a mixture (``merged_qa``: its summary has ``final/<main metric>/<subtask>``)
    gives a row per subtask plus an ``Avg`` row (its main metric, the subtasks' mean), with
    ``training`` = the mixture's task name.
    """
    columns = [
        "run_id",
        "run",
        "model",
        "training",
        "label",
        "method",
        "seed",
        "task",
        "value",
        "status",
    ]
    rows = []
    sub_columns: dict[str, list[str]] = {}
    for run in runs.to_dict("records"):
        metric = run["main_metric"]
        if metric not in sub_columns:
            prefix = f"final/{metric}/"
            sub_columns[metric] = [c for c in runs.columns if c.startswith(prefix)]
        subs = {c.rsplit("/", 1)[-1]: run[c] for c in sub_columns[metric] if pd.notna(run[c])}
        mixture = bool(subs) or run["task"] == "merged_qa"
        base = {k: run[k] for k in ("run_id", "run", "model", "label", "method", "seed", "status")}
        if mixture:
            base["training"] = run["task"]
            for task, value in subs.items():
                rows.append({**base, "task": task, "value": value * SCALE})
            rows.append({**base, "task": AVG, "value": run["score"] * SCALE})
        else:
            rows.append(
                {**base, "training": "per-task", "task": run["task"], "value": run["score"] * SCALE}
            )
    return pd.DataFrame(rows, columns=columns)


def _first_problem(statuses: pd.Series) -> str:
    return next((status for status in statuses if status != "completed"), "missing task")


def seed_averages(per_task: pd.DataFrame) -> pd.DataFrame:
    """Per (model, training, label, method, seed) of per-task scores (``qa_scores`` rows of
    per-task training): ``value``, the mean over the tasks when the seed has a score on every
    task of its (model, training) group, else NaN (a missing or failed task makes the
    average missing, never a mean of fewer tasks), and ``status`` (``completed``, or the
    first problem). The one definition of a seed's average, for Table 1 and for the paired
    differences."""
    keys = ["model", "training", "label", "method", "seed"]
    needed = per_task.groupby(["model", "training"])["task"].nunique().rename("needed")
    scored = per_task[per_task["value"].notna()]
    by_seed = per_task.groupby(keys, dropna=False, sort=False)
    seeds = by_seed.agg(value=("value", "mean"), status=("status", _first_problem))
    seeds["tasks"] = scored.groupby(keys, dropna=False)["task"].nunique()
    seeds = seeds.reset_index().join(needed, on=["model", "training"])
    complete = seeds["tasks"].fillna(0) >= seeds["needed"]
    seeds["value"] = seeds["value"].where(complete)
    seeds["status"] = seeds["status"].where(~complete, "completed")
    return seeds


def _table1_cells(runs: pd.DataFrame, mode: str) -> tuple[pd.DataFrame, list[str]]:
    """Aggregated cells of Table 1 (one row per model, training, label, task incl. Avg)."""
    scores = qa_scores(runs)
    keys = ["model", "training", "label", "method"]
    tasks = [t for t in TASK_ORDER if t in set(scores["task"])]
    tasks += sorted(set(scores["task"]) - set(tasks) - {AVG})
    task_scores = scores[scores["task"] != AVG]
    cells = aggregate(task_scores, [*keys, "task"], mode)
    per_task = task_scores[task_scores["training"] == "per-task"]
    parts = [cells]
    if not per_task.empty:
        # Every task of the (model, training) group is needed for an average (seed_averages).
        if mode == "mean":
            average = aggregate(seed_averages(per_task), keys, "mean")
        else:  # best of seeds per task (per training run), then their mean
            needed = per_task.groupby(["model", "training"])["task"].nunique().rename("needed")
            task_cells = cells[cells["training"] == "per-task"]
            average = (
                task_cells.assign(scored=task_cells["n"] > 0)
                .groupby(keys, dropna=False, sort=False)
                .agg(
                    value=("value", "mean"),
                    scored=("scored", "sum"),
                    n=("n", "min"),
                    runs=("runs", "max"),
                    statuses=("statuses", lambda s: ", ".join(sorted(set(s) - {""}))),
                )
            )
            average = average.reset_index().join(needed, on=["model", "training"])
            complete = average["scored"] >= average["needed"]
            average["value"] = average["value"].where(complete)
            average["statuses"] = average["statuses"].where(
                ~complete | (average["statuses"] == ""), ""
            )
            average.loc[~complete & (average["statuses"] == ""), "statuses"] = "missing task"
            average["std"] = math.nan
        parts.append(average.assign(task=AVG)[cells.columns])
    mixtures = scores[(scores["training"] != "per-task") & (scores["task"] == AVG)]
    if not mixtures.empty:
        parts.append(aggregate(mixtures, [*keys, "task"], mode))
    return pd.concat(parts, ignore_index=True), tasks


def _table1_published(model: str, training: str, method: str, tasks: list[str]) -> float:
    if training != "per-task" or set(tasks) != set(published.QA_TASKS):
        return math.nan
    return published.TABLE1_QA_AVERAGE.get(model, {}).get(method, math.nan)


@register_table
def table1(coll: Collection, seeds: str = "mean") -> Table | None:
    """Table 1: rows (model, method), a column per QA task, the average, the paper's average
    and the difference. The CSV has one row per (model, training, method label)."""
    runs = table_runs(coll, seeds, relabel=False)
    if runs is None:
        return None
    cells, tasks = _table1_cells(runs, seeds)
    keys = ["model", "training", "label", "method"]
    rows = sort_frame(cells[keys].drop_duplicates(), keys)
    groups = grouped(cells, keys)
    display_rows, data_rows = [], []
    for row in rows.to_dict("records"):
        mine = groups[group_key(row, keys)].set_index("task")
        row_tasks = [t for t in tasks if t in mine.index]
        paper = _table1_published(row["model"], row["training"], row["method"], row_tasks)
        avg = mine.loc[AVG] if AVG in mine.index else None
        ours_avg = avg["value"] if avg is not None else math.nan
        shown = {"model": row["model"], "training": row["training"], "method": row["label"]}
        data = {
            "model": row["model"],
            "training": row["training"],
            "method": row["method"],
            "label": row["label"],
        }
        for task in [*tasks, AVG]:
            stats = mine.loc[task] if task in mine.index else None
            shown[task] = cell_text(stats, seeds) if stats is not None else DASH
            name = task.lower() if task == AVG else task
            for part in ("value", "std", "n", "runs"):
                column = name if part == "value" else f"{name}_{part}"
                data[column] = stats[part] if stats is not None else math.nan
        shown["Paper"], shown["Δ"] = num_text(paper), num_text(ours_avg - paper, signed=True)
        data["paper"], data["diff"] = paper, ours_avg - paper
        display_rows.append(shown)
        data_rows.append(data)
    display, data = pd.DataFrame(display_rows), pd.DataFrame(data_rows)
    if data["paper"].isna().all():
        display = display.drop(columns=["Paper", "Δ"])
    if set(display["training"]) == {"per-task"}:
        display = display.drop(columns=["training"])
    notes = [
        protocol_note(seeds),
        "Avg: per seed the mean over the tasks (a seed missing a task has no average); "
        "best-of: the mean of the per-task best runs; a mixture's Avg is its main metric.",
        "Paper: the published QA average (Table 1; best of three seeds, per-task "
        "training), shown when the five QA tasks are present.",
    ]
    notes += not_completed_note(runs)
    title = "Table 1: accuracy (%) per task and average"
    key_columns = 3 if "training" in display else 2
    return Table("table1", title, display, data, notes, key_columns)


@register_table
def table1_best(coll: Collection, seeds: str = "mean") -> Table | None:
    """:func:`table1` with the best of the seeds per task (the paper's protocol), whatever
    the report's ``seeds``: the mean ± std table and the best-of table side by side."""
    table = table1(coll, "best")
    if table is None:
        return None
    title = "Table 1, best of the seeds per task (the paper's protocol): accuracy (%)"
    return dataclasses.replace(table, name="table1_best", title=title)


@register_table
def table1_avg(coll: Collection, seeds: str = "mean") -> Table | None:
    """Table 1 in the paper's layout: rows models, columns methods, average accuracy (%)."""
    runs = table_runs(coll, seeds, relabel=False)
    if runs is None:
        return None
    full, _ = _table1_cells(runs, seeds)
    cells = full[full["task"] == AVG]
    labels = sort_frame(cells[["label"]].drop_duplicates(), ["label"])["label"].tolist()
    methods = dict(zip(cells["label"], cells["method"]))
    row_keys = ["model", "training"]

    tasks_of = full[full["task"] != AVG].groupby(["model", "training", "label"])["task"]
    tasks_of = tasks_of.agg(list).to_dict()

    def paper(row, label):
        tasks = tasks_of.get((row["model"], row["training"], label), [])
        return _table1_published(row["model"], row["training"], methods[label], tasks)

    display, data = pivot_with_paper(cells, row_keys, "label", labels, seeds, paper)
    if set(display["training"]) <= {"per-task", ""}:
        display = display.drop(columns=["training"])
    notes = [protocol_note(seeds), "Average over the tasks as in table1."]
    notes += not_completed_note(runs)
    return Table(
        "table1_avg",
        "Table 1 layout: average accuracy (%), rows models, columns methods",
        display,
        data,
        notes,
        key_columns=display.shape[1] - len(labels),
    )
