"""A tiny tokenizer and model for tests: built in memory, offline, in well under a second."""

from __future__ import annotations

import functools

PAD, EOS = "<pad>", "<eos>"


@functools.cache
def byte_tokenizer():
    """A byte-level tokenizer with no merges: one token per UTF-8 byte, ids 0/1 = pad/EOS.

    It round-trips any text (including runs of spaces and newlines), adds no BOS, and has
    258 tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS)


def tiny_llama(vocab_size: int = 258, seed: int = 0):
    """A random-init one-layer LlamaForCausalLM (hidden size 32) for ``byte_tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()
