"""The tiny models every test uses: built in memory from a config, no download, a few ms a step.

- :func:`tiny_llama`: a random-init Llama with GQA (vocabulary 64 by default; any
  ``LlamaConfig`` field can be overridden), with :func:`token_batches` as its data;
- :func:`byte_tokenizer` and :func:`byte_llama`: a byte-level tokenizer and the tiny Llama
  sized for it, for the tasks' tokenization and scoring;
- :func:`lora_model`, :func:`train_steps` and :func:`stop_steps`: the tiny Llama with LoRA
  on every attention projection, a plain training loop, and Stable-LoRA's stop steps.
"""

from __future__ import annotations

import functools

import torch

TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
#: LoRA targets, learning rate and shrink ratio of the optimizer tests on the tiny Llama.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LR, SHRINK = 5e-3, 1e-2
PAD, EOS = "<pad>", "<eos>"


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


def byte_llama(seed: int = 0):
    """:func:`tiny_llama` for :func:`byte_tokenizer`: one layer, 258 tokens, long positions,
    in eval mode."""
    return tiny_llama(
        seed,
        vocab_size=258,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    ).eval()


def lora_model(dtype=torch.float64, seed=0, **lora_options):
    """:func:`tiny_llama` with rank-4 LoRA on every attention projection."""
    from stablelora import apply_lora

    options = dict(rank=4, alpha=8, target_modules=TARGETS)
    return apply_lora(tiny_llama(seed=seed, dtype=dtype), **{**options, **lora_options})


def train_steps(model, optimizer, batches):
    """One optimizer step per batch of token ids (language-modelling loss on the batch)."""
    for input_ids in batches:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        for p in model.parameters():
            p.grad = None


def stop_steps(optimizer):
    """``{layer: step it stopped shrinking, or None}`` of a Stable-LoRA optimizer."""
    return {name: state["stop_step"] for name, state in optimizer.shrink_state().items()}
