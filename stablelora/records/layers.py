"""Per-layer run records: the probe's per-layer series in one compressed parquet file per run.

The feature probe (:mod:`stablelora.probes.gamma`) returns per-layer keys ``<section>/<layer>/<q>``
(``feat/<layer>/delta1``, ``gamma/<layer>/dY``, ``lora/<layer>/norm_A``, ...). Written as JSON
text in every ``metrics.jsonl`` row they cost about 70 KB per logged step for 60 layers, so
:class:`~stablelora.records.recorder.RunRecorder` splits them off (:func:`split_per_layer`)
and hands them to a :class:`LayerRecords`, which writes them in a wide table, one row per
(step, layer):

====================  ========  ===========================================================
column                type      content
====================  ========  ===========================================================
``step``              int32     the optimizer step
``layer``             string    ``LoRAPair.name`` (dictionary-encoded: stored once)
``width``             int32     n, the layer's input width (the probe's ``lora/<layer>/width``)
``feat/<q>``          float32   ``feat/<layer>/<q>``: the RMS of q (q: delta1 ... Z)
``lora/<name>``       float32   ``lora/<layer>/<name>``: norm_A, norm_B, shrinking, stop_step
``gamma/<q>``         float64   only where ``gamma/<layer>/<q>`` is *not*
                                ``gamma_values(feat/<q>, width)``: absent for the probe's rows
====================  ========  ===========================================================

A key a row did not have is a null; a NaN value stays a NaN. float32 loses nothing: the probe
computes every per-layer RMS and norm in float32 and steps are integers, and the per-layer
gamma values are recomputed exactly by :func:`stablelora.probes.quantities.gamma_values`, the very
function the probe computes them with (:func:`with_gamma`, :func:`per_layer_metrics`).

Files, crash-safe and append-friendly: rows are buffered in memory; :meth:`LayerRecords.flush`
(the runner calls it before each checkpoint, and at the end) writes the buffer as a new part
``layers.parts/steps-<first>-<last>.parquet`` through a temporary file and a rename, so a
killed run leaves whole parts holding at least every step of its last checkpoint.
:meth:`LayerRecords.close` (at the end of a run) merges everything into ``layers.parquet`` and
removes the parts. Readers (:func:`read_layers`) take ``layers.parquet`` and the parts and
keep one row per (step, layer), so a crash between the merge and the removal duplicates
nothing. :meth:`LayerRecords.truncate_after` drops rows after a checkpoint's step on resume,
like ``metrics.jsonl``.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stablelora.probes.quantities import QUANTITIES, gamma_values
from stablelora.records.atomic import writing

LAYERS_FILE = "layers.parquet"
PARTS_DIR = "layers.parts"
#: Sections of the probe's keys that may hold per-layer values (``<section>/<layer>/<q>``).
SECTIONS = ("feat", "gamma", "lora")
WIDTH_KEY = "width"  # ``lora/<layer>/width`` in the probe's metrics, column ``width`` here
INDEX_COLUMNS = ("step", "layer", "width")


class RecordsError(RuntimeError):
    """Records that cannot be trusted (shorter than the checkpoint says, a damaged line or
    file): one line naming the file and what to do."""


def _first_step(path: Path) -> int | None:
    """The first step of a part ``steps-<first>-<last>.parquet`` (None for another name)."""
    parts = path.stem.split("-")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _read_file(path: Path, columns: Callable[[list[str]], list[str]] | None = None):
    """One per-layer file as a pyarrow table (``columns`` picks from its column names).

    Raises:
        RecordsError: it cannot be read (truncated, foreign bytes), naming it.
    """
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as file:  # lighter than pq.read_table for many small files
            names = file.schema_arrow.names
            return file.read(columns=columns(names) if columns else None)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise RecordsError(f"{path} cannot be read ({type(error).__name__})") from None


def split_per_layer(metrics: Mapping[str, float]) -> tuple[dict, dict[str, dict[str, float]]]:
    """``metrics`` -> (aggregate keys, ``{layer: {column: value}}``): a key
    ``<section>/<layer>/<q>`` (section in :data:`SECTIONS`, three parts or more) is per-layer,
    with column ``<section>/<q>`` (``width`` for ``lora/<layer>/width``)."""
    aggregates: dict[str, float] = {}
    per_layer: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        section, _, rest = key.partition("/")
        layer, _, name = rest.rpartition("/")
        if section not in SECTIONS or not layer:
            aggregates[key] = value
            continue
        column = WIDTH_KEY if (section, name) == ("lora", WIDTH_KEY) else f"{section}/{name}"
        per_layer.setdefault(layer, {})[column] = value
    return aggregates, per_layer


def _column_order(columns: Iterable[str]) -> list[str]:
    rank = {"feat": 0, "lora": 1, "gamma": 3}
    order = {q: i for i, q in enumerate(QUANTITIES)}
    return sorted(
        columns,
        key=lambda c: (rank.get(c.split("/")[0], 2), order.get(c.split("/")[-1], 99), c),
    )


def _to_table(rows: list[tuple[int, str, dict]]):
    """Buffered (step, layer, values) rows -> a pyarrow table in the schema above."""
    import pyarrow as pa

    names: dict[str, None] = {}
    for _, _, values in rows:
        names.update(dict.fromkeys(values))
    names.pop(WIDTH_KEY, None)
    widths = [values.get(WIDTH_KEY) for _, _, values in rows]
    columns = {
        name: [values.get(name) for _, _, values in rows]
        for name in names
        if not name.startswith("gamma/")
    }
    for name in [n for n in names if n.startswith("gamma/")]:
        # Keep a gamma value only where it is not the recomputed one (never, for the probe's).
        rms = columns.get("feat/" + name.split("/", 1)[1], [None] * len(rows))
        derived = gamma_values(
            [np.nan if v is None else v for v in rms], [0 if w is None else w for w in widths]
        )
        kept = [
            None if value is None or (width is not None and _same(value, again)) else value
            for value, again, width in zip((v.get(name) for *_, v in rows), derived, widths)
        ]
        if any(value is not None for value in kept):
            columns[name] = kept
    arrays = {
        "step": pa.array([step for step, _, _ in rows], pa.int32()),
        "layer": pa.array([layer for _, layer, _ in rows], pa.string()),
        "width": pa.array(widths, pa.int32()),
    }
    for name in _column_order(columns):
        # A stored gamma is one that could not be recomputed: keep it in full precision.
        dtype = pa.float64() if name.startswith("gamma/") else pa.float32()
        arrays[name] = pa.array(columns[name], dtype, from_pandas=False)
    return pa.table(arrays)


def _same(value: float, recomputed: float) -> bool:
    return value == recomputed or (np.isnan(value) and np.isnan(recomputed))


def _write_atomic(table, path: Path) -> None:
    import pyarrow.parquet as pq

    floats = [name for name in table.column_names if name not in INDEX_COLUMNS]
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            compression_level=9,
            use_dictionary=["layer", "width"],
            column_encoding={name: "BYTE_STREAM_SPLIT" for name in floats},
        )
    os.replace(tmp, path)


def layer_files(run_dir: Path) -> list[Path]:
    """The run's per-layer files, in write order: ``layers.parquet``, then the parts."""
    run_dir = Path(run_dir)
    merged = [run_dir / LAYERS_FILE] if (run_dir / LAYERS_FILE).exists() else []
    parts_dir = run_dir / PARTS_DIR
    parts = sorted(parts_dir.glob("steps-*.parquet")) if parts_dir.is_dir() else []
    return merged + parts


def read_layer_table(run_dir: Path, select: Callable[[str], bool] | None = None):
    """The run's per-layer rows as one pyarrow table (None when it has none), one row per
    (step, layer) (the last written wins), sorted by step then write order. ``select``: keep
    only the value columns it is true for (the index columns are always read).

    Raises:
        RecordsError: a file cannot be read (one line naming it).
    """
    import pyarrow as pa

    def wanted(names: list[str]) -> list[str]:
        return [c for c in names if c in INDEX_COLUMNS or select is None or select(c)]

    tables = [_read_file(path, wanted) for path in layer_files(run_dir)]
    if not tables:
        return None
    if len(tables) == 1:
        return tables[0]
    table = pa.concat_tables(tables, promote_options="default")
    frame = table.select(["step", "layer"]).to_pandas()
    keep = ~frame.duplicated(["step", "layer"], keep="last").to_numpy()
    order = np.argsort(frame["step"].to_numpy()[keep], kind="stable")
    return table.filter(pa.array(keep)).take(pa.array(order))


def read_layers(run_dir: Path, select: Callable[[str], bool] | None = None):
    """The run's per-layer rows as a wide pandas frame (see the module docstring; nulls become
    NaN), or an empty frame. Add the gamma columns with :func:`with_gamma`."""
    import pandas as pd

    table = read_layer_table(run_dir, select)
    return pd.DataFrame(columns=list(INDEX_COLUMNS)) if table is None else table.to_pandas()


def with_gamma(frame):
    """``frame`` (from :func:`read_layers`) with a ``gamma/<q>`` column for every
    ``feat/<q>``: the probe's per-layer gamma, recomputed from the RMS and the width (or the
    stored value, for rows whose gamma was not derivable)."""
    frame = frame.copy()
    for column in [c for c in frame.columns if c.startswith("feat/")]:
        name = "gamma/" + column.split("/", 1)[1]
        derived = gamma_values(frame[column].to_numpy(np.float64), frame["width"].to_numpy())
        if name in frame:
            derived = np.where(frame[name].isna(), derived, frame[name].to_numpy(np.float64))
        frame[name] = derived
    return frame


def per_layer_metrics(table) -> dict[int, dict[str, float]]:
    """A table from :func:`read_layer_table` -> ``{step: {per-layer key: value}}``, the keys
    and values the probe returned (gamma recomputed), so a round trip loses nothing."""
    rows = table.to_pylist()
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        layer, width = row.pop("layer"), row.pop("width")
        metrics = out.setdefault(row.pop("step"), {})
        if width is not None:
            metrics[f"lora/{layer}/{WIDTH_KEY}"] = float(width)
        for column, value in row.items():
            section, name = column.split("/", 1)
            if value is not None:
                metrics[f"{section}/{layer}/{name}"] = value
            if section == "feat" and value is not None and width is not None:
                gamma_key = f"gamma/{layer}/{name}"
                if row.get(f"gamma/{name}") is None:
                    metrics[gamma_key] = float(gamma_values(value, width))
    return out


class LayerRecords:
    """Buffers a run's per-layer rows and writes them as parquet parts (module docstring).

    Args:
        run_dir: the run directory.
        enabled: False (ranks other than 0) makes every method a no-op.
        max_buffered_rows: flush on its own past this many rows (a run without checkpoints
            still holds a bounded buffer; an extra part is as safe as any other).
    """

    def __init__(self, run_dir: Path, enabled: bool = True, max_buffered_rows: int = 20_000):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.max_buffered_rows = max_buffered_rows
        self.parts_dir = self.run_dir / PARTS_DIR
        self._rows: list[tuple[int, str, dict]] = []

    def append(self, step: int, per_layer: Mapping[str, Mapping[str, float]]) -> None:
        """Buffer one step's ``{layer: {column: value}}`` (from :func:`split_per_layer`)."""
        if not self.enabled:
            return
        self._rows.extend((step, layer, dict(values)) for layer, values in per_layer.items())
        if len(self._rows) >= self.max_buffered_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as a new part (atomically); nothing when none is buffered."""
        if not self.enabled or not self._rows:
            return
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        first, last = self._rows[0][0], self._rows[-1][0]
        path = self.parts_dir / f"steps-{first:08d}-{last:08d}.parquet"
        _write_atomic(_to_table(self._rows), path)
        self._rows = []

    def close(self) -> None:
        """Flush, then merge ``layers.parquet`` and the parts into ``layers.parquet`` (unless
        one cannot be read: the files stay as they are, and the next reader names it)."""
        self.flush()
        if not self.enabled or not self.parts_dir.is_dir():
            return
        try:
            table = read_layer_table(self.run_dir)
        except RecordsError:  # a damaged file: left as it is, for the next reader to name
            return
        if table is not None:
            _write_atomic(table, self.run_dir / LAYERS_FILE)
        shutil.rmtree(self.parts_dir)

    def truncate_after(self, step: int) -> None:
        """On resume: drop the rows of steps after ``step`` (buffered and written; every file
        for a fresh start, ``step < 0``).

        A file that cannot be read is removed with a warning when it holds only later steps
        (a part named after them: its rows are dropped anyway); otherwise it holds rows the
        checkpoint stands on, which nothing can rebuild, and the resume stops.

        Raises:
            RecordsError: an unreadable file with rows up to ``step`` (one line: what to do).
        """
        if not self.enabled:
            return
        import pyarrow.compute as pc

        self._rows = [row for row in self._rows if row[0] <= step]
        for path in layer_files(self.run_dir):
            if step < 0:
                path.unlink()
                continue
            try:
                table = _read_file(path)
            except RecordsError as error:
                first = _first_step(path)
                if first is not None and first > step:
                    print(
                        f"stablelora: {error}; it holds steps after the checkpoint's ({step}) "
                        "only, which are logged again: removed it.",
                        file=sys.stderr,
                        flush=True,
                    )
                    path.unlink()
                    continue
                raise RecordsError(
                    f"{error}: it holds per-layer records up to the checkpoint (step {step}), "
                    "which cannot be rebuilt; restore it, delete it to resume without them, or "
                    "rerun with trainer.resume=false to start this run over."
                ) from None
            kept = table.filter(pc.less_equal(table["step"], step))
            if kept.num_rows == 0:
                path.unlink()
            elif kept.num_rows < table.num_rows:
                _write_atomic(kept, path)


def wandb_per_layer(per_layer: Mapping[str, Mapping[str, float]], bins: int = 32) -> dict:
    """One step's ``{layer: {column: value}}`` as W&B values that keep its UI fast: a
    ``per_layer/table`` (a row per layer, every column) and, for each gamma and norm column, a
    ``per_layer/<column>`` histogram over the layers (finite values only), instead of one
    chart per layer and quantity."""
    import wandb

    names = _column_order({name for values in per_layer.values() for name in values} - {WIDTH_KEY})
    rows = [[layer, v.get(WIDTH_KEY), *map(v.get, names)] for layer, v in per_layer.items()]
    payload: dict[str, Any] = {
        "per_layer/table": wandb.Table(columns=["layer", WIDTH_KEY, *names], data=rows)
    }
    for name in names:
        if name.startswith("gamma/") or name in ("lora/norm_A", "lora/norm_B"):
            values = np.array([v.get(name, np.nan) for v in per_layer.values()], dtype=np.float64)
            values = values[np.isfinite(values)]
            if values.size:
                payload[f"per_layer/{name}"] = wandb.Histogram(values.tolist(), num_bins=bins)
    return payload
