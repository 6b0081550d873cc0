"""The held-out validation split (stablelora.tasks.data.holdout_mask and its users).

A dataset without a validation split (the offline ARC copies, BBC News) gets one from its train
split, chosen by content hash: deterministic, disjoint from what trains, the same whatever
``max_train_examples`` and the seed, and the dataset's own validation split when it has one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stablelora.config.groups import group_option
from stablelora.tasks import build_task
from stablelora.tasks.data import (
    HOLDOUT_MAX_ROWS,
    HOLDOUT_PERCENT,
    holdout_mask,
    row_hash,
)

pytestmark = pytest.mark.usefixtures("hub_offline")


def arc_row(i: int) -> dict:
    return {
        "id": f"Q{i}",
        "question": f"Which number comes after {i}?",
        "choices": {"text": [str(i + 1), str(i + 2), str(i - 1)], "label": ["A", "B", "C"]},
        "answerKey": "A",
    }


def write_arc(folder: Path, n: int, *, splits=("train", "test")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        offset = 0 if split == "train" else 10_000 if split == "test" else 20_000
        rows = [arc_row(offset + i) for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def arc_config(data_dir: Path, **overrides) -> dict:
    return {**group_option("task", "arc_easy"), "data_dir": str(data_dir), **overrides}


def queries(examples) -> set[str]:
    return {ex.query for ex in examples}


def train_queries(task) -> set[str]:
    return {prompt for prompt, _ in task.train_pairs}


def test_holdout_mask_is_ten_percent_by_hash_capped_and_order_free():
    keys = [row_hash(arc_row(i)) for i in range(2000)]
    mask = holdout_mask(keys)
    assert abs(sum(mask) - 2000 * HOLDOUT_PERCENT / 100) < 60  # ~200 of 2000
    chosen = {k for k, m in zip(keys, mask) if m}
    assert chosen == {k for k, m in zip(keys[::-1], holdout_mask(keys[::-1])) if m}
    assert max(chosen) < min(k for k, m in zip(keys, mask) if not m)  # the lowest hashes
    many = [row_hash(arc_row(i)) for i in range(8000)]
    capped = holdout_mask(many)
    assert sum(capped) == HOLDOUT_MAX_ROWS
    assert sorted(k for k, m in zip(many, capped) if m) == sorted(many)[:HOLDOUT_MAX_ROWS]
    assert row_hash({"a": 1, "b": [2]}) == row_hash({"b": [2], "a": 1})


def test_validation_is_held_out_of_train_deterministic_and_stable(tok, tmp_path):
    data = write_arc(tmp_path / "arc", 400)
    val = build_task(arc_config(data, eval_split="validation"), tok, seed=0)
    (val_examples,) = val.eval_sets.values()
    assert 20 <= len(val_examples) <= 70
    assert not queries(val_examples) & train_queries(val)
    assert val.num_train_examples + len(val_examples) == 400
    # the same rows for every seed and training subsample, in the same order
    for seed, limit in ((1, None), (0, 50), (3, 50)):
        other = build_task(
            arc_config(data, eval_split="validation", max_train_examples=limit), tok, seed=seed
        )
        assert list(other.eval_sets.values())[0] == val_examples
        assert not queries(val_examples) & train_queries(other)
        if limit:
            assert other.num_train_examples == limit
    # final runs (scored on test) train on exactly the selection runs' data
    final = build_task(arc_config(data, holdout_validation=True), tok, seed=0)
    assert final.train_pairs == val.train_pairs
    assert queries(list(final.eval_sets.values())[0]) == {
        f"Question: Which number comes after {10_000 + i}?\nAnswer:" for i in range(400)
    }
    # without the flag the test-scored task trains on the whole train split, as before
    assert build_task(arc_config(data), tok, seed=0).num_train_examples == 400


def test_an_official_validation_split_is_kept(tok, tmp_path):
    data = write_arc(tmp_path / "arc", 60, splits=("train", "validation", "test"))
    task = build_task(arc_config(data, eval_split="validation"), tok, seed=0)
    assert task.num_train_examples == 60
    assert len(list(task.eval_sets.values())[0]) == 60


def test_too_small_a_train_split_is_a_clear_error(tok, tmp_path):
    data = write_arc(tmp_path / "arc", 3)
    with pytest.raises(ValueError, match="too small to hold one out") as error:
        build_task(arc_config(data, eval_split="validation"), tok, seed=0)
    assert "\n" not in str(error.value)


def test_bbc_news_validation_is_disjoint_from_train_and_test(tok):
    cfg = {**group_option("task", "bbc_news"), "max_eval_examples": None}
    test = build_task(cfg, tok, seed=0)
    val = build_task({**cfg, "eval_split": "validation"}, tok, seed=0)
    (tests,), (vals,) = test.eval_sets.values(), val.eval_sets.values()
    assert 150 <= len(vals) <= 250
    assert not queries(vals) & train_queries(val)
    # Split on the article body: no text on two sides, and what the validation run trains on
    # is what the test run trains on minus the validation slice and its copies.
    assert not queries(vals) & queries(tests) and not queries(tests) & train_queries(test)
    assert train_queries(val) < train_queries(test)
    final = build_task({**cfg, "holdout_validation": True}, tok, seed=0)
    assert final.train_pairs == val.train_pairs and final.eval_sets == test.eval_sets


def test_bbc_news_legacy_rule_is_kept_for_recorded_runs(tok):
    """Runs recorded before task.split_rule read as legacy and load what they trained on."""
    cfg = {**group_option("task", "bbc_news"), "max_eval_examples": None, "split_rule": "legacy"}
    test = build_task(cfg, tok, seed=0)
    val = build_task({**cfg, "eval_split": "validation"}, tok, seed=0)
    (tests,), (vals,) = test.eval_sets.values(), val.eval_sets.values()
    assert len(tests) == 218 and not queries(vals) & train_queries(val)
    # The corpus repeats some articles under two file names; the file-hash test split
    # therefore shares texts with train (what the content rule fixes).
    assert queries(tests) & train_queries(test)
    assert queries(vals) & queries(tests) <= train_queries(test) & queries(tests)
    assert val.num_train_examples + len(vals) == test.num_train_examples


def test_no_validation_row_in_any_training_batch(tmp_path, monkeypatch):
    """A real run (two epochs of the training subsample) draws train rows only, and its
    per-example records are the validation examples."""
    from helpers import SMOKE, compose_config

    import stablelora.tasks as tasks
    from stablelora.records.examples import example_id, read_examples, unique_ids
    from stablelora.runner.train import train

    built, drawn = [], []
    original = tasks.build_task

    def recording_build(*args, **kwargs):
        task = original(*args, **kwargs)
        collate = task.collate

        def recording_collate(indices):
            drawn.extend(task.train_pairs[i][0] for i in indices)
            return collate(indices)

        task.collate = recording_collate
        built.append(task)
        return task

    monkeypatch.setattr(tasks, "build_task", recording_build)
    overrides = ["task.eval_split=validation", "task.max_train_examples=32", "probe=off",
                 "trainer.max_steps=16", "trainer.batch_size=4", "trainer.max_eval_examples=null",
                 "model.config.num_hidden_layers=1"]  # fmt: skip
    assert train(compose_config(SMOKE + overrides), tmp_path)["status"] == "completed"
    (task,) = built
    (vals,) = task.eval_sets.values()
    assert len(drawn) == 64 and set(drawn) == train_queries(task)  # every train row, twice
    assert not set(drawn) & queries(vals)
    final = read_examples(tmp_path).query("step == 16")
    ids = unique_ids([example_id(e.query, e.choices, e.gold) for e in vals])  # repeats: ~1
    assert final["example_id"].tolist() == ids


def test_merged_mixture_of_arc_and_bbc_news_scores_validation(tok, tmp_path):
    from helpers import compose_config

    easy, challenge = write_arc(tmp_path / "arc_easy", 200), write_arc(tmp_path / "ac", 150)
    overrides = [
        "scale=smoke",
        "task=arc_bbc",
        f"task.subtasks.arc_easy.data_dir={easy}",
        f"task.subtasks.arc_challenge.data_dir={challenge}",
        "task.max_train_examples=null",
    ]
    cfg = compose_config([*overrides, "task.eval_split=validation"]).task
    val = build_task(cfg, tok, seed=0)
    assert set(val.eval_sets) == {"arc_easy", "arc_challenge", "bbc_news"}
    for examples in val.eval_sets.values():
        assert examples and not queries(examples) & train_queries(val)
    final = build_task(
        compose_config([*overrides, "task.holdout_validation=true"]).task, tok, seed=0
    )
    assert final.train_pairs == val.train_pairs
    assert {name: len(ex) for name, ex in final.eval_sets.items()} == {
        "arc_easy": 200,
        "arc_challenge": 150,
        "bbc_news": len(bbc_news_tests(tok)),
    }


def bbc_news_tests(tok):
    cfg = {**group_option("task", "bbc_news"), "max_eval_examples": None}
    return build_task(cfg, tok, seed=0).eval_sets["bbc_news"]
