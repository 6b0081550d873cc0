"""LoRA+ (Hayou et al. 2024): AdamW with every B factor, and every 1-D tensor, at
``loraplus_lr_ratio * lr``, grouped by peft's own ``create_loraplus_optimizer``;
:func:`loraplus_optimizer` groups Stable-LoRA's parameters that way too (``stable_lora`` with
a ``loraplus_lr_ratio``)."""

from __future__ import annotations

import torch

from stablelora.optim.registry import AdamWSettings, register_optimizer


def check_loraplus_lr_ratio(loraplus_lr_ratio, required: bool = True) -> None:
    """Raise a one-line ValueError unless the ratio is a positive number (or, when not
    ``required``, None)."""
    ratio = loraplus_lr_ratio
    if ratio is None and not required:
        return
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise ValueError(
            f"loraplus_lr_ratio must be a positive number (lr of B / lr of A), got "
            f"{ratio!r}; the LoRA+ paper suggests 16."
        )


def loraplus_optimizer(
    model,
    optimizer_cls: type[torch.optim.Optimizer],
    adamw: AdamWSettings,
    loraplus_lr_ratio,
    **optimizer_kwargs,
) -> torch.optim.Optimizer:
    """``optimizer_cls`` over peft's LoRA+ grouping (B factors and 1-D tensors at
    ``ratio * lr``), with ``adamw.weight_decay`` as LoRA+'s weight decay."""
    from peft.optimizers import create_loraplus_optimizer

    check_loraplus_lr_ratio(loraplus_lr_ratio)
    kwargs = adamw.kwargs()
    return create_loraplus_optimizer(
        model,
        optimizer_cls,
        loraplus_lr_ratio=float(loraplus_lr_ratio),
        loraplus_weight_decay=kwargs.pop("weight_decay"),
        **kwargs,
        **optimizer_kwargs,
    )


@register_optimizer("loraplus", check=lambda options: check_loraplus_lr_ratio(**options))
def _build_loraplus(model, pairs, adamw: AdamWSettings, *, loraplus_lr_ratio=16.0):
    return loraplus_optimizer(model, torch.optim.AdamW, adamw, loraplus_lr_ratio)
