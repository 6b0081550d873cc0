"""The LM head at the used positions only (stablelora/runner/lm_head.py): the same training loss and
gradients as transformers' full forward, the same loglik scores, on every model family the
project loads (Llama, Qwen2, GPT-2), and the full forward where a model cannot be split."""

from __future__ import annotations

import pytest
import torch
from helpers import SMOKE, compose_config
from tiny import tiny_llama

from stablelora import apply_lora
from stablelora.runner.lm_head import CausalLMLoss, split_causal_lm
from stablelora.tasks.scoring import IGNORE_INDEX, loglikelihoods

VOCAB = 300


def tiny_model(family: str) -> torch.nn.Module:
    """A random-init causal LM of ``family`` with rank-4 LoRA (B non-zero), in eval mode so
    that dropout cannot make two forwards differ."""
    torch.manual_seed(0)
    if family == "llama":
        base, targets = tiny_llama(vocab_size=VOCAB), ["q_proj", "v_proj"]
    elif family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        base, targets = Qwen2ForCausalLM(config), ["q_proj", "v_proj"]
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
            eos_token_id=1,
        )  # fmt: skip
        base, targets = GPT2LMHeadModel(config), ["c_attn"]
    model = apply_lora(base.eval(), rank=4, alpha=8, target_modules=targets)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded sequences of different lengths, labels on a tail of each (a prompt, then
    an answer) as the tasks' collate makes them."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (4, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    attention_mask[3, 5:] = 0
    labels = input_ids.clone()
    labels[:, :7] = IGNORE_INDEX
    labels[3, 3:5] = input_ids[3, 3:5]  # a short sequence's answer
    labels[attention_mask == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model, head: str, data: dict) -> tuple[float, torch.Tensor]:
    model.zero_grad()
    loss = CausalLMLoss(model, head=head)(**data)
    loss.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return loss.item(), torch.cat(grads)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_loss_and_gradients_at_label_positions_equal_the_full_forward(family):
    model = tiny_model(family)
    assert split_causal_lm(model) is not None
    data = batch()
    expected = model(**data).loss.item()  # transformers' own loss, every position
    full_loss, full_grads = loss_and_grads(model, "all", data)
    used_loss, used_grads = loss_and_grads(model, "used", data)
    assert full_loss == expected
    assert used_loss == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(used_grads, full_grads, rtol=1e-6, atol=1e-7 * full_grads.abs().max())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_loglik_scores_at_continuation_positions_equal_the_full_forward(family):
    model = tiny_model(family)
    ids = batch(1)["input_ids"].tolist()
    # Continuations of 1-4 tokens, requests sharing ids[:-1] and requests sharing a context
    # (ids[0][:8]) with continuations of 1 and 3 tokens, sequences of different lengths in one
    # padded batch.
    requests = [(ids[0][:9], 1), (ids[1][:12], 3), (ids[2][:6], 2), (ids[0][:8] + [7], 1)]
    requests += [(ids[3][:10], 4), (ids[0][:8] + [9], 2), (ids[0][:8] + [5, 6, 7], 3)]
    # The definition, one unpadded sequence at a time: log-softmax of the logits at position
    # t, read at token t + 1, summed over the continuation.
    expected = []
    with torch.no_grad():
        for ids_, n in requests:
            logits = model(input_ids=torch.tensor([ids_[:-1]])).logits[0].log_softmax(-1)
            targets = torch.tensor(ids_[-n:])
            expected.append(logits[-n:].gather(-1, targets[:, None]).sum().item())
    with torch.no_grad():
        full = loglikelihoods(model, requests, batch_size=2, pad_id=0, head="all")
        used = loglikelihoods(model, requests, batch_size=2, pad_id=0, head="used")
    assert full == pytest.approx(expected, rel=1e-5)
    assert used == pytest.approx(expected, rel=1e-5)


def test_a_real_training_batch_gives_the_same_loss_and_gradients(one_thread):
    """The smoke run's model and a BBC News batch from the task's own collate."""
    from stablelora.config.check import plain_config
    from stablelora.lora import adapter_arguments
    from stablelora.models import load_model
    from stablelora.tasks import build_task

    cfg = compose_config(SMOKE)
    model, tokenizer = load_model(cfg.model)
    model = apply_lora(model.eval(), **adapter_arguments(plain_config(cfg.adapter), 10))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    task = build_task(cfg.task, tokenizer, seed=0)
    data = task.collate(list(range(8)))
    assert (data["labels"] != IGNORE_INDEX).float().mean() < 0.2  # few label positions
    full_loss, full_grads = loss_and_grads(model, "all", data)
    used_loss, used_grads = loss_and_grads(model, "used", data)
    assert used_loss == pytest.approx(full_loss, rel=1e-6)
    assert torch.allclose(used_grads, full_grads, rtol=1e-6, atol=1e-7 * full_grads.abs().max())


def test_models_that_cannot_be_split_use_the_full_forward():
    from stablelora.toy import build_toy_model

    # AdaLoRA adds its orthogonality penalty inside the model's forward.
    adalora = apply_lora(
        tiny_llama(),
        rank=4,
        alpha=8,
        target_modules=["q_proj", "v_proj"],
        adapter="adalora",
        adalora={"total_step": 10},
    )
    assert split_causal_lm(adalora) is None
    assert split_causal_lm(build_toy_model(8, 2, 0, 4, 2)) is None
    # A family outside the list (its logits may be soft-capped or scaled).
    model = tiny_model("llama")
    model.get_base_model().config.model_type = "gemma2"
    assert split_causal_lm(model) is None
    data = batch()
    assert CausalLMLoss(model)(**data).item() == model(**data).loss.item()


def test_an_unknown_head_mode_is_a_config_error():
    from stablelora.config.check import check_config
    from stablelora.config.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.lm_head must be one of"):
        check_config(compose_config([*SMOKE, "trainer.lm_head=some"]))
