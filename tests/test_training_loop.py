"""The runner's training loop in process: gradient accumulation, the data order across epochs
and which evaluation counts as the best, on the tiny Llama and the offline BBC News task."""

from __future__ import annotations

import pytest
from conftest import SMOKE, compose_config

from stablelora.records import read_jsonl
from stablelora.train import batch_indices, train

#: Three logged steps, no evaluation and no probe: only the training loss matters here.
LOSS_ONLY = SMOKE + [
    "trainer.max_steps=3",
    "trainer.log_every=1",
    "trainer.eval_before=false",
    "trainer.max_eval_examples=4",
    "trainer.checkpoint_every=0",
    "probe=off",
]


def logged_losses(run_dir) -> list[float]:
    return [
        row["train/loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row
    ]


def test_accumulated_micro_batches_log_the_loss_of_the_whole_batch(tmp_path, one_thread):
    # Every BBC News example has the same number of loss tokens (the topic word and EOS), so
    # two micro-batches of 2 must give the loss and the update of one batch of 4, step by step.
    whole = LOSS_ONLY + ["trainer.batch_size=4", "trainer.grad_accum=1"]
    accumulated = LOSS_ONLY + ["trainer.batch_size=2", "trainer.grad_accum=2"]
    train(compose_config(whole), tmp_path / "whole")
    train(compose_config(accumulated), tmp_path / "accumulated")
    expected, got = logged_losses(tmp_path / "whole"), logged_losses(tmp_path / "accumulated")
    assert len(expected) == 3
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_every_epoch_is_a_new_permutation(seed):
    examples = 12
    epochs = [batch_indices(examples, seed, epoch * examples, examples) for epoch in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(examples))
    assert epochs[1] != epochs[0] and epochs[2] not in (epochs[0], epochs[1])
    # A batch across the boundary takes the end of one epoch and the start of the next.
    assert batch_indices(examples, seed, examples - 2, 4) == epochs[0][-2:] + epochs[1][:2]
    # Another seed shuffles differently.
    assert batch_indices(examples, seed + 1, 0, examples) != epochs[0]


def test_ties_in_the_best_evaluation_go_to_the_earlier_step(tmp_path):
    # At lr = 1e-30 the float32 weights cannot move: every evaluation (steps 2 and 4, and the
    # final one at 6; step 0's is the initial, not a candidate) scores the same.
    overrides = SMOKE + [
        "method=lora",
        "optim.lr=1e-30",
        "trainer.eval_every=2",
        "probe=off",
        "trainer.checkpoint_every=0",
    ]
    summary = train(compose_config(overrides), tmp_path)
    assert summary["status"] == "completed"
    metric = summary["main_metric"]
    scores = {
        row["step"]: row[metric] for row in read_jsonl(tmp_path / "metrics.jsonl") if metric in row
    }
    assert sorted(scores) == [0, 2, 4, 6] and len(set(scores.values())) == 1
    assert summary["best"]["step"] == 2
