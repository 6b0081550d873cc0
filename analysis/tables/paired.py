"""Every method against LoRA seed by seed (``paired_difference``): the paired difference in
accuracy with its spread and a 95% confidence interval over seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.collect import Collection
from analysis.tables.aggregation import AVG, accuracy_runs, check_mode
from analysis.tables.formatting import Table, num_text
from analysis.tables.ordering import sort_frame
from analysis.tables.registry import register_table
from analysis.tables.table1 import qa_scores, seed_averages
from analysis.width_fit import t_quantile

#: The method every other one is paired with (the paper's baseline column).
REFERENCE = "lora"


def seed_scores(runs: pd.DataFrame) -> pd.DataFrame:
    """Completed per-(run, task) scores in % plus, per seed of a per-task training, ``Avg``:
    the seed's average over the tasks as in Table 1 (:func:`seed_averages`)."""
    scores = qa_scores(runs)
    per_task = scores[(scores["training"] == "per-task") & (scores["task"] != AVG)]
    scores = scores[scores["value"].notna()]
    if per_task.empty:
        return scores
    average = seed_averages(per_task)
    average = average[average["value"].notna()].assign(task=AVG)
    keys = ["model", "training", "label", "method", "seed"]
    return pd.concat([scores, average[[*keys, "task", "value"]]], ignore_index=True)


@register_table
def paired_difference(coll: Collection, seeds: str = "mean") -> Table | None:
    """Rows (model, task, method): the method's accuracy minus LoRA's on the same model, task
    and seed, as mean ± sample std over seeds, its 95% CI and how many seeds it is ahead.
    Pairs are per seed whatever ``seeds`` says (the protocol of the other tables)."""
    check_mode(seeds)
    runs = accuracy_runs(coll.runs)
    if runs.empty or REFERENCE not in set(runs["label"]):
        return None
    scores = seed_scores(runs)
    keys = ["model", "training", "task", "seed"]
    reference = scores[scores["label"] == REFERENCE][[*keys, "value"]]
    others = scores[scores["method"] != REFERENCE]
    pairs = others.merge(reference.rename(columns={"value": "reference"}), on=keys)
    if pairs.empty:
        return None
    pairs = pairs.assign(diff=pairs["value"] - pairs["reference"]).sort_values("seed")
    rows = []
    for (model, training, task, label, method), group in pairs.groupby(
        ["model", "training", "task", "label", "method"], dropna=False, sort=False
    ):
        diffs = group["diff"].to_numpy(dtype=float)
        n = len(diffs)
        mean = float(diffs.mean())
        std = float(diffs.std(ddof=1)) if n > 1 else math.nan
        half = t_quantile(0.975, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
        rows.append(
            {
                "model": model,
                "training": training,
                "task": task,
                "label": label,
                "method": method,
                "pairs": n,
                "diff_mean": mean,
                "diff_std": std,
                "ci_low": mean - half,
                "ci_high": mean + half,
                "ahead": int((diffs > 0).sum()),
                "behind": int((diffs < 0).sum()),
                "per_seed": ", ".join(
                    f"s{seed}: {num_text(d, 1, signed=True)}"
                    for seed, d in zip(group["seed"], diffs)
                ),
            }
        )
    data = pd.DataFrame(rows)
    # Tasks in the paper's order with the average last, then methods in the paper's order.
    data["is_avg"] = data["task"] == AVG
    data = sort_frame(data, ["model", "training", "is_avg", "task", "method", "label"])
    data = data.drop(columns="is_avg")

    def interval(row) -> str:
        if not np.isfinite(row["ci_low"]):
            return "–"
        return f"[{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"

    display = pd.DataFrame(
        {
            "model": data["model"],
            "training": data["training"],
            "task": data["task"],
            "method": data["label"],
            f"Δ vs {REFERENCE} (pp)": [
                num_text(m, signed=True) + ("" if not np.isfinite(s) else f" ± {s:.2f}")
                for m, s in zip(data["diff_mean"], data["diff_std"])
            ],
            "95% CI": data.apply(interval, axis=1),
            "ahead/behind": data["ahead"].astype(str) + "/" + data["behind"].astype(str),
            "per seed": data["per_seed"],
        }
    )
    key_columns = 4
    if set(display["training"]) == {"per-task"}:
        display = display.drop(columns=["training"])
        key_columns = 3
    notes = [
        f"Δ: the method's accuracy minus {REFERENCE}'s on the same model, task and seed (the "
        "same evaluation examples; a seed fixes the adapter initialisation and the data "
        "order), in percentage points: mean ± sample std over the seeds that both completed.",
        "95% CI: mean ± t(0.975, n-1) · std / sqrt(n) over the n paired seeds; an interval "
        "that contains 0 is no significant difference at this number of seeds. ahead/behind: "
        "seeds where the method scored higher/lower.",
        "Avg: per seed, the mean over the tasks (a seed missing a task is left out).",
    ]
    return Table(
        "paired_difference",
        f"Paired per-seed difference from {REFERENCE}: accuracy (percentage points)",
        display,
        data,
        notes,
        key_columns,
    )
