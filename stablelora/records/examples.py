"""Per-example evaluation records: ``examples.parquet``, one row per (step, eval set, example).

Every evaluation of a task that reports per-example results (multiple choice under loglik and
generation, maths) writes what it decided for each example, so that two runs scored on the
same examples can be compared example by example (McNemar, paired bootstrap:
``analysis/tables/paired_examples.py``):

================  =============  ================================================================
column            type           content
================  =============  ================================================================
``step``          int32          the optimizer step of the evaluation (0: before training)
``eval_set``      string         the (sub)task name (dictionary-encoded)
``example_id``    string         a hash of the example's content (:func:`example_id`), stable
                                 across runs, seeds and processes
``gold``          int16          the gold choice (maths: null)
``pred``          int16          the predicted choice: loglik argmax (``acc``); generation: the
                                 extracted answer label, null when none was found
``pred_norm``     int16          loglik only: the argmax of the length-normalised scores
                                 (``acc_norm``)
``correct``       bool           ``pred == gold`` (maths: the final number matches)
``loglik``        list<float64>  loglik only: the summed log-likelihood of each choice
================  =============  ================================================================

Every evaluation is kept (the initial one, every ``trainer.eval_every`` and the final one),
each exactly once: an evaluation rewrites the file without the rows of its step and with its
own (atomically: a temporary file, fsync and a rename), and a resumed run first drops the rows
after its checkpoint's step, as ``metrics.jsonl`` is cut back (:meth:`ExampleRecords.
truncate_after`). The file is small: a final evaluation of 3,766 QA examples is ~160 KB.

A checkpoint records the steps whose rows the file holds (:attr:`ExampleRecords.steps`), so a
resume finds a file that was deleted or lost rows, as well as one that cannot be read, and
stops with one line instead of finishing the run without them (:class:`RecordsError`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from stablelora.records.atomic import fsync_replace, writing
from stablelora.records.layers import RecordsError

EXAMPLES_FILE = "examples.parquet"
COLUMNS = ("step", "eval_set", "example_id", "gold", "pred", "pred_norm", "correct", "loglik")


def example_id(*content) -> str:
    """16 hex digits of the SHA-1 of ``content`` (JSON): the same example, the same id."""
    text = json.dumps(content, ensure_ascii=False, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def unique_ids(ids: Sequence[str]) -> list[str]:
    """``ids`` with a repeated id suffixed ``~1``, ``~2``... in order, so that an eval set
    holding the same example twice still has one row per example (its order is fixed)."""
    seen: dict[str, int] = {}
    out = []
    for id_ in ids:
        count = seen.get(id_, 0)
        seen[id_] = count + 1
        out.append(id_ if count == 0 else f"{id_}~{count}")
    return out


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("step", pa.int32()),
            ("eval_set", pa.dictionary(pa.int32(), pa.string())),
            ("example_id", pa.string()),
            ("gold", pa.int16()),
            ("pred", pa.int16()),
            ("pred_norm", pa.int16()),
            ("correct", pa.bool_()),
            ("loglik", pa.list_(pa.float64())),
        ]
    )


def to_table(step: int, rows: Sequence[dict]):
    """Rows (dicts with the columns but ``step``; a missing column is null) -> a table."""
    import pyarrow as pa

    columns = {name: [row.get(name) for row in rows] for name in COLUMNS[1:]}
    return pa.table({"step": [step] * len(rows), **columns}, schema=_schema())


def read_example_table(run_dir: Path):
    """The run's ``examples.parquet`` as a pyarrow table, or None when it has none.

    Raises:
        RecordsError: the file cannot be read (truncated, foreign bytes), naming it.
    """
    import pyarrow.parquet as pq

    path = Path(run_dir) / EXAMPLES_FILE
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise RecordsError(f"{path} cannot be read ({type(error).__name__})") from None
    if "step" not in table.column_names:  # parquet, but not this file's schema
        raise RecordsError(f"{path} cannot be read (no step column)")
    return table


def read_examples(run_dir: Path):
    """The run's per-example rows as a pandas frame (empty, with the columns, when none)."""
    import pandas as pd

    table = read_example_table(run_dir)
    if table is None:
        return pd.DataFrame(columns=list(COLUMNS))
    frame = table.to_pandas()
    frame["eval_set"] = frame["eval_set"].astype(str)
    return frame


class ExampleRecords:
    """Writes ``examples.parquet`` of a run; does nothing when ``enabled`` is False.

    ``steps``: the steps whose rows the file holds, in order (what a checkpoint records, for
    :meth:`truncate_after` to check on resume).
    """

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / EXAMPLES_FILE
        self.enabled = enabled
        self.steps: list[int] = []

    def _rewrite(self, table, keep, extra=None) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        tables = [] if table is None else [table.filter(keep(pc, table["step"]))]
        if extra is not None:
            tables.append(extra)
        if not tables:
            return
        merged = pa.concat_tables([t.cast(_schema()) for t in tables])
        tmp = self.path.with_name(self.path.name + ".tmp")
        with writing(self.path):
            pq.write_table(merged, tmp, compression="zstd", use_dictionary=["eval_set"])
            fsync_replace(tmp, self.path)

    def write(self, step: int, rows: Sequence[dict]) -> None:
        """Record the evaluation at ``step``: its rows replace any earlier rows of that step.

        Raises:
            RecordsError: the file cannot be read (:func:`read_example_table`).
        """
        if not self.enabled or not rows:
            return
        table = read_example_table(self.path.parent)
        self._rewrite(table, lambda pc, steps: pc.not_equal(steps, step), to_table(step, rows))
        self.steps = sorted({*self.steps, step})

    def truncate_after(self, step: int, recorded: Sequence[int] | None = None) -> None:
        """Drop the rows of evaluations after ``step`` (a resumed run redoes them); all rows
        for ``step`` < 0 (a fresh start).

        ``recorded``: the steps the checkpoint at ``step`` had written rows of (its
        :attr:`steps`; None for a checkpoint from before it recorded them: nothing to check).
        Those rows cannot be rebuilt, so a file that lacks some of them, or cannot be read,
        stops the resume; the file is checked before anything is cut.

        Raises:
            RecordsError: one line naming the file and what to do.
        """
        if not self.enabled:
            return
        if step < 0:
            self.path.unlink(missing_ok=True)
            self.steps = []
            return
        where = f"the checkpoint at step {step}"
        try:
            table = read_example_table(self.path.parent)
        except RecordsError as error:
            if recorded is not None and not recorded:  # only rows after the checkpoint
                print(
                    f"stablelora: {error}; it holds no evaluation up to {where}, only later "
                    "ones, which are run again: removed it.",
                    file=sys.stderr,
                    flush=True,
                )
                self.path.unlink()
                return
            raise RecordsError(
                f"{error}: it holds per-example records up to {where}, which cannot be "
                "rebuilt; restore it, or rerun with trainer.resume=false to start this run over."
            ) from None
        found = set() if table is None else set(table["step"].unique().to_pylist())
        missing = sorted(set(recorded or ()) - found)
        if missing:
            what = "is missing" if table is None else "has lost rows"
            raise RecordsError(
                f"{self.path} {what}: {where} had recorded the evaluations at steps "
                f"{', '.join(map(str, missing))} in it, which cannot be rebuilt; restore it, or "
                "rerun with trainer.resume=false to start this run over."
            )
        self.steps = sorted(s for s in found if s <= step)
        if table is not None and max(found, default=step) > step:
            self._rewrite(table, lambda pc, steps: pc.less_equal(steps, step))
