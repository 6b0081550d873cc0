"""Optimizers for LoRA fine-tuning and the :func:`create_optimizer` factory.

One module per optimizer idea; this file only maps a method name to a builder. A builder
receives the model, its LoRA pairs and the keyword options, and returns a
``torch.optim.Optimizer`` over *every* trainable parameter (never dropping a classifier head
or a bias).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from stablelora.optim.pairs import LoRAPair, find_lora_pairs
from stablelora.optim.stable_lora import StableLoRA, StopRule, check_shrink_ratio

__all__ = [
    "OPTIMIZERS",
    "LoRAPair",
    "StableLoRA",
    "StopRule",
    "create_optimizer",
    "find_lora_pairs",
    "register_optimizer",
]

Builder = Callable[..., torch.optim.Optimizer]
OPTIMIZERS: dict[str, Builder] = {}


def register_optimizer(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make ``create_optimizer(model, method=name, ...)`` call the builder."""

    def register(builder: Builder) -> Builder:
        OPTIMIZERS[name] = builder
        return builder

    return register


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _adamw_kwargs(betas, eps, foreach, fused) -> dict:
    return {"betas": tuple(betas), "eps": eps, "foreach": foreach, "fused": fused}


def _loraplus_groups(model, optimizer_cls, lr, weight_decay, loraplus_lr_ratio, **kwargs):
    """peft's LoRA+ grouping (B factors and 1-D tensors at ``ratio * lr``), with our wd."""
    from peft.optimizers import create_loraplus_optimizer

    if loraplus_lr_ratio is None or loraplus_lr_ratio <= 0:
        raise ValueError(
            f"loraplus_lr_ratio must be a positive number (lr of B / lr of A), got "
            f"{loraplus_lr_ratio!r}; the LoRA+ paper suggests 16."
        )
    return create_loraplus_optimizer(
        model, optimizer_cls, lr=lr, loraplus_lr_ratio=float(loraplus_lr_ratio),
        loraplus_weight_decay=weight_decay, **kwargs,
    )  # fmt: skip


@register_optimizer("lora")
def _build_adamw(model, pairs, *, lr, weight_decay, betas, eps, foreach, fused, **unused):
    return torch.optim.AdamW(
        _trainable(model), lr=lr, weight_decay=weight_decay,
        **_adamw_kwargs(betas, eps, foreach, fused),
    )  # fmt: skip


@register_optimizer("rslora")
def _build_rslora(model, pairs, **options):
    config = getattr(model, "peft_config", {}).get("default")
    if config is not None and not getattr(config, "use_rslora", False):
        warnings.warn(
            "method='rslora' on a model without rsLoRA scaling: build the model with "
            "apply_lora(..., scaling='rslora') so that s = alpha/sqrt(r).",
            stacklevel=3,
        )
    return _build_adamw(model, pairs, **options)


@register_optimizer("loraplus")
def _build_loraplus(model, pairs, *, lr, weight_decay, betas, eps, foreach, fused,
                    loraplus_lr_ratio=16.0, **unused):  # fmt: skip
    return _loraplus_groups(
        model, torch.optim.AdamW, lr, weight_decay, loraplus_lr_ratio,
        **_adamw_kwargs(betas, eps, foreach, fused),
    )  # fmt: skip


@register_optimizer("stable_lora")
def _build_stable_lora(model, pairs, *, lr, weight_decay, betas, eps, foreach, fused,
                       shrink_ratio=5e-4, stop_rule="norm", loraplus_lr_ratio=None,
                       **unused):  # fmt: skip
    stable = {"lora_pairs": pairs, "shrink_ratio": shrink_ratio, "stop_rule": stop_rule}
    adamw = _adamw_kwargs(betas, eps, foreach, fused)
    if loraplus_lr_ratio is not None:
        return _loraplus_groups(
            model, StableLoRA, lr, weight_decay, loraplus_lr_ratio, **stable, **adamw
        )
    return StableLoRA(_trainable(model), lr=lr, weight_decay=weight_decay, **stable, **adamw)


def create_optimizer(
    model: nn.Module,
    method: str = "stable_lora",
    *,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    shrink_ratio: float = 5e-4,
    stop_rule: str = "norm",
    loraplus_lr_ratio: float | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
    **method_options,
) -> torch.optim.Optimizer:
    """Build the optimizer of a LoRA ``method`` over every trainable parameter of ``model``.

    Args:
        model: a model with LoRA layers, e.g. from :func:`stablelora.apply_lora`.
        method: ``"lora"`` (AdamW), ``"rslora"`` (AdamW; the alpha/sqrt(r) scale comes from
            ``apply_lora(scaling="rslora")``), ``"loraplus"`` (AdamW with every B, and every
            1-D tensor, at ``loraplus_lr_ratio * lr``, peft's grouping), ``"stable_lora"``
            (AdamW + the shrink of A; combine with LoRA+ through ``loraplus_lr_ratio``),
            ``"riemann"`` (Riemannian-preconditioned AdamW; options ``reg``,
            ``authors_variant``, ``scaled_gd``), ``"lora_rite"`` (LoRA-RITE; options
            ``rite_eps``, ``clip_unmagnified_grad``, ``update_skipping``, ``update_capping``,
            ``apply_escape``), ``"adamw_large_wd"`` (control: AdamW with
            ``large_weight_decay`` on the A factors, ``large_wd_on="A"``, or on A and B,
            ``"AB"``), or any name in :data:`OPTIMIZERS`.
        lr, weight_decay, betas, eps: AdamW's hyper-parameters (decoupled weight decay).
        shrink_ratio, stop_rule: Stable-LoRA's lambda in [0, 1) and stop rule (``"norm"``,
            ``"never"``, ``"steps:N"``); ignored by the other methods.
        loraplus_lr_ratio: lr of B divided by lr of A for LoRA+ (default 16 for ``loraplus``).
        foreach, fused: choose torch's AdamW implementation.
        **method_options: extra options of registered methods.

    Returns:
        A ``torch.optim.Optimizer``, usable in a plain loop or as
        ``transformers.Trainer(optimizers=(optimizer, scheduler))``.

    Raises:
        ValueError: unknown method, invalid hyper-parameter, or a model without LoRA layers.
    """
    if method not in OPTIMIZERS:
        raise ValueError(
            f"Unknown method {method!r}: choose one of {sorted(OPTIMIZERS)} "
            "(or register a builder with stablelora.optim.register_optimizer)."
        )
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    check_shrink_ratio(shrink_ratio)
    StopRule.parse(stop_rule)
    pairs = find_lora_pairs(model)
    if not pairs:
        raise ValueError(
            "The model has no trainable LoRA layers: wrap it with stablelora.apply_lora(model, "
            "rank=..., target_modules=[...]) before creating the optimizer."
        )
    options = dict(method_options, shrink_ratio=shrink_ratio, stop_rule=stop_rule)
    if loraplus_lr_ratio is not None:
        options["loraplus_lr_ratio"] = loraplus_lr_ratio
    return OPTIMIZERS[method](
        model, pairs, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
        foreach=foreach, fused=fused, **options,
    )  # fmt: skip


from stablelora.optim import controls, lora_rite, riemann  # noqa: E402,F401  registers methods
