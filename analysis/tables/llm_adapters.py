"""LLM-Adapters' benchmarks (runs of ``task.family=llm_adapters``): accuracy per dataset and
the average, in the layout of the DoRA paper's tables: ``commonsense8`` (BoolQ, PIQA, SIQA,
HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA) and ``maths7`` (MultiArith, GSM8K, AddSub, AQuA,
SingleEq, SVAMP, MAWPS).

A run reports ``final/<main metric>/<dataset>`` for each dataset of its ``task.eval_datasets``
(:mod:`stablelora.tasks.llm_adapters`); each table takes the datasets of its benchmark, so a
run evaluated on both benchmarks appears in both. Rows: model, task, training file
(``task.train_file``) and method; a column per dataset present, then ``Avg``.
"""

from __future__ import annotations

import math

import pandas as pd

from analysis.collect import Collection
from analysis.tables.aggregation import (
    AVG,
    SCALE,
    aggregate,
    check_mode,
    not_completed_note,
    protocol_note,
)
from analysis.tables.formatting import DASH, Table, cell_text, group_key, grouped
from analysis.tables.ordering import sort_frame
from analysis.tables.registry import register_table

FAMILY = "llm_adapters"
#: The datasets of each benchmark, in the column order of LLM-Adapters' and DoRA's tables
#: (the folder names of ``stablelora.tasks.llm_adapters.COMMONSENSE8``/``MATHS7``, repeated
#: here because the analysis imports no torch; a test checks that they agree).
BENCHMARKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "commonsense8": (
        "Commonsense-8",
        (
            "boolq",
            "piqa",
            "social_i_qa",
            "hellaswag",
            "winogrande",
            "ARC-Easy",
            "ARC-Challenge",
            "openbookqa",
        ),
    ),
    "maths7": (
        "Maths-7",
        ("MultiArith", "gsm8k", "AddSub", "AQuA", "SingleEq", "SVAMP", "mawps"),
    ),
}
#: Column titles (the papers' names) of the dataset folders.
TITLES = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "social_i_qa": "SIQA",
    "hellaswag": "HellaSwag",
    "winogrande": "WinoGrande",
    "ARC-Easy": "ARC-e",
    "ARC-Challenge": "ARC-c",
    "openbookqa": "OBQA",
    "gsm8k": "GSM8K",
    "mawps": "MAWPS",
}
KEYS = ["model", "task", "training", "label", "method"]


def dataset_scores(runs: pd.DataFrame, datasets: tuple[str, ...]) -> pd.DataFrame:
    """Long per-(run, dataset) accuracies in %, for the runs' datasets among ``datasets``,
    plus an ``Avg`` row per run: the mean over them (missing when one is)."""
    rows = []
    for run in runs.to_dict("records"):
        listed = str(run.get("task.eval_datasets") or "").split(",")
        mine = [name for name in datasets if name in listed]
        if not mine:
            continue
        base = {k: run.get(k) for k in ("run_id", "run", "model", "task", "label", "method")}
        base |= {"seed": run.get("seed"), "status": run["status"]}
        base["training"] = run.get("task.train_file")
        values = []
        for name in mine:
            value = run.get(f"final/{run['main_metric']}/{name}", math.nan)
            value = value * SCALE if run["status"] == "completed" and pd.notna(value) else math.nan
            values.append(value)
            rows.append({**base, "dataset": name, "value": value})
        average = sum(values) / len(values) if all(pd.notna(v) for v in values) else math.nan
        rows.append({**base, "dataset": AVG, "value": average})
    return pd.DataFrame(
        rows, columns=[*KEYS, "run_id", "run", "seed", "status", "dataset", "value"]
    )


def benchmark_table(coll: Collection, seeds: str, name: str) -> Table | None:
    """The table of benchmark ``name`` (a key of :data:`BENCHMARKS`), or None without runs."""
    check_mode(seeds)
    runs = coll.runs
    if runs.empty:
        return None
    runs = runs[runs["task_family"] == FAMILY]
    title, datasets = BENCHMARKS[name]
    scores = dataset_scores(runs, datasets)
    if scores.empty:
        return None
    cells = aggregate(scores, [*KEYS, "dataset"], seeds)
    present = [d for d in datasets if d in set(scores["dataset"])]
    groups = grouped(cells, KEYS)
    display_rows, data_rows = [], []
    for row in sort_frame(cells[KEYS].drop_duplicates(), KEYS).to_dict("records"):
        mine = groups[group_key(row, KEYS)].set_index("dataset")
        shown = {k: row[k] for k in ("model", "task", "training")} | {"method": row["label"]}
        data = {k: row[k] for k in KEYS}
        for dataset in [*present, AVG]:
            stats = mine.loc[dataset] if dataset in mine.index else None
            shown[TITLES.get(dataset, dataset)] = (
                cell_text(stats, seeds) if stats is not None else DASH
            )
            column = dataset.lower() if dataset == AVG else dataset
            for part in ("value", "std", "n", "runs"):
                key = column if part == "value" else f"{column}_{part}"
                data[key] = stats[part] if stats is not None else math.nan
        display_rows.append(shown)
        data_rows.append(data)
    display = pd.DataFrame(display_rows)
    if display["task"].nunique() == 1:
        display = display.drop(columns=["task"])
    notes = [
        protocol_note(seeds),
        "Avg: per run the mean over those of its eval datasets that this table shows (a run "
        "missing a result for one has no average), then over seeds like every column; "
        "best-of takes each column's best run.",
        "LLM-Adapters' test files and answer rules, greedy generation "
        "(stablelora/tasks/llm_adapters.py); training: the task's train_file.",
    ]
    kept = runs[runs["run_id"].isin(set(scores["run_id"]))]
    notes += not_completed_note(kept)
    return Table(
        name,
        f"{title} (LLM-Adapters): accuracy (%) per dataset and average",
        display,
        pd.DataFrame(data_rows),
        notes,
        key_columns=display.shape[1] - len(present) - 1,
    )


@register_table(owns={"task_family": FAMILY})
def commonsense8(coll: Collection, seeds: str = "mean") -> Table | None:
    """BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA and their average."""
    return benchmark_table(coll, seeds, "commonsense8")


@register_table(owns={"task_family": FAMILY})
def maths7(coll: Collection, seeds: str = "mean") -> Table | None:
    """MultiArith, GSM8K, AddSub, AQuA, SingleEq, SVAMP, MAWPS and their average."""
    return benchmark_table(coll, seeds, "maths7")
