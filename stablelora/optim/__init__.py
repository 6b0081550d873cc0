"""Optimizers for LoRA fine-tuning and the :func:`create_optimizer` factory.

One module per optimizer idea, each registering its builder with its options
(:mod:`stablelora.optim.registry`); this file only maps a method name to its builder. A
method takes AdamW's shared hyper-parameters (:class:`AdamWSettings`) and its own options:
nothing else is accepted, so a misspelled option is an error, never a silent default.

Adding an optimizer: a module ``stablelora/optim/<name>.py`` whose builder is decorated with
``@register_optimizer("<name>")``; every module of this package is imported on first use
(:func:`discover_optimizers`), so no list or import line needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Mapping
from typing import cast

import torch
from torch import nn

from stablelora.config.identity import current_name
from stablelora.config.keyword_options import check_options
from stablelora.optim.adamw_settings import ADAMW_DEFAULTS
from stablelora.optim.pairs import LoRAPair, find_lora_pairs
from stablelora.optim.registry import (
    OPTIMIZERS,
    AdamWSettings,
    RegisteredOptimizer,
    register_optimizer,
)
from stablelora.optim.stable_lora import StableLoRA, StopRule

__all__ = [
    "OPTIMIZERS",
    "AdamWSettings",
    "LoRAPair",
    "StableLoRA",
    "StopRule",
    "check_optimizer_options",
    "create_optimizer",
    "discover_optimizers",
    "find_lora_pairs",
    "optimizer_options",
    "register_optimizer",
]


def discover_optimizers() -> dict[str, RegisteredOptimizer]:
    """Import every module of this package not imported yet (each registers its builders)
    and return :data:`OPTIMIZERS`."""
    for module in pkgutil.iter_modules(__path__):
        name = f"{__name__}.{module.name}"
        if name not in sys.modules:
            importlib.import_module(name)
    return OPTIMIZERS


def _registered(method: str) -> RegisteredOptimizer:
    registered = discover_optimizers()
    # a builder's name before a rename (``lora``: AdamW's), as recorded configs hold it
    method = current_name("optimizer.builder", method)
    if method not in registered:
        raise ValueError(
            f"Unknown method {method!r}: choose one of {sorted(registered)} "
            "(or add a module to stablelora/optim that registers it with register_optimizer)."
        )
    return registered[method]


def optimizer_options(method: str) -> dict[str, object]:
    """The options of ``method`` besides the shared AdamW ones, with their defaults."""
    return dict(_registered(method).options)


def check_optimizer_options(
    method: str, options: Mapping[str, object], where: str | None = None
) -> None:
    """Raise a one-line ValueError for an unknown ``method``, an option ``method`` does not
    take (the message lists those it takes) or an invalid option value; builds nothing.
    ``where`` names the optimizer in the message (default ``optimizer '<method>'``)."""
    registered = _registered(method)
    check_options(options, registered.options, where or f"optimizer {method!r}")
    if registered.check is not None:
        registered.check({**registered.options, **options})


def create_optimizer(
    model: nn.Module,
    method: str = "stable_lora",
    *,
    lr: float = ADAMW_DEFAULTS.lr,
    weight_decay: float = ADAMW_DEFAULTS.weight_decay,
    betas: tuple[float, float] = ADAMW_DEFAULTS.betas,
    eps: float = ADAMW_DEFAULTS.eps,
    foreach: bool | None = ADAMW_DEFAULTS.foreach,
    fused: bool | None = ADAMW_DEFAULTS.fused,
    **options,
) -> torch.optim.Optimizer:
    """Build the optimizer of a LoRA ``method`` over every trainable parameter of ``model``.

    Args:
        model: a model with LoRA layers, e.g. from :func:`stablelora.apply_lora`.
        method: a registered builder, with its own options (their defaults:
            :func:`optimizer_options`, and ``conf/optimizer/<method>.yaml`` for the runner):

            - ``"adamw"``: AdamW; no options (``"lora"``, its name before, is accepted).
            - ``"rslora"``: AdamW; the alpha/sqrt(r) scale comes from
              ``apply_lora(scaling="rslora")``; no options.
            - ``"loraplus"``: AdamW with every B, and every 1-D tensor, at
              ``loraplus_lr_ratio * lr`` (peft's grouping).
            - ``"stable_lora"``: AdamW + the shrink of A: ``shrink_ratio`` (lambda in
              [0, 1)), ``stop_rule`` (``"norm"``, ``"never"``, ``"steps:N"``),
              ``loraplus_lr_ratio`` (a number combines it with LoRA+).
            - ``"riemann"``: Riemannian-preconditioned AdamW; ``reg``, ``authors_variant``,
              ``scaled_gd``.
            - ``"lora_rite"``: LoRA-RITE; ``rite_eps``, ``clip_unmagnified_grad``,
              ``update_skipping``, ``update_capping``, ``apply_escape``.
            - ``"adamw_large_wd"`` (control): AdamW with ``large_weight_decay`` on the A
              factors (``large_wd_on="A"``) or on A and B (``"AB"``).
            - any other name in :data:`OPTIMIZERS`.
        lr, weight_decay, betas, eps: AdamW's hyper-parameters (decoupled weight decay),
            shared by every method.
        foreach, fused: choose torch's AdamW implementation.
        **options: the method's own options; any other name is an error.

    Returns:
        A ``torch.optim.Optimizer``, usable in a plain loop or as
        ``transformers.Trainer(optimizers=(optimizer, scheduler))``.

    Raises:
        ValueError: unknown method, an option the method does not take (the message lists
            those it takes), an invalid hyper-parameter, or a model without LoRA layers.
    """
    registered = _registered(method)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    check_optimizer_options(method, options)
    pairs = find_lora_pairs(model)
    if not pairs:
        raise ValueError(
            "The model has no trainable LoRA layers: wrap it with stablelora.apply_lora(model, "
            "rank=..., target_modules=[...]) before creating the optimizer."
        )
    pair = cast(tuple[float, float], tuple(betas))  # a list from a config, too
    adamw = AdamWSettings(lr, weight_decay, pair, eps, foreach, fused)
    return registered.build(model, pairs, adamw, **options)


discover_optimizers()  # every module of the package registers its builders
