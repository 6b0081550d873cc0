"""Packed training batches (``trainer.packing``): a batch's examples end to end in one row,
``position_ids`` restarting per example, no padding. Exact: the per-example losses and the
LoRA gradients equal the padded batch's (tiny Llama and tiny Qwen2, sdpa and eager); a model
that would attend across examples is caught by the probe and the run trains on padded
batches, saying so in one line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import SMOKE, compose_config, rows_without_timing
from tiny import TARGETS, TINY_LLAMA

from stablelora.records.rows import read_jsonl
from stablelora.records.summary import read_summary
from stablelora.runner import packing
from stablelora.runner.lm_head import IGNORE_INDEX, CausalLMLoss
from stablelora.runner.train import train
from stablelora.tasks.scoring import collate_packed, collate_train

#: (prompt tokens, answer tokens) of the probe batch's examples: lengths 5 to 14, unequal.
SHAPES = [(6, 3), (2, 2), (9, 5), (4, 1), (3, 4)]
#: As tight as the golden losses (tests/test_golden.py: rel=1e-5); float32 throughout.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
#: Four logged steps of the smoke run (tiny Llama, BBC News, batch 4), no probe.
RUN = SMOKE + [
    "trainer.max_steps=4",
    "trainer.log_every=1",
    "trainer.eval_before=false",
    "trainer.max_eval_examples=4",
    "trainer.checkpoint_every=0",
    "probe=off",
]


def tiny_model(architecture: str, attention: str):
    """A random-init tiny Llama or Qwen2 (q/k/v biases) with rank-4 LoRA on the attention
    projections, its B factors random (at B = 0 the A factors get no gradient)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from stablelora import apply_lora

    torch.manual_seed(0)
    config = AutoConfig.for_model(architecture, **TINY_LLAMA, attn_implementation=attention)
    model = apply_lora(
        AutoModelForCausalLM.from_config(config), rank=4, alpha=8, target_modules=TARGETS
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def examples(vocab: int = 64) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) as a task encodes them: a prompt labelled -100, then the answer."""
    generator = torch.Generator().manual_seed(1)
    encoded = []
    for prompt, answer in SHAPES:
        ids = torch.randint(0, vocab, (prompt + answer,), generator=generator).tolist()
        encoded.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return encoded


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each row's labelled next tokens."""
    losses = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], reduction="none"
    )
    used = labels[:, 1:] != IGNORE_INDEX
    return (losses * used).sum(1) / used.sum(1)


def unpacked(tensor: torch.Tensor, lengths: list[int], pad: float = 0) -> torch.Tensor:
    """A packed row's (1, total, ...) tensor cut back into rows right-padded with ``pad``."""
    parts = list(tensor[0].split(lengths))
    return torch.nn.utils.rnn.pad_sequence(parts, batch_first=True, padding_value=pad)


def lora_gradients(model, batch: dict, head: str) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    CausalLMLoss(model, head=head)(**batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------- the layout
def test_a_packed_row_restarts_positions_and_masks_each_examples_first_label():
    encoded = examples()
    packed, padded = collate_packed(encoded), collate_train(encoded, pad_id=0)
    lengths = [len(ids) for ids, _ in encoded]
    assert set(packed) == {"input_ids", "position_ids", "labels"}  # no mask: transformers'
    assert packed["input_ids"].shape == (1, sum(lengths))  # packed detection needs none
    assert packed["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    assert packed["input_ids"][0].tolist() == [t for ids, _ in encoded for t in ids]
    starts = torch.tensor([0, *lengths]).cumsum(0)[:-1]
    assert (packed["labels"][0, starts] == IGNORE_INDEX).all()  # no loss across a boundary
    # The labelled next tokens are the padded batch's, in the same order.
    padded_targets = padded["labels"][:, 1:][padded["labels"][:, 1:] != IGNORE_INDEX]
    packed_targets = packed["labels"][0, 1:][packed["labels"][0, 1:] != IGNORE_INDEX]
    assert torch.equal(padded_targets, packed_targets)


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_packed_losses_and_lora_gradients_equal_the_padded_batchs(architecture, attention):
    model = tiny_model(architecture, attention)
    encoded = examples()
    lengths = [len(ids) for ids, _ in encoded]
    padded, packed = collate_train(encoded, pad_id=0), collate_packed(encoded)
    assert packing.probe_problem(model) is None
    with torch.no_grad():
        model.eval()
        reference = per_example_losses(model(**padded).logits, padded["labels"])
        labels = unpacked(packed["labels"], lengths, pad=IGNORE_INDEX)
        logits = model(**packed, use_cache=False).logits
        got = per_example_losses(unpacked(logits, lengths), labels)
        # What the test guards against: the same row attending across examples.
        crossing = model(**packed, attention_mask=torch.ones_like(packed["input_ids"])).logits
        wrong = per_example_losses(unpacked(crossing, lengths), labels)
    torch.testing.assert_close(got, reference, **TOLERANCE)
    # Every later example would move, far outside the tolerance (the first cannot).
    assert (wrong - reference).abs()[1:].min() > 1e-4
    model.train()
    for head in ("used", "all"):
        expected, found = lora_gradients(model, padded, head), lora_gradients(model, packed, head)
        assert all(g.abs().max() > 0 for g in expected.values())  # A and B both learn
        for name in expected:
            torch.testing.assert_close(found[name], expected[name], **TOLERANCE, msg=name)


@pytest.fixture(scope="module")
def padded_run(tmp_path_factory):
    """The :data:`RUN` on padded batches: its folder."""
    run_dir = tmp_path_factory.mktemp("padded")
    train(compose_config(RUN), run_dir)
    return run_dir


def train_losses(run_dir) -> list[float]:
    return [
        row["train/loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row
    ]


def test_a_packed_run_trains_as_the_padded_run(tmp_path, padded_run, capsys):
    summary = train(compose_config(RUN + ["trainer.packing=true"]), tmp_path)
    assert summary["packed_batches"] is True
    assert "trainer.packing" not in capsys.readouterr().out
    assert len(train_losses(tmp_path)) == 4
    assert train_losses(tmp_path) == pytest.approx(train_losses(padded_run), rel=1e-5)
    assert summary["final"] == pytest.approx(read_summary(padded_run)["final"], rel=1e-4)


# ---------------------------------------------------------------------------- the check
def test_a_mask_builder_that_ignores_position_ids_fails_the_probe(monkeypatch):
    from transformers import masking_utils

    model = tiny_model("llama", "sdpa")
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda positions: None)
    problem = packing.probe_problem(model)
    assert problem is not None and "attends across packed examples" in problem


def test_a_forward_that_keeps_a_cache_fails_the_probe():
    # transformers detects packing only without a cache: a forward that makes one (the
    # model's default use_cache=True) silently attends across the examples.
    model = tiny_model("qwen2", "sdpa")
    forward = model.forward
    model.forward = lambda *args, use_cache=None, **kwargs: forward(*args, **kwargs, use_cache=True)
    assert "attends across packed examples" in packing.probe_problem(model)


def test_an_attention_without_packed_positions_or_a_task_without_packed_batches_is_refused():
    model = tiny_model("llama", "sdpa")
    task = type("Task", (), {"collate_packed": lambda self, indices: {}})()
    assert packing.packing_problem(model, task) is None
    model.get_base_model().config._attn_implementation = "flex_attention"
    assert "attention 'flex_attention' does not take packed positions" in (
        packing.packing_problem(model, task)
    )
    toy_task = type("ToyTask", (), {"name": "toy"})()
    assert packing.packing_problem(model, toy_task) == "task 'toy' has no packed batches"


def test_a_model_that_fails_the_check_trains_on_padded_batches_saying_so_once(
    tmp_path, padded_run, monkeypatch, capsys
):
    import stablelora.runner.train as loop

    monkeypatch.setattr(loop, "packing_problem", lambda model, task: "a test's reason")
    summary = train(compose_config(RUN + ["trainer.packing=true"]), tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if "trainer.packing" in line]
    assert lines == [
        "[stablelora] trainer.packing: a test's reason; training on padded batches instead."
    ]
    assert summary["packed_batches"] is False
    assert rows_without_timing(tmp_path) == rows_without_timing(padded_run)


# ---------------------------------------------------------------------------- identity
def test_packing_off_keeps_every_run_folder_and_on_names_another():
    from stablelora.config.check import plain_config
    from stablelora.config.identity import config_hash

    config = plain_config(compose_config(SMOKE))
    assert config["trainer"]["packing"] is False
    before = {**config, "trainer": {k: v for k, v in config["trainer"].items() if k != "packing"}}
    assert config_hash(config) == config_hash(before)
    assert config_hash(plain_config(compose_config(SMOKE + ["trainer.packing=true"]))) != (
        config_hash(before)
    )
