"""Overhead: training time and peak memory relative to LoRA."""

from __future__ import annotations

import math

import pandas as pd

from analysis import published
from analysis.collect import Collection
from analysis.tables.formatting import (
    Table,
    num_text,
)
from analysis.tables.ordering import sort_frame
from analysis.tables.registry import register_table


@register_table
def overhead(coll: Collection, seeds: str = "mean") -> Table | None:
    """Training time and peak memory per method, relative to LoRA on the same model and task
    (means over the completed runs; the seed protocol does not apply to costs)."""
    runs = coll.runs
    if runs.empty or "train_time_s" not in runs:
        return None
    runs = runs[runs["status"] == "completed"]
    keys = ["model", "task", "label", "method"]
    baseline_groups = set(map(tuple, runs.loc[runs["method"] == "lora", ["model", "task"]].values))
    runs = runs[[tuple(v) in baseline_groups for v in runs[["model", "task"]].values]]
    if runs.empty or runs["label"].nunique() < 2:
        return None
    stats = (
        runs.groupby(keys, dropna=False, sort=False)
        .agg(
            time=("train_time_s", "mean"),
            time_std=("train_time_s", "std"),
            wall=("wall_time_s", "mean"),
            memory=("peak_memory_mb", "mean"),
            n=("train_time_s", "count"),
        )
        .reset_index()
    )
    lora = stats[stats["method"] == "lora"].groupby(["model", "task"])[["time", "memory"]].mean()
    stats = stats.join(lora, on=["model", "task"], rsuffix="_lora")
    stats["time_rel"] = (stats["time"] / stats["time_lora"] - 1) * 100
    stats["memory_rel"] = (stats["memory"] / stats["memory_lora"] - 1) * 100
    stats["paper_time_rel"] = [
        published.OVERHEAD_PERCENT.get((r.model, r.task), {}).get(r.method, math.nan)
        for r in stats.itertuples()
    ]
    # Elsewhere (another model, the CPU) the paper's ratios are shown for orientation only:
    # its one published setting, named in the column.
    paper_column = "paper Δ time"
    if stats["paper_time_rel"].isna().all() and len(published.OVERHEAD_PERCENT) == 1:
        ((setting, paper),) = published.OVERHEAD_PERCENT.items()
        stats["paper_time_rel"] = stats["method"].map(paper).astype(float)
        paper_column = f"paper Δ time ({setting[0]}, {setting[1]}, GPU)"
    stats = sort_frame(stats, keys)
    display = pd.DataFrame(
        {
            "model": stats["model"],
            "task": stats["task"],
            "method": stats["label"],
            "train time (s)": [
                f"{num_text(t)} ± {num_text(s)}" if n > 1 else num_text(t)
                for t, s, n in zip(stats["time"], stats["time_std"], stats["n"])
            ],
            "Δ time vs LoRA": stats["time_rel"].map(lambda v: num_text(v, 1, True) + " %"),
            "wall time (s)": stats["wall"].map(num_text),
            "peak memory (MB)": stats["memory"].map(lambda v: num_text(v, 0)),
            "Δ memory vs LoRA": stats["memory_rel"].map(lambda v: num_text(v, 1, True) + " %"),
            "n": stats["n"].astype(int).astype(str),
        }
    )
    if stats["paper_time_rel"].notna().any():
        display[paper_column] = stats["paper_time_rel"].map(lambda v: num_text(v, 1, True) + " %")
    notes = [
        "Means over completed runs; train time = the training loop (no evaluation). "
        "Peak memory: CUDA max allocated, or the process's max RSS on CPU; jobs that share "
        "a process (Hydra's basic launcher) share that peak, so compare memory from "
        "separate processes. Paper: Qwen2-0.5B on HellaSwag, wall clock, LoRA 217.4 s, "
        "no extra memory for Stable-LoRA."
    ]
    return Table("overhead", "Overhead relative to LoRA (AdamW)", display, stats, notes, 3)
