"""The LM head only where its output is used: label positions in training, continuation
positions in log-likelihood scoring.

A causal LM computes ``logits = head(body(ids))`` at every position, but the training loss
reads only the positions whose next token carries a label (2 of ~38 tokens of a BBC News
example, a larger share on ARC-Easy), and a choice's score only its continuation's
positions. On SmolLM2-135M the head (49,152 x 576) and its log-softmax are a large share of a
step (measured: results/README.md, "Step speed"; ``benchmarks/step_speed.py``), so running them
on the used rows alone saves most of it, with the same loss and gradients: the rows a
position's logits depend on are exactly the ones kept.

:func:`split_causal_lm` finds the body and the head of the model families whose logits are
the plain ``head(last_hidden_state)`` (no soft-capping or scaling, no loss term added by the
adapter); anything else returns None and callers use the full forward, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF's loss) skips
#: ``config.model_type`` of the families whose logits are ``lm_head(last_hidden_state)``
#: and whose loss is the standard shifted cross-entropy (transformers' ``ForCausalLMLoss``).
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "olmo", "olmo2"}
)
#: Where the LM head runs: ``used`` (label / continuation positions only) or ``all``.
HEAD_MODES = ("used", "all")


@dataclass(frozen=True)
class CausalLMParts:
    """The body (input ids -> ``last_hidden_state`` (batch, seq, d)) and head (d -> vocab)."""

    body: nn.Module
    head: nn.Module


def split_causal_lm(model: nn.Module) -> CausalLMParts | None:
    """Body and head of a (peft-wrapped) causal LM whose logits are ``head(hidden)``; None
    for any other model (a toy network, logit soft-capping, AdaLoRA's loss term...)."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None:
        if any(getattr(c, "peft_type", None) != "LORA" for c in peft_config.values()):
            return None  # AdaLoRA adds an orthogonality penalty inside its forward
        model = cast(nn.Module, model.get_base_model())  # type: ignore[operator]
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if not isinstance(body, nn.Module) or not isinstance(head, nn.Module) or body is model:
        return None
    return CausalLMParts(body, head)


def hidden_states(parts: CausalLMParts, input_ids, attention_mask, position_ids=None):
    """The body's last hidden states, (batch, seq, d); ``position_ids`` only for packed rows
    (:func:`stablelora.tasks.scoring.collate_packed`)."""
    extra = {} if position_ids is None else {"position_ids": position_ids}
    return parts.body(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra
    ).last_hidden_state


class CausalLMLoss(nn.Module):
    """``forward(input_ids, attention_mask, labels) -> loss``: the mean cross-entropy of every
    labelled next token (labels -100 are skipped), as transformers' ``model(...).loss``.

    With ``head="used"`` and a model :func:`split_causal_lm` splits, the head and the
    cross-entropy run only at the positions whose next token is labelled; otherwise (or for
    batches without ``labels``: toy regression tasks) the model's own forward computes the
    loss. The training loop calls (and DDP wraps) this module instead of the model, so the
    parameters, hooks and gradients are the model's own. A packed batch (``position_ids``, no
    ``attention_mask``: ``trainer.packing``) runs without a KV cache on both paths, since
    transformers builds the block-diagonal mask only without one.
    """

    def __init__(self, model: nn.Module, head: str = "used"):
        super().__init__()
        if head not in HEAD_MODES:
            raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
        self.model = model
        self.parts = split_causal_lm(model) if head == "used" else None

    def forward(self, **batch) -> torch.Tensor:
        labels = batch.get("labels")
        if (
            self.parts is None
            or labels is None
            or set(batch) - {"input_ids", "attention_mask", "labels", "position_ids"}
        ):
            if "position_ids" in batch:
                return self.model(**batch, use_cache=False).loss
            return self.model(**batch).loss
        hidden = hidden_states(
            self.parts, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids")
        )
        targets = labels[:, 1:]
        used = targets != IGNORE_INDEX  # position t predicts token t + 1
        logits = self.parts.head(hidden[:, :-1][used]).float()
        return F.cross_entropy(logits, targets[used])
