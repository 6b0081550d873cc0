"""The optimizer registry: every optimizer is registered once, with its builder and options.

A builder ``build(model, pairs, adamw, **options)`` receives the model, its LoRA pairs,
:class:`AdamWSettings` (the hyper-parameters every optimizer shares) and its own options,
and returns a ``torch.optim.Optimizer`` over *every* trainable parameter (never dropping a
classifier head or a bias). Its options, with their defaults, are its keyword-only
parameters, and, for a builder that passes ``**options`` on to an optimizer class, that
class's own keyword parameters: each default is written once, in one signature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from stablelora.config.keyword_options import defaults, keyword_options
from stablelora.optim.adamw_settings import ADAMW_SETTINGS, AdamWSettings

__all__ = [  # AdamWSettings and ADAMW_SETTINGS: re-exported, the builders' argument
    "ADAMW_SETTINGS",
    "NOT_OPTIONS",
    "OPTIMIZERS",
    "AdamWSettings",
    "Builder",
    "RegisteredOptimizer",
    "register_optimizer",
    "trainable_parameters",
]

Builder = Callable[..., torch.optim.Optimizer]

#: Keyword parameters of an optimizer class that are no method's option: what a builder
#: passes itself, AdamW's shared settings, and ``layout`` (how the work is laid out on the
#: hardware, picked per device: see :class:`~stablelora.optim.factor_adamw.LoRAFactorAdamW`).
NOT_OPTIONS = ("params", "lora_pairs", "layout", *ADAMW_SETTINGS)


@dataclass(frozen=True)
class RegisteredOptimizer:
    """What :func:`register_optimizer` records for a method name."""

    build: Builder
    #: Its own options (besides AdamW's), with their defaults, in signature order.
    options: dict[str, object]
    #: Validates all its options (one dict, defaults filled in) without building anything;
    #: raises a one-line ValueError. Run before any model is loaded.
    check: Callable[[dict], None] | None = None


OPTIMIZERS: dict[str, RegisteredOptimizer] = {}


def register_optimizer(
    name: str, *, forwards_to: type | None = None, check: Callable[[dict], None] | None = None
) -> Callable[[Builder], Builder]:
    """Decorator: make ``create_optimizer(model, method=name, ...)`` call the builder.

    Args:
        name: the method name (a ``builder:`` in ``conf/optimizer/*.yaml``).
        forwards_to: the optimizer class a builder passes its ``**options`` on to: the class's
            keyword parameters (less :data:`NOT_OPTIONS`) are options too, with its defaults.
        check: validates the options (one dict, defaults filled in) before any model loads.
    """

    def register(builder: Builder) -> Builder:
        OPTIMIZERS[name] = RegisteredOptimizer(builder, _options(builder, forwards_to), check)
        return builder

    return register


def _options(builder: Builder, forwards_to: type | None) -> dict[str, object]:
    names = keyword_options(forwards_to, exclude=NOT_OPTIONS) if forwards_to else []
    options = dict(defaults(forwards_to, names)) if forwards_to else {}
    own = keyword_options(builder, exclude=("model", "pairs", "adamw"))
    options.update(defaults(builder, own))
    missing = [option for option in [*names, *own] if option not in options]
    if missing:
        raise TypeError(f"optimizer option(s) {missing} of {builder.__name__} need a default.")
    return options


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` that requires a gradient, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]
