"""Per-layer run records: layers.parquet round-trips the probe's values, resumes, stays small."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from helpers import (
    Interrupted,
    compose_config,
    probed_train_steps,
    read_wandb_records,
    toy_lora,
    train_killed_at_batch,
)

from stablelora import create_optimizer, find_lora_pairs
from stablelora.probes.gamma import FeatureProbe
from stablelora.records.layers import (
    LAYERS_FILE,
    PARTS_DIR,
    LayerRecords,
    per_layer_metrics,
    read_layer_table,
    split_per_layer,
)
from stablelora.records.rows import read_jsonl

#: Bytes per logged step (a row of metrics.jsonl) of the smoke run's local records, W&B
#: folder excluded: 4 LoRA layers, measured about 1.4 KB. With the per-layer values back in
#: metrics.jsonl as JSON text it is about 4 KB.
SMOKE_BYTES_PER_LOGGED_STEP = 2_500
#: W&B history bytes of the smoke run: per logged step for the aggregates (measured about
#: 460 B; with the per-layer values logged as scalars every step, about 4 KB), and per
#: per-layer log (its table and histograms: measured about 8.3 KB, whatever the layer count).
SMOKE_WANDB_BYTES_PER_LOGGED_STEP = 1_000
SMOKE_WANDB_BYTES_PER_LAYER_LOG = 12_000


def probe_metrics(steps: int = 4) -> list[dict[str, float]]:
    """The probe's metrics (per-layer keys included) over ``steps`` Stable-LoRA steps."""
    model, task = toy_lora()
    optimizer = create_optimizer(
        model, method="stable_lora", lr=1e-2, shrink_ratio=0.1, stop_rule="steps:2"
    )
    probe = FeatureProbe(model, find_lora_pairs(model), first_steps=steps)
    return probed_train_steps(model, task, optimizer, probe, steps)


def per_layer_only(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if split_per_layer({k: v})[1]}


def same(a: dict, b: dict) -> bool:
    """Equal dicts, NaN equal to NaN, values compared exactly."""
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a
    )


def test_probe_values_round_trip_exactly(tmp_path):
    rows = probe_metrics()
    assert any("lora/" in k and k.endswith("/stop_step") for k in rows[-1]), (
        "a layer stopped shrinking"
    )
    store = LayerRecords(tmp_path)
    for step, metrics in enumerate(rows, start=1):
        aggregates, per_layer = split_per_layer(metrics)
        assert not any(k.count("/") > 1 for k in aggregates)
        store.append(step, per_layer)
        if step == 2:
            store.flush()
    assert len(list((tmp_path / PARTS_DIR).glob("*.parquet"))) == 1
    store.close()
    assert (tmp_path / LAYERS_FILE).exists() and not (tmp_path / PARTS_DIR).exists()
    table = read_layer_table(tmp_path)
    assert "gamma/delta1" not in table.column_names  # recomputed, not stored
    assert str(table.schema.field("feat/delta1").type) == "float"  # float32
    stored = per_layer_metrics(table)
    assert sorted(stored) == [1, 2, 3, 4]
    for step, metrics in enumerate(rows, start=1):
        assert same(stored[step], per_layer_only(metrics)), step


def test_nan_missing_keys_and_underivable_gamma_round_trip(tmp_path):
    rows = {
        1: {
            "a": {
                "width": 8.0,
                "feat/delta1": 0.0,
                "feat/gAZ": math.nan,
                "gamma/delta1": -math.inf,
                "gamma/gAZ": math.nan,
                "lora/norm_A": 1.5,
            }
        },
        # b: no width (gamma kept as written); a: a gamma that is not log(rms)/log(n)
        2: {
            "a": {"width": 8.0, "feat/delta1": 0.5, "gamma/delta1": 0.25, "lora/stop_step": 2.0},
            "b": {"feat/delta1": 0.5, "gamma/delta1": -0.333},
        },
    }
    store = LayerRecords(tmp_path)
    for step, per_layer in rows.items():
        store.append(step, per_layer)
    store.close()
    stored = per_layer_metrics(read_layer_table(tmp_path))

    def key(layer: str, column: str) -> str:
        section, name = ("lora", "width") if column == "width" else column.split("/")
        return f"{section}/{layer}/{name}"

    expected = {
        step: {key(layer, c): v for layer, values in per_layer.items() for c, v in values.items()}
        for step, per_layer in rows.items()
    }
    for step in rows:
        assert same(stored[step], expected[step]), (stored[step], expected[step])


def write_steps(store: LayerRecords, steps) -> None:
    for step in steps:
        store.append(step, {"q": {"width": 4.0, "feat/dY": float(step)}})


def steps_on_disk(run_dir: Path) -> list[int]:
    table = read_layer_table(run_dir)
    return [] if table is None else table["step"].to_pylist()


def test_truncate_after_drops_buffered_flushed_and_merged_rows(tmp_path):
    store = LayerRecords(tmp_path)
    write_steps(store, [1, 2, 3])
    store.flush()
    write_steps(store, [4, 5, 6])
    store.flush()
    write_steps(store, [7])  # buffered only
    store.truncate_after(4)  # a part rewritten, a part removed, the buffer cut
    assert steps_on_disk(tmp_path) == [1, 2, 3, 4]
    write_steps(store, [5, 6])
    store.close()
    assert steps_on_disk(tmp_path) == [1, 2, 3, 4, 5, 6]
    LayerRecords(tmp_path).truncate_after(2)  # on the merged file
    assert steps_on_disk(tmp_path) == [1, 2]


def test_a_full_buffer_flushes_on_its_own(tmp_path):
    store = LayerRecords(tmp_path, max_buffered_rows=2)
    write_steps(store, [1])
    assert not (tmp_path / PARTS_DIR).exists()
    write_steps(store, [2, 3])
    assert steps_on_disk(tmp_path) == [1, 2]  # step 3 is still buffered
    store.close()
    assert steps_on_disk(tmp_path) == [1, 2, 3]


def test_readers_keep_one_row_when_a_merge_was_cut_short(tmp_path):
    store = LayerRecords(tmp_path)
    write_steps(store, [1, 2])
    store.flush()
    parts = list((tmp_path / PARTS_DIR).iterdir())
    store.close()
    # A crash between writing layers.parquet and removing the parts leaves both.
    (tmp_path / PARTS_DIR).mkdir()
    shutil.copy(tmp_path / LAYERS_FILE, parts[0])
    assert steps_on_disk(tmp_path) == [1, 2]


def test_recorder_routes_per_layer_keys_to_the_layer_file(tmp_path):
    from omegaconf import OmegaConf

    from stablelora.records.recorder import RunRecorder

    logger = OmegaConf.create(
        {
            "mode": "disabled",
            "project": "p",
            "entity": None,
            "group": None,
            "tags": [],
            "per_layer_every": 1,
        }
    )
    recorder = RunRecorder(tmp_path, {}, logger, "run")
    rows = probe_metrics(steps=3)
    for step, metrics in enumerate(rows, start=1):
        recorder.log(step, metrics)
    recorder.flush()
    recorder.keep_rows(2, step=2)  # a checkpoint at step 2 had seen 2 rows
    recorder.log(3, rows[2])
    recorder.finish()
    logged = read_jsonl(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in logged] == [1, 2, 3]
    assert all(key.count("/") == 1 for row in logged for key in row if key != "step")
    assert "feat/delta1" in logged[0] and "gamma/delta1" in logged[0]
    stored = per_layer_metrics(read_layer_table(tmp_path))
    for step, metrics in enumerate(rows, start=1):
        assert same(stored[step], per_layer_only(metrics))


# ---------------------------------------------------------------------------- the runner
def run_with_layers(overrides, run_dir, **kill):
    from stablelora.runner.train import train

    cfg = compose_config(overrides)
    if kill:
        return train_killed_at_batch(cfg, run_dir, kill["batch"], kill["monkeypatch"])
    return train(cfg, run_dir)


#: 8 steps, every one probed, a checkpoint at step 4.
PROBED_8 = [
    "experiment=tiny_run",
    "logger.mode=disabled",
    "trainer.max_steps=8",
    "trainer.checkpoint_every=4",
    "probe.first_steps=8",
]


@pytest.fixture(scope="module")
def uninterrupted_probed_run(tmp_path_factory):
    """The uninterrupted run of :data:`PROBED_8` (read only by the tests that share it)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_with_layers(PROBED_8, run_dir)
    return run_dir


@pytest.mark.parametrize("hard_kill", [False, True])
def test_resumed_run_has_the_layer_records_of_an_uninterrupted_one(
    tmp_path, monkeypatch, hard_kill, uninterrupted_probed_run
):
    overrides = PROBED_8
    with monkeypatch.context() as patch:
        if hard_kill:  # a SIGKILL: the buffered rows (step 5) are lost, the flushed part stays
            patch.setattr(LayerRecords, "close", lambda self: None)
        with pytest.raises(Interrupted):
            run_with_layers(overrides, tmp_path / "resumed", batch=6, monkeypatch=monkeypatch)
    assert steps_on_disk(tmp_path / "resumed")[-1] == (4 if hard_kill else 5)
    run_with_layers(overrides, tmp_path / "resumed")
    first = per_layer_metrics(read_layer_table(uninterrupted_probed_run))
    second = per_layer_metrics(read_layer_table(tmp_path / "resumed"))
    assert sorted(first) == sorted(second) == list(range(1, 9))
    for step in first:
        assert same(first[step], second[step]), step
    assert not (tmp_path / "resumed" / PARTS_DIR).exists()


def test_smoke_run_records_stay_small(tmp_path):
    """Bytes per logged step of the smoke run's records (a regression shows here)."""
    run_with_layers(
        ["experiment=tiny_run", "logger.mode=offline", "logger.per_layer_every=3"], tmp_path
    )
    logged_steps = len(read_jsonl(tmp_path / "metrics.jsonl"))
    local = sum(
        path.stat().st_size
        for path in tmp_path.rglob("*")
        if path.is_file()
        and not {"adapter", "wandb", ".hydra"} & set(path.parts)
        and path.name != "checkpoint.pt"
    )
    assert local / logged_steps < SMOKE_BYTES_PER_LOGGED_STEP, (local, logged_steps)
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    history = [r for r in records if r.WhichOneof("record_type") == "history"]
    keys = {item.key or item.nested_key[0] for r in history for item in r.history.item}
    assert "per_layer/table" in keys and "per_layer/gamma/delta1" in keys
    assert not any(key.count("/") > 1 and not key.startswith("per_layer/") for key in keys)
    sizes = {"aggregates": 0, "per_layer": 0}
    for item in (item for r in history for item in r.history.item):
        per_layer = (item.key or item.nested_key[0]).startswith("per_layer/")
        sizes["per_layer" if per_layer else "aggregates"] += item.ByteSize()
    assert sizes["aggregates"] / logged_steps < SMOKE_WANDB_BYTES_PER_LOGGED_STEP, sizes
    assert sizes["per_layer"] / 2 < SMOKE_WANDB_BYTES_PER_LAYER_LOG, sizes  # steps 3 and 6
    tables = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/**/*.json"))
    assert len(tables) == 2  # steps 3 and 6
    assert json.loads(tables[0].read_text())["columns"][:3] == ["layer", "width", "feat/delta1"]


@pytest.mark.parametrize("per_layer_probes", [False, True])
def test_analysis_reads_the_same_history_from_both_layouts(tmp_path, per_layer_probes):
    from omegaconf import OmegaConf

    from analysis.collect import collect
    from stablelora.records.console import _finite_or_none
    from stablelora.records.recorder import RunRecorder

    rows = probe_metrics(steps=3)
    # The earlier layout: every key in metrics.jsonl (non-finite values as null), no width.
    legacy = tmp_path / "legacy" / "run"
    legacy.mkdir(parents=True)
    lines = [
        {"step": step, **{k: _finite_or_none(v) for k, v in m.items() if "/width" not in k}}
        for step, m in enumerate(rows, start=1)
    ]
    (legacy / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    logger = OmegaConf.create({"mode": "disabled"})
    recorder = RunRecorder(tmp_path / "current" / "run", {}, logger, "run")
    for step, metrics in enumerate(rows, start=1):
        recorder.log(step, metrics)
    recorder.finish()

    def history(root):
        frame = collect(root, per_layer_probes=per_layer_probes).history
        frame = frame.astype({"key": str}).drop(columns="run_id")
        return frame.sort_values(["key", "step"]).reset_index(drop=True)

    old, new = history(tmp_path / "legacy"), history(tmp_path / "current")
    assert any(key.startswith("lora/") and key.count("/") == 2 for key in new["key"])
    assert any(key.startswith("gamma/") and key.count("/") == 2 for key in new["key"]) == (
        per_layer_probes
    )
    assert old.equals(new)


def test_with_gamma_keeps_a_stored_gamma_and_recomputes_the_missing_ones():
    import numpy as np
    import pandas as pd

    from stablelora.records.layers import with_gamma

    frame = pd.DataFrame(
        {
            "step": [1, 2],
            "layer": ["a", "a"],
            "width": [64, 64],
            "feat/dY": [8.0, 8.0],
            "gamma/dY": [np.nan, 0.25],  # row 2: a stored value the RMS does not give
        }
    )
    gamma = with_gamma(frame)["gamma/dY"].to_numpy()
    assert gamma[0] == pytest.approx(0.5)  # log 8 / log 64, recomputed where none is stored
    assert gamma[1] == 0.25
