"""Stable-LoRA on other LoRA variants: DoRA and AdaLoRA (Liu et al. 2024, arXiv 2402.09353; Zhang et al. 2023, arXiv 2303.10512)."""

from __future__ import annotations

import math

import torch
from helpers import compose_config
from tiny import LR, SHRINK, lora_model, stop_steps, token_batches
from tiny import train_steps as train

from stablelora import create_optimizer, find_lora_pairs
from stablelora.runner.train import train as run_training


def magnitudes(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "magnitude" in n}


def test_stable_dora_shrinks_A_only_and_stops_by_the_norm_rule():
    model = lora_model(dtype=torch.float32, use_dora=True)
    optimizer = create_optimizer(model, "stable_lora", lr=LR, shrink_ratio=SHRINK)
    pairs = find_lora_pairs(model)
    A_before, m_before = [p.A.detach().clone() for p in pairs], magnitudes(model)
    assert len(m_before) == len(pairs)
    optimizer.shrink_()
    for pair, A0 in zip(pairs, A_before):
        assert torch.equal(pair.A, A0 * (1 - SHRINK))
    for name, value in magnitudes(model).items():
        assert torch.equal(value, m_before[name]), "the magnitude vector must never shrink"

    batches = token_batches(160)
    losses = []
    for input_ids in batches:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    assert all(math.isfinite(x) for x in losses)
    stops = stop_steps(optimizer)
    assert all(step is not None for step in stops.values()), stops
    assert len(set(stops.values())) > 1  # each layer stops on its own norm test


def test_stable_dora_updates_every_trainable_tensor():
    model = lora_model(use_dora=True)
    optimizer = create_optimizer(model, "stable_lora", lr=LR, shrink_ratio=SHRINK)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(model, optimizer, token_batches(3))
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), name


def test_stable_adalora_trains_50_steps_and_allocates_ranks(tmp_path):
    cfg = compose_config(
        [
            "experiment=tiny_run",
            "logger.mode=disabled",
            "method=stable_adalora",
            "trainer.max_steps=50",
            "trainer.checkpoint_every=0",
            "trainer.log_every=10",
            "adapter.adalora.tinit=5",
            "adapter.adalora.tfinal=10",
            "adapter.adalora.deltaT=5",
            "adapter.adalora.init_r=8",
            "adapter.rank=4",
            "optimizer.shrink_ratio=0.01",
            "probe=off",
            "optim.lr=1e-3",
        ]
    )
    summary = run_training(cfg, tmp_path)
    assert summary["status"] == "completed", summary.get("error")
    assert math.isfinite(summary["train_loss_final"])
    stops = [layer["stop_step"] for layer in summary["shrink"].values()]
    assert stops and all(step is not None for step in stops), summary["shrink"]

    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    singular_values = [t for n, t in adapter.items() if "lora_E" in n]
    kept = sum(int(torch.count_nonzero(e)) for e in singular_values)
    # AdaLoRA pruned the budget from 8 to 4 ranks per layer on average.
    assert singular_values and kept <= 4 * len(singular_values) < 8 * len(singular_values)
