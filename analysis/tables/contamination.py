"""Train/eval overlap of the runs' splits, from each run's ``contamination.json``
(:mod:`stablelora.contamination`): the first table of a report, so that a study whose eval
items overlap its training data says so before any score."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.collect import Collection
from analysis.tables.formatting import Table
from analysis.tables.registry import register_table
from stablelora.contamination import (
    NEAR_THRESHOLD,
    ContaminationRecordError,
    excluded_ids,
    overlap_count,
    read_record,
)


def overlap_frame(coll: Collection) -> pd.DataFrame:
    """One row per (run, eval set) with a record: split rule, eval split, items, overlap
    counts (exact / near, in training and in the other held-out split), repeats, drops."""
    rows = []
    for run in coll.runs.to_dict("records"):
        try:
            record = read_record(Path(run["run_id"]))
        except ContaminationRecordError:
            continue  # a damaged record: the run shows as unchecked
        if record is None:
            continue
        for eval_set, entry in record["tasks"].items():
            in_train, in_held_out = entry.get("in_train", {}), entry.get("in_held_out", {})
            items = int(entry.get("eval_items", 0))
            rows.append(
                {
                    "run_id": run["run_id"],
                    "model": run["model"],
                    "task": run["task"],
                    "eval_set": eval_set,
                    "split_rule": record["split_rule"],
                    "eval_split": entry.get("eval_split", ""),
                    "items": items,
                    "train_exact": len(in_train.get("exact", [])),
                    "train_near": len(in_train.get("near", [])),
                    "held_out_split": entry.get("held_out_split") or "",
                    "held_out_exact": len(in_held_out.get("exact", [])),
                    "held_out_near": len(in_held_out.get("near", [])),
                    "repeats": len(entry.get("repeats", [])),
                    "overlapping": overlap_count(entry),
                    "clean": items - len(excluded_ids(record)[eval_set]),
                    "train_dropped": entry.get("train_dropped", 0),
                    "held_out_dropped": entry.get("held_out_dropped", 0),
                }
            )
    return pd.DataFrame(rows)


@register_table
def contamination(coll: Collection, seeds: str = "mean") -> Table | None:
    """Eval items that overlap training (exact or near copies) under each run's split rule."""
    frame = overlap_frame(coll)
    if frame.empty:
        return None
    keys = [c for c in frame.columns if c != "run_id"]
    data = frame.groupby(keys, sort=False).size().reset_index(name="runs")
    checked = frame["run_id"].nunique()
    display = pd.DataFrame(
        {
            "task": data["eval_set"],
            "split rule": data["split_rule"],
            "eval split": data["eval_split"],
            "items": data["items"].astype(str),
            "in train (exact / near)": data["train_exact"].astype(str)
            + " / "
            + data["train_near"].astype(str),
            "in held-out split (exact / near)": [
                f"{e} / {n}" + (f" ({s})" if s else "")
                for e, n, s in zip(
                    data["held_out_exact"], data["held_out_near"], data["held_out_split"]
                )
            ],
            "repeats": data["repeats"].astype(str),
            "clean subset": data["clean"].astype(str),
            "runs": data["runs"].astype(str),
        }
    )
    overlapping = data[data["overlapping"] > 0]
    notes = [
        f"{checked} of {len(coll.runs)} runs carry a contamination.json; the others were not "
        "checked."
        if checked < len(coll.runs)
        else f"Every run ({checked}) carries a contamination.json.",
        "Overlap: the same normalised text (exact), or word 3-gram Jaccard similarity >= "
        f"{NEAR_THRESHOLD} (near); an item is its question with its gold answer, or a BBC News "
        "article's body. The clean subset leaves out the overlapping items and the repeats "
        "(later copies of an item within the split); "
        "`python -m stablelora.contamination --run RUN_DIR --ids` lists them.",
    ]
    if not overlapping.empty:
        parts = ", ".join(
            f"{r.eval_set} {r.overlapping} of {r.items} ({r.split_rule} rule)"
            for r in overlapping.drop_duplicates(
                ["eval_set", "split_rule", "overlapping"]
            ).itertuples()
        )
        notes.insert(
            0,
            f"**These runs' eval splits overlap their training data**: {parts}. Tables "
            "built from per-example records (examples.parquet: the paired bootstrap, the "
            "verdicts) score the clean subset as the primary analysis and the full split "
            "beside it; tables built from the runs' summary metrics (Table 1, the per-seed "
            "differences) score the full split, overlapping items included. "
            "task.split_rule=content (the default for new runs) keeps the splits apart.",
        )
    return Table("contamination", "Train/eval overlap of the runs' splits", display, data, notes, 3)
