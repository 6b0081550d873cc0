"""Reviewer controls for Stable-LoRA: plain optimizers that isolate one of its effects.

``adamw_large_wd``: AdamW with a large decoupled weight decay on the LoRA A factors (or on A
and B), the normal weight decay on everything else. Shrinking A by ``1 - lambda`` every step
is, for a while, a weight decay of ``lambda / lr`` on A alone; this control asks whether a
plain large weight decay (with no stop rule) does the same.
"""

from __future__ import annotations

import torch

from stablelora.optim.registry import AdamWSettings, register_optimizer

LARGE_WD_TARGETS = ("A", "AB")


def large_weight_decay_groups(
    model: torch.nn.Module,
    pairs,
    *,
    large_wd_on: str,
    large_weight_decay: float,
    weight_decay: float,
) -> list[dict]:
    """AdamW parameter groups: the chosen LoRA factors at ``large_weight_decay``, the rest at
    ``weight_decay``. Every trainable parameter is in exactly one group; each group carries a
    ``"name"`` for logging.
    """
    check_large_weight_decay(large_wd_on, large_weight_decay)
    decayed = {id(pair.A) for pair in pairs}
    if large_wd_on == "AB":
        decayed |= {id(pair.B) for pair in pairs}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {
            "name": f"lora_{large_wd_on} (large weight decay)",
            "params": [p for p in trainable if id(p) in decayed],
            "weight_decay": float(large_weight_decay),
        },
        {
            "name": "other",
            "params": [p for p in trainable if id(p) not in decayed],
            "weight_decay": float(weight_decay),
        },
    ]


def check_large_weight_decay(large_wd_on: str, large_weight_decay: float) -> None:
    """Raise a one-line ValueError for an unknown target or a negative weight decay."""
    if large_wd_on not in LARGE_WD_TARGETS:
        raise ValueError(
            f"large_wd_on must be 'A' (LoRA A factors only) or 'AB' (A and B), got {large_wd_on!r}."
        )
    number = isinstance(large_weight_decay, (int, float)) and not isinstance(
        large_weight_decay, bool
    )
    if not (number and large_weight_decay >= 0):
        raise ValueError(f"large_weight_decay must be >= 0, got {large_weight_decay!r}.")


@register_optimizer("adamw_large_wd", check=lambda options: check_large_weight_decay(**options))
def _build_adamw_large_wd(
    model, pairs, adamw: AdamWSettings, *, large_wd_on="A", large_weight_decay=0.1
):
    groups = large_weight_decay_groups(
        model,
        pairs,
        large_wd_on=large_wd_on,
        large_weight_decay=large_weight_decay,
        weight_decay=adamw.weight_decay,
    )
    groups = [group for group in groups if group["params"]]  # AdamW rejects empty groups
    return torch.optim.AdamW(groups, **adamw.kwargs())
