"""Tiny random-init models for tests: built from a config, no download, a few ms per step."""

from __future__ import annotations

import torch

TINY_LLAMA = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random-init LlamaForCausalLM with GQA (k/v outputs narrower than q/o)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))
    return model.to(dtype)


def token_batches(
    steps: int, batch_size: int = 2, seq_len: int = 8, vocab: int = 64, seed: int = 1
):
    """Deterministic random token batches."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, vocab, (batch_size, seq_len), generator=generator) for _ in range(steps)
    ]
