"""Per-example evaluation records (stablelora.records.examples, ``examples.parquet``): what a
task reports per example, the file's round trip, and exactly-once rows across a resume."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from helpers import (
    SMOKE,
    Interrupted,
    ScriptedGenerator,
    compose_config,
    task_config,
    train_killed_at_batch,
)
from tiny import byte_llama

from stablelora.config.groups import group_option
from stablelora.records.examples import (
    EXAMPLES_FILE,
    ExampleRecords,
    example_id,
    read_examples,
    unique_ids,
)
from stablelora.records.rows import read_jsonl
from stablelora.runner.train import train
from stablelora.tasks import build_task

pytestmark = pytest.mark.usefixtures("hub_offline")


def rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "eval_set": "a" if i % 2 else "b",
            "example_id": f"id{i}",
            "gold": i % 3,
            "pred": (i + offset) % 3,
            "pred_norm": 0,
            "correct": (i + offset) % 3 == i % 3,
            "loglik": [-1.5 * i, -0.25, float(offset)],
        }
        for i in range(n)
    ]


def test_records_round_trip_and_each_step_is_kept_once(tmp_path):
    records = ExampleRecords(tmp_path)
    records.write(0, rows(5))
    records.write(10, rows(5, offset=1))
    records.write(10, rows(5, offset=2))  # the same step again (a redone evaluation) replaces
    records.write(20, [{"eval_set": "g", "example_id": "x", "correct": True}])  # maths: nulls
    frame = read_examples(tmp_path)
    assert frame.groupby("step").size().to_dict() == {0: 5, 10: 5, 20: 1}
    at_10 = frame[frame["step"] == 10].reset_index(drop=True)
    expected = pd.DataFrame(rows(5, offset=2))
    for column in ("eval_set", "example_id", "gold", "pred", "correct"):
        assert at_10[column].tolist() == expected[column].tolist(), column
    assert [list(v) for v in at_10["loglik"]] == expected["loglik"].tolist()  # float64: exact
    maths = frame[frame["step"] == 20].iloc[0]
    assert maths["loglik"] is None and pd.isna(maths["gold"]) and maths["correct"]
    records.truncate_after(10)  # a resume from step 10's checkpoint
    assert sorted(set(read_examples(tmp_path)["step"])) == [0, 10]
    records.truncate_after(-1)  # a fresh start
    assert not (tmp_path / EXAMPLES_FILE).exists() and read_examples(tmp_path).empty
    ExampleRecords(tmp_path, enabled=False).write(0, rows(2))  # other ranks write nothing
    assert not (tmp_path / EXAMPLES_FILE).exists()


def test_ids_are_content_hashes_and_repeats_are_numbered():
    assert example_id("q", ["a", "b"], 1) == example_id("q", ["a", "b"], 1)
    assert example_id("q", ["a", "b"], 1) != example_id("q", ["a", "b"], 0)
    assert unique_ids(["x", "y", "x", "x"]) == ["x", "y", "x~1", "x~2"]


def test_loglik_evaluation_reports_every_example(tok):
    cfg = group_option("task", "bbc_news")
    task = build_task(cfg, tok, seed=0)
    metrics = task.evaluate(byte_llama(), batch_size=16, max_examples=12)
    examples = task.last_examples
    assert len(examples) == 12 and {row["eval_set"] for row in examples} == {"bbc_news"}
    assert sum(row["correct"] for row in examples) / 12 == pytest.approx(metrics["acc"])
    assert sum(r["pred_norm"] == r["gold"] for r in examples) / 12 == pytest.approx(
        metrics["acc_norm"]
    )
    for row in examples:
        assert len(row["loglik"]) == 5 and all(math.isfinite(v) for v in row["loglik"])
        assert row["pred"] == max(range(5), key=row["loglik"].__getitem__)
    # the same examples have the same ids in another build, for another seed
    other = build_task(cfg, tok, seed=3)
    other.evaluate(byte_llama(), batch_size=16, max_examples=12)
    assert [r["example_id"] for r in other.last_examples] == [r["example_id"] for r in examples]
    assert len({r["example_id"] for r in examples}) == 12


def test_generate_evaluation_reports_the_extracted_choice(tok):
    cfg = task_config("arc_easy", protocol="generate", prompt_format="llm_adapters")
    task = build_task({**cfg, "max_new_tokens": 64}, tok, seed=0)
    model = ScriptedGenerator(tok, "\n                the correct answer is answer2.")
    metrics = task.evaluate(model, batch_size=2)
    assert [row["pred"] for row in task.last_examples] == [1, 1, 1]
    assert [row["correct"] for row in task.last_examples] == [
        r["gold"] == 1 for r in task.last_examples
    ]
    assert sum(row["correct"] for row in task.last_examples) / 3 == metrics["acc"]
    silent = ScriptedGenerator(tok, "I do not know.")
    task.evaluate(silent, batch_size=2)
    assert [row["pred"] for row in task.last_examples] == [None] * 3


def test_resumed_run_records_every_evaluation_once_like_an_uninterrupted_one(tmp_path, monkeypatch):
    cfg = compose_config(
        SMOKE
        + [
            "trainer.max_steps=8",
            "trainer.checkpoint_every=4",
            "trainer.eval_every=3",
            "model.config.num_hidden_layers=1",
            "probe=off",
        ]
    )
    train(cfg, tmp_path / "uninterrupted")
    with pytest.raises(Interrupted):
        train_killed_at_batch(cfg, tmp_path / "resumed", 8, monkeypatch)  # after step 6's eval
    partial = read_examples(tmp_path / "resumed")
    assert sorted(set(partial["step"])) == [0, 3, 6]  # step 6 was evaluated, not checkpointed
    assert train(cfg, tmp_path / "resumed")["status"] == "completed"

    first, again = read_examples(tmp_path / "uninterrupted"), read_examples(tmp_path / "resumed")
    assert first.groupby("step").size().to_dict() == {0: 8, 3: 8, 6: 8, 8: 8}
    pd.testing.assert_frame_equal(first, again)
    # the final rows are the final metrics
    final = first[first["step"] == 8]
    summary_acc = [r for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if "eval/acc" in r]
    assert [r["step"] for r in summary_acc] == [0, 3, 6, 8]
    assert final["correct"].mean() == pytest.approx(summary_acc[-1]["eval/acc"])
    assert torch.tensor(final["pred"].to_numpy()).ge(0).all()
