"""Packed training batches (``trainer.packing``): a step's examples end to end in one row, no
padding, and the check that the run's model really keeps them apart.

A packed row (:func:`stablelora.tasks.scoring.collate_packed`) carries no attention mask, only
``position_ids`` restarting at 0 per example; transformers 5 turns the restarts into a
block-diagonal causal mask for sdpa and eager attention (``masking_utils.
find_packed_sequence_indices``) and into variable-length kernels for flash-attention. Where
that does not happen (another attention implementation, a model whose mask builder ignores
``position_ids``, a forward that makes a KV cache) the model attends across examples and
trains on a silently wrong loss. So before the first step :func:`packing_problem` checks the
attention implementation and then runs a probe: two short random sequences, packed, must give
each sequence the logits it gets alone. The probe decides, not a table of model types: it
tests the very forward the loop runs, for any model, at the cost of three forward passes of a
dozen tokens. A run whose model fails it trains on padded batches (the same loss) and says so
in one line (:func:`stablelora.runner.train.training_loop`).
"""

from __future__ import annotations

import torch

#: ``config._attn_implementation`` values whose transformers kernels read packed positions.
PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2")
#: The probe's two sequences' lengths (tokens).
PROBE_LENGTHS = (5, 7)
#: The probe passes when the packed logits are within this share of the distance a mask
#: across the boundary puts them from each sequence's own (and within rounding of it).
PROBE_TOLERANCE = 1e-2


def attention_implementation(model: torch.nn.Module) -> str | None:
    """The transformers attention implementation of a (peft-wrapped) model; None for a model
    without one (a toy network)."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return getattr(getattr(base, "config", None), "_attn_implementation", None)


def packing_problem(model: torch.nn.Module, task) -> str | None:
    """Why ``model`` cannot train exactly on ``task``'s packed batches; None when it can."""
    if not callable(getattr(task, "collate_packed", None)):
        return f"task {getattr(task, 'name', task)!r} has no packed batches"
    attention = attention_implementation(model)
    if attention not in PACKED_ATTENTION:
        return (
            f"attention {attention!r} does not take packed positions "
            f"(packing needs one of {', '.join(PACKED_ATTENTION)})"
        )
    return probe_problem(model)


def probe_problem(model: torch.nn.Module) -> str | None:
    """Whether the model keeps packed sequences apart, measured: two random sequences packed
    in one row (``position_ids`` restarting, no mask, no cache) against each run alone, and
    against the row with an all-ones mask (positions restarting, attention crossing the
    boundary: what a mask builder that ignores the restarts gives). None when the packed
    logits equal the separate ones (within :data:`PROBE_TOLERANCE` of the crossing mask's
    distance, or rounding); else what was measured. Eval mode, no gradients, the global RNG
    untouched; every module's train/eval mode is restored."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings  # type: ignore[operator]
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, vocab, (n,), generator=generator) for n in PROBE_LENGTHS]
    ids = torch.cat(sequences)[None].to(device)
    positions = torch.cat([torch.arange(len(s)) for s in sequences])[None].to(device)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            alone = torch.cat(
                [model(input_ids=s[None].to(device), use_cache=False).logits[0] for s in sequences]
            ).float()
            packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
            crossing = model(
                input_ids=ids,
                position_ids=positions,
                attention_mask=torch.ones_like(ids),
                use_cache=False,
            ).logits[0]
    finally:
        for module, training in modes.items():
            module.training = training
    error = (packed.float() - alone).abs().max().item()
    crossing_error = (crossing.float() - alone).abs().max().item()
    rounding = 64 * torch.finfo(packed.dtype).eps * (1 + alone.abs().max().item())
    if error <= max(PROBE_TOLERANCE * crossing_error, rounding):
        return None
    return (
        f"the model attends across packed examples (probe: packed logits differ from separate "
        f"ones by {error:.3g}, a mask across the boundary by {crossing_error:.3g})"
    )
