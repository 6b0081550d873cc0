"""The order of display: the paper's order of models, tasks and methods, and whatever a
record names beyond them after it (alphabetically), never left out."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from analysis import published

#: Preferred orders of display; a method, model or task not listed comes after them
#: (alphabetically), never left out.
METHOD_ORDER = (
    "lora",
    "rslora",
    "loraplus",
    "dora",
    "adalora",
    "riemann",
    "lora_rite",
    "adamw_large_wd",
    "shrink_fixed_steps",
    "stable_lora",
    "stable_rslora",
    "stable_loraplus",
    "stable_dora",
    "stable_adalora",
)
MODEL_ORDER = (*published.PAPER_MODELS, "llama3.1_8b", "smollm2_135m", "tiny_llama", "tiny_qwen2")
TASK_ORDER = (
    *published.QA_TASKS,
    "merged_qa",
    "bbc_news",
    "metamath_gsm8k",
    "arithmetic",
    "chatterbot",
    "wizardlm",
)


def _rank(values: Iterable, order: Iterable) -> dict:
    order = list(order)
    known = {v: i for i, v in enumerate(order)}
    return {v: (known.get(v, len(order)), str(v)) for v in values}


def sort_frame(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Sort by the paper's order of models, tasks and methods (then alphabetically)."""
    orders = {
        "model": MODEL_ORDER,
        "task": TASK_ORDER,
        "method": METHOD_ORDER,
        "training": ("per-task", *TASK_ORDER),
    }

    def key(series: pd.Series):
        if series.name == "modules":  # target-module sets: smallest first, as in the paper
            return series.str.count(",")
        if series.name == "label":
            method = series.str.split(",").str[0]
            rank = _rank(method.unique(), METHOD_ORDER)
            return method.map(lambda m: rank[m][0]).astype(str).str.zfill(3) + series
        rank = _rank(series.unique(), orders.get(series.name, ()))
        if series.name in orders:
            return series.map(lambda v: rank[v])
        return series

    present = [c for c in columns if c in frame.columns]
    if not present or frame.empty:
        return frame.reset_index(drop=True)
    for column in reversed(present):  # stable sorts from the last key to the first
        frame = frame.sort_values(column, key=key, kind="stable")
    return frame.reset_index(drop=True)
