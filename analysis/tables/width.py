"""The width exponents (``gamma_width``): gamma against model width, fitted by
:mod:`analysis.width_fit`.

From the width sweep's ``records.jsonl`` (``experiments/width_sweep.py``) when a directory the
runs were collected from holds one (itself or a folder in it), one table per file; else from
the collected runs when they differ in model width (:data:`WIDTH_COLUMNS`). The plots of the
same fits are :mod:`analysis.plots.width`'s.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from analysis import width_fit
from analysis.collect import Collection, format_value, label_runs
from analysis.tables.formatting import Table
from analysis.tables.registry import register_table

#: Config keys holding the model width: the toy width model's, a config-built model's.
WIDTH_COLUMNS = ("model.width", "model.config.hidden_size")


def width_column(runs: pd.DataFrame) -> str | None:
    """The config key that holds the model width, if the runs differ in it."""
    for column in WIDTH_COLUMNS:
        if column in runs and runs[column].nunique() >= 2:
            return column
    return None


def width_records(coll: Collection) -> pd.DataFrame:
    """The probe's mean-over-layers magnitudes of runs that differ in model width, in
    :func:`analysis.width_fit.load_records`' long format: method = the run's label without
    the width, lr_mode = ``fixed``/``scaled`` for runs with ``lr_width_exponent`` (the width
    sweep's lr rule), else the run's learning rate."""
    runs = coll.runs
    column = width_column(runs)
    if column is None or coll.history.empty:
        return pd.DataFrame()
    runs = runs[runs[column].notna()].copy()
    label_runs(runs, exclude=[column, "optim.lr", "lr_width_exponent"])
    if "lr_width_exponent" in runs:
        exponent = pd.to_numeric(runs["lr_width_exponent"], errors="coerce").fillna(0)
        runs["lr_mode"] = exponent.map(lambda e: "fixed" if e == 0 else "scaled")
    else:
        runs["lr_mode"] = "lr=" + runs["optim.lr"].map(format_value)
    quantities = [f"feat/{q}" for q in ("delta1", "delta2", "delta3", "dY", "gAZ", "AZ", "Z")]
    history = coll.history[coll.history["key"].isin(quantities)]
    history = history.astype({"run_id": str, "key": str})
    info = runs[["run_id", "label", "lr_mode", column, "seed"]].astype({"run_id": str})
    table = history.merge(info, on="run_id")
    return pd.DataFrame(
        {
            "method": table["label"],
            "lr_mode": table["lr_mode"],
            "width": table[column].astype(int),
            "seed": table["seed"],
            "step": table["step"],
            "quantity": table["key"].str.removeprefix("feat/"),
            "value": table["value"],
        }
    )


def runs_fits(coll: Collection) -> tuple[pd.DataFrame, list[int], pd.DataFrame] | None:
    """:func:`width_records` of the runs, the steps every run logged (among
    :func:`analysis.width_fit.choose_steps`') and the fits at them; None when the runs do not
    differ in width or share no probed step."""
    table = width_records(coll)
    steps = width_fit.choose_steps(table) if not table.empty else []
    if not steps:
        return None
    return table, steps, width_fit.fit_exponents(table, steps)


def sweep_records(directories: Iterable[Path]) -> list[Path]:
    """``records.jsonl`` files of ``experiments/width_sweep.py`` in ``directories`` (each
    itself or a folder in it): one JSON run per line with ``width`` and ``metrics``."""
    found = []
    for directory in directories:
        for path in [directory / "records.jsonl", *directory.glob("*/records.jsonl")]:
            if path.is_file():
                with path.open() as stream:
                    first = stream.readline()
                try:
                    record = json.loads(first)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and {"width", "metrics"} <= set(record):
                    found.append(path)
    return found


def suffixes(paths: list[Path]) -> list[str]:
    """The name suffix of each records file's table and plots: none for a single file, else
    ``_0``, ``_1``..."""
    return [""] if len(paths) == 1 else [f"_{index}" for index in range(len(paths))]


def _width_table(name: str, source: str, fits: pd.DataFrame) -> Table:
    display = width_fit.exponent_table(fits).astype(str)
    return Table(
        name,
        f"Width exponents of the feature updates ({source})",
        display,
        fits,
        [
            "Least-squares slope of log(RMS) on log(width) with a 95% CI (analysis.width_fit); "
            "stable feature learning: 0 for delta1, delta2, delta3 and dY; the paper's "
            "Assumption 1: 1 for gAZ."
        ],
        key_columns=3,
    )


@register_table
def gamma_width(coll: Collection, seeds: str = "mean") -> Table | list[Table] | None:
    """Width exponents of the feature updates: the slope of log(RMS) on log(width) with a 95%
    CI per method, lr mode, step and quantity, over every seed. From the width sweep's
    ``records.jsonl`` beside the runs (a table per file), else from runs of several widths."""
    records = sweep_records(coll.roots)
    if records:
        return [
            _width_table(f"gamma_width{suffix}", str(path), width_fit.fit_records(path)[2])
            for path, suffix in zip(records, suffixes(records))
        ]
    fitted = runs_fits(coll)
    if fitted is None:
        return None
    return _width_table("gamma_width", "runs of several widths", fitted[2])
