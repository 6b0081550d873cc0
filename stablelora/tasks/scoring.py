"""Tokenization of (prompt, answer) pairs, training batches, loglik scoring and generation."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from stablelora.runner.folder import check_stop
from stablelora.runner.lm_head import IGNORE_INDEX, split_causal_lm


class PairEncoder:
    """Tokenizes (context, continuation) pairs the way lm-evaluation-harness does.

    The continuation's tokens are the tail of the tokenization of ``context + continuation``
    after the tokens of ``context`` alone, so that they are exactly the tokens the model sees
    in the full text; trailing whitespace of the context is moved to the continuation first.
    Special tokens the tokenizer puts before a text (a BOS) are kept separately in
    ``prefix_ids`` so that left truncation never drops them.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        with_special = tokenizer("a").input_ids
        plain = tokenizer("a", add_special_tokens=False).input_ids
        start = next(
            (i for i in range(len(with_special)) if with_special[i : i + len(plain)] == plain), 0
        )
        self.prefix_ids: list[int] = list(with_special[:start])
        self.eos_id: int | None = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else (self.eos_id or 0)

    def body(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), both without special tokens."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.body(context + continuation)
        n_context = len(self.body(context))
        if n_context >= len(whole):  # a merge swallowed the continuation: encode it alone
            return whole, self.body(continuation)
        return whole[:n_context], whole[n_context:]

    def prompt(self, text: str, max_length: int) -> list[int]:
        """Generation prompt ids: no trailing whitespace, cut from the left to ``max_length``."""
        budget = max_length - len(self.prefix_ids)
        return self.prefix_ids + self.body(text.rstrip())[-budget:]

    def train_example(
        self, prompt: str, target: str, max_length: int
    ) -> tuple[list[int], list[int]]:
        """(input ids, labels) of one training sequence: loss on ``target`` plus EOS only.

        The prompt is cut from the left so that the answer is kept. Only when the answer (with
        EOS) is longer than half of ``max_length`` and the whole does not fit is the answer cut
        too, from the right: the prompt always keeps half of ``max_length`` (or all of itself).
        """
        context, answer = self.pair(prompt, target)
        if self.eos_id is not None:
            answer = answer + [self.eos_id]
        budget = max_length - len(self.prefix_ids)
        keep = min(len(context), max(budget - len(answer), budget // 2))
        context, answer = context[len(context) - keep :], answer[: budget - keep]
        input_ids = self.prefix_ids + context + answer
        labels = [IGNORE_INDEX] * (len(self.prefix_ids) + len(context)) + answer
        return input_ids, labels

    def loglik_request(self, context: str, continuation: str, max_length: int):
        """(input ids, number of continuation tokens) of one loglik request, cut from the left
        of the context to ``max_length`` tokens (at least one context token is kept)."""
        context_ids, continuation_ids = self.pair(context, continuation)
        budget = max_length - len(self.prefix_ids)
        continuation_ids = continuation_ids[-(budget - 1) :]
        keep = max(budget - len(continuation_ids), 1)
        ids = self.prefix_ids + context_ids[-keep:] + continuation_ids
        return ids, len(continuation_ids)


def pad_right(sequences: Sequence[list[int]], pad_value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [pad_value] * (width - len(s)) for s in sequences])


def pad_left(sequences: Sequence[list[int]], pad_value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([[pad_value] * (width - len(s)) + s for s in sequences])


def collate_train(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-padded batch of (input ids, labels): ``input_ids``, ``attention_mask``, ``labels``."""
    input_ids = pad_right([ids for ids, _ in encoded], pad_id)
    attention_mask = pad_right([[1] * len(ids) for ids, _ in encoded], 0)
    labels = pad_right([labels for _, labels in encoded], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(encoded: Sequence[tuple[list[int], list[int]]]) -> dict:
    """The (input ids, labels) sequences end to end in one row, no padding: ``input_ids``,
    ``position_ids`` and ``labels``, each of shape (1, total tokens).

    ``position_ids`` restart at 0 with each sequence: transformers (5.x) reads the restarts as
    sequence boundaries and builds a block-diagonal causal mask (``masking_utils.
    find_packed_sequence_indices``; only without a 2-D ``attention_mask`` and without a cache,
    so there is none here and the forward must not make one: ``use_cache=False``). Each
    sequence's first label is -100: the last token of a sequence never predicts the next
    sequence's first token. The labelled next tokens are those of :func:`collate_train`'s
    batch, so the mean cross-entropy over them is the same loss.
    """
    input_ids: list[int] = []
    positions: list[int] = []
    labels: list[int] = []
    for ids, seq_labels in encoded:
        input_ids += ids
        positions += range(len(ids))
        labels += [IGNORE_INDEX, *seq_labels[1:]] if seq_labels else []
    return {
        "input_ids": torch.tensor([input_ids]),
        "position_ids": torch.tensor([positions]),
        "labels": torch.tensor([labels]),
    }


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def loglikelihoods(
    model,
    requests: Sequence[tuple[list[int], int]],
    *,
    batch_size: int,
    pad_id: int,
    head: str = "used",
) -> list[float]:
    """Sum of log-probs of the last ``n`` tokens of each ``(ids, n)`` given the tokens before.

    As in lm-evaluation-harness, the model reads ``ids[:-1]`` (the last token is only ever a
    target), and requests with the same ``ids[:-1]`` share one forward pass: the choices of a
    question that differ only in their last token (single-token choices, ``answer1``...) cost
    one sequence, not one each. Sequences are sorted longest first (the first batch shows the
    peak memory, and each batch holds sequences of similar length: little padding) and run
    ``batch_size`` at a time, right-padded, so the sums do not depend on the requests' order.
    With ``head="used"`` (a model :mod:`stablelora.runner.lm_head` can split, every request with a
    context and a continuation) each distinct context runs once for all its continuations
    (:func:`_shared_context_loglikelihoods`) and the LM head and log-softmax run only at the
    continuation positions; ``"all"`` (or a model it cannot split) is the plain path above.
    Returns the sums in the order of ``requests``.
    """
    device = model_device(model)
    parts = split_causal_lm(model) if head == "used" else None
    if parts is not None and all(0 < n < len(ids) for ids, n in requests):
        return _shared_context_loglikelihoods(parts, requests, batch_size, pad_id, device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, _) in enumerate(requests):
        groups.setdefault(tuple(ids[:-1]), []).append(i)
    inputs = sorted(groups, key=len, reverse=True)
    sums = [0.0] * len(requests)
    for start in range(0, len(inputs), batch_size):
        check_stop()  # a stop signal ends the evaluation within one batch
        batch = inputs[start : start + batch_size]
        input_ids = pad_right([list(ids) for ids in batch], pad_id).to(device)
        attention_mask = pad_right([[1] * len(ids) for ids in batch], 0).to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        for row, inp in enumerate(batch):
            for i in groups[inp]:
                ids, n_continuation = requests[i]
                # logits at position t predict token t + 1
                positions = slice(len(inp) - n_continuation, len(inp))
                log_probs = logits[row, positions].float().log_softmax(-1)
                targets = torch.tensor(ids[-n_continuation:], device=device)
                sums[i] = log_probs.gather(-1, targets[:, None]).sum().item()
    return sums


def _cache_keyword(body) -> str:
    """The name of the KV-cache argument of ``body.forward``: ``cache`` (transformers 5) or
    ``past_key_values`` (4.x)."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def _shared_context_loglikelihoods(parts, requests, batch_size, pad_id, device) -> list[float]:
    """:func:`loglikelihoods` with each distinct context computed once.

    The choices of a question share its context (ARC: 4-5 continuations of a few tokens
    after ~60 context tokens). The contexts run ``batch_size`` at a time (right-padded, longest
    first) with a KV cache; the head at each context's last position scores every
    continuation's first token; the cache is then repeated once per continuation and the
    continuations' remaining tokens run on it (their pad tokens and the contexts' padding
    masked, positions continuing each context), the head only at their positions.
    """
    keyword = _cache_keyword(parts.body)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, n) in enumerate(requests):
        groups.setdefault(tuple(ids[:-n]), []).append(i)
    contexts = sorted(groups, key=len, reverse=True)
    sums = [0.0] * len(requests)
    for start in range(0, len(contexts), batch_size):
        check_stop()  # a stop signal ends the evaluation within one batch
        batch = contexts[start : start + batch_size]
        lengths = torch.tensor([len(c) for c in batch], device=device)
        context_ids = pad_right([list(c) for c in batch], pad_id).to(device)
        context_mask = pad_right([[1] * len(c) for c in batch], 0).to(device)
        out = parts.body(input_ids=context_ids, attention_mask=context_mask, use_cache=True)
        cache = getattr(out, keyword)
        last = out.last_hidden_state[torch.arange(len(batch), device=device), lengths - 1]
        first = parts.head(last).float().log_softmax(-1)  # (contexts, vocab)
        rows = [(b, i) for b, context in enumerate(batch) for i in groups[context]]
        continuations = [requests[i][0][-requests[i][1] :] for _, i in rows]
        for (b, i), continuation in zip(rows, continuations):
            sums[i] = first[b, continuation[0]].item()
        tails = [(r, c[:-1]) for r, c in enumerate(continuations) if len(c) > 1]
        if not tails:
            continue
        owners = torch.tensor([rows[r][0] for r, _ in tails], device=device)
        cache.reorder_cache(owners)  # one copy of its context per continuation
        width = max(len(t) for _, t in tails)
        tail_ids = pad_right([t for _, t in tails], pad_id).to(device)
        tail_mask = pad_right([[1] * len(t) for _, t in tails], 0).to(device)
        positions = lengths[owners][:, None] + torch.arange(width, device=device)
        hidden = parts.body(
            input_ids=tail_ids,
            attention_mask=torch.cat([context_mask[owners], tail_mask], dim=1),
            position_ids=positions,
            use_cache=True,
            **{keyword: cache},
        ).last_hidden_state
        used = tail_mask.bool()
        log_probs = parts.head(hidden[used]).float().log_softmax(-1)
        targets = torch.tensor([tok for r, _ in tails for tok in continuations[r][1:]])
        picked = log_probs.gather(-1, targets[:, None].to(device))[:, 0]
        for (r, _), values in zip(tails, picked.split([len(t) for _, t in tails])):
            sums[rows[r][1]] += values.sum().item()
    return sums


def generate_greedy(
    model,
    prompts: Sequence[list[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int | None,
) -> list[list[int]]:
    """Greedy continuations (new token ids, cut at EOS) of left-padded, batched prompts."""
    from transformers import GenerationConfig

    # A fresh config so that sampling defaults shipped with a checkpoint do not apply.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    device = model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        check_stop()  # a stop signal ends the evaluation within one batch
        batch = [prompts[i] for i in order[start : start + batch_size]]
        input_ids = pad_left(batch, pad_id).to(device)
        attention_mask = pad_left([[1] * len(p) for p in batch], 0).to(device)
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config
        )
        for row, new_ids in enumerate(sequences[:, input_ids.shape[1] :].tolist()):
            if eos_id is not None and eos_id in new_ids:
                new_ids = new_ids[: new_ids.index(eos_id)]
            outputs[order[start + row]] = new_ids
    return outputs


def label_nll(
    model,
    encoded: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int,
    pad_id: int,
    head: str = "used",
) -> tuple[float, int]:
    """(total negative log-likelihood, number of tokens) of the labelled tokens (labels other
    than -100) of ``(input ids, labels)`` sequences whose labelled tokens are their tail (a
    context labelled -100, then the answer), through :func:`loglikelihoods`.

    The token-weighted mean loss is ``total / tokens`` (every labelled token counts once,
    whatever sequence it is in).
    """
    requests = []
    for ids, labels in encoded:
        n = sum(label != IGNORE_INDEX for label in labels)
        if any(label != IGNORE_INDEX for label in labels[: len(labels) - n]):
            raise ValueError("label_nll needs the labelled tokens at the end of each sequence")
        if n:  # a sequence without labelled tokens adds nothing
            requests.append((ids, n))
    sums = loglikelihoods(model, requests, batch_size=batch_size, pad_id=pad_id, head=head)
    return -sum(sums), sum(n for _, n in requests)
