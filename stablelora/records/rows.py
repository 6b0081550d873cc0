"""``metrics.jsonl``: its rows read back (a damaged row named in one line) and cut back to a
checkpoint's on resume; a nested config flattened into the keys W&B and the analysis use."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from stablelora.records.layers import (
    RecordsError,
)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file: a torn last line is skipped, any other
    unreadable line too, with a warning naming the file and the line."""
    rows: list[dict] = []
    if not path.exists():
        return rows
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
        elif number < len(lines):
            warnings.warn(f"{path} line {number} cannot be read; skipped it.", stacklevel=2)
    return rows


def read_resumed_rows(path: Path, rows: int, step: int | None) -> list[dict]:
    """The first ``rows`` rows of ``metrics.jsonl``: those a checkpoint at ``step`` had seen.

    A torn last line (a kill mid-write) ends the file; any other unreadable line among them,
    or a row of a later step than the checkpoint's, means the file was damaged or edited:
    resuming on it would drop or repeat rows, so it stops with one line naming the file and
    the line.

    Raises:
        RecordsError: a damaged line, or fewer rows than ``rows``.
    """
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    kept: list[dict] = []
    where = f"the checkpoint at step {step}" if step is not None else "the checkpoint"
    for number, line in enumerate(lines[:rows], start=1):
        try:
            row = json.loads(line)
            problem = (
                None
                if isinstance(row, dict) and isinstance(row.get("step"), int)
                else ("not a row with a step")
            )
        except json.JSONDecodeError:
            row, problem = None, "not JSON"
        if problem and number == len(lines):
            break  # a torn last line: the short-records error below
        if problem is None and step is not None and row["step"] > step:
            problem = f"a row of step {row['step']}, after {where}"
        if problem:
            raise RecordsError(
                f"{path} line {number} is damaged ({problem}) among the {rows} rows {where} "
                "had written: resuming would lose or repeat rows; restore the file, or rerun "
                "with trainer.resume=false to start this run over."
            )
        kept.append(row)
    if len(kept) < rows:
        raise RecordsError(
            f"{path} has {len(kept)} rows but {where} had written {rows}: "
            "records are missing, so resuming would leave a gap; rerun with "
            "trainer.resume=false to start this run over."
        )
    return kept


def flatten(config: dict, prefix: str = "", *, join_lists: bool = False) -> dict:
    """Nested config -> ``{"optim.lr": 1e-4, ...}``. With ``join_lists``, lists become
    comma-joined strings so that they can be grouped on (``adapter.target_modules`` ->
    ``"q_proj,v_proj"``, as the analysis shows them); else they are kept as they are."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}.", join_lists=join_lists))
        elif join_lists and isinstance(value, (list, tuple)):
            flat[name] = ",".join(str(item) for item in value)
        else:
            flat[name] = value
    return flat
