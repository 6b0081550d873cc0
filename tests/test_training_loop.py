"""The runner's training loop in process: gradient accumulation, the data order across epochs,
which evaluation counts as the best, and the loop's state in checkpoints, on the tiny Llama
and the offline BBC News task."""

from __future__ import annotations

import pytest
import torch
from helpers import SMOKE, Interrupted, compose_config, rows_without_timing, train_killed_at_batch

from stablelora.records.rows import read_jsonl
from stablelora.runner.setup import batch_indices
from stablelora.runner.train import LoopState, train

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


def grouped_order(num_examples=50, seed=3, batch_size=4, pool_batches=4):
    from stablelora.runner.setup import TrainOrder

    lengths = [(i * 37) % 23 + 5 for i in range(num_examples)]
    order = TrainOrder(num_examples, seed, batch_size, pool_batches, length_of=lengths.__getitem__)
    return order, lengths


def test_length_grouped_batches_hold_similar_lengths_and_every_example_once_per_epoch():
    order, lengths = grouped_order(num_examples=48)  # 3 pools of 16: epochs align with pools
    epoch = order.indices(0, 48)
    assert sorted(epoch) == list(range(48))
    assert sorted(order.indices(48, 48)) == list(range(48)) and order.indices(48, 48) != epoch
    pool_size, shuffled = 16, []
    for pool in range(3):
        # The pool holds the plain stream's examples at those positions, regrouped.
        plain = batch_indices(48, 3, pool * pool_size, pool_size)
        grouped = epoch[pool * pool_size : (pool + 1) * pool_size]
        assert sorted(grouped) == sorted(plain)
        # Its batches are consecutive runs of the pool sorted by length, shuffled.
        ranked = sorted(plain, key=lambda i: (lengths[i], i))
        batches = [grouped[b : b + 4] for b in range(0, pool_size, 4)]
        runs = [ranked[b : b + 4] for b in range(0, pool_size, 4)]
        assert sorted(batches) == sorted(runs)
        shuffled.append(batches != runs)
    assert any(shuffled)  # the batches are not left in length order


def test_length_grouping_cuts_padding_and_is_a_pure_function_of_the_position():
    order, lengths = grouped_order(num_examples=200, batch_size=8, pool_batches=8)

    def padding(indices_of):
        total = padded = 0
        for step in range(25):
            widths = [lengths[i] for i in indices_of(step * 8)]
            total, padded = total + sum(widths), padded + max(widths) * len(widths)
        return 1 - total / padded

    grouped = padding(lambda position: order.indices(position, 8))
    plain = padding(lambda position: batch_indices(200, 3, position, 8))
    assert grouped < plain / 3
    # A resumed run (a fresh object, positions read out of order) reads the same batches.
    fresh, _ = grouped_order(num_examples=200, batch_size=8, pool_batches=8)
    assert [fresh.indices(p, 8) for p in (800, 8, 0)] == [order.indices(p, 8) for p in (800, 8, 0)]
    # Micro-batches (grad_accum, ranks) are slices of the step's batch.
    assert order.indices(16, 4) + order.indices(20, 4) == order.indices(16, 8)


def test_no_grouping_is_the_plain_shuffled_stream():
    from stablelora.runner.setup import TrainOrder

    for order in (TrainOrder(30, 1, 4), TrainOrder(30, 1, 4, 8, length_of=None)):
        assert order.indices(26, 8) == batch_indices(30, 1, 26, 8)


# ---------------------------------------------------------------------------- the loop's state
#: The keys of a checkpoint's ``state`` since checkpoints exist (the loop kept its state in a
#: dict with these keys before :class:`LoopState`); ``example_steps`` came last.
CHECKPOINT_STATE_KEYS = (
    "step", "initial", "best", "train_time", "wall_time", "attempts", "records",
    "example_steps", "status", "error", "loss", "eval_pending",
)  # fmt: skip


def test_the_loop_state_is_saved_with_the_keys_checkpoints_always_had():
    saved = LoopState(step=3, best={"eval/acc": 0.5, "step": 2}, loss=1.5).to_dict()
    assert tuple(saved) == CHECKPOINT_STATE_KEYS
    assert LoopState.from_dict(saved) == LoopState(step=3, best=saved["best"], loss=1.5)
    # A checkpoint from before example_steps: the field keeps its default.
    older = {k: v for k, v in saved.items() if k != "example_steps"}
    assert LoopState.from_dict(older).example_steps is None


@pytest.mark.parametrize("keys", ["all", "before example_steps"])
def test_a_checkpoint_whose_state_the_old_loop_wrote_resumes_to_the_same_run(
    tmp_path, monkeypatch, keys
):
    """The checkpoint's ``state`` rewritten as the dict loop wrote it before LoopState (every
    key literal, values from the checkpoint): the resumed run's rows equal an uninterrupted
    run's."""
    overrides = LOSS_ONLY + ["trainer.max_steps=4", "trainer.checkpoint_every=2"]
    train(compose_config(overrides), tmp_path / "uninterrupted")
    run_dir, cfg = tmp_path / "resumed", compose_config(overrides)
    with pytest.raises(Interrupted):
        train_killed_at_batch(cfg, run_dir, 4, monkeypatch)  # checkpointed at step 2
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    state = checkpoint["state"]
    old = {
        "step": state["step"],
        "initial": state["initial"],
        "best": state["best"],
        "train_time": state["train_time"],
        "wall_time": state["wall_time"],
        "attempts": state["attempts"],
        "records": state["records"],
        "status": state["status"],
        "error": state["error"],
        "loss": state["loss"],
        "eval_pending": state["eval_pending"],
    }
    if keys == "all":
        old["example_steps"] = state["example_steps"]
    torch.save({**checkpoint, "state": old}, run_dir / "checkpoint.pt")
    summary = train(cfg, run_dir)
    assert summary["status"] == "completed" and summary["attempts"] == 2
    assert rows_without_timing(run_dir) == rows_without_timing(tmp_path / "uninterrupted")
