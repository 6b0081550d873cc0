"""Optimizers for LoRA fine-tuning and the :func:`create_optimizer` factory.

One module per optimizer idea; this file only maps a method name to a builder. A builder
receives the model, its LoRA pairs, AdamW's shared hyper-parameters (``lr``, ``weight_decay``,
``betas``, ``eps``, ``foreach``, ``fused``) and its own keyword options, and returns a
``torch.optim.Optimizer`` over *every* trainable parameter (never dropping a classifier head
or a bias). Its own options are the keyword parameters of its signature: nothing else is
accepted, so a misspelled option is an error, never a silent default.

Adding an optimizer: a module ``stablelora/optim/<name>.py`` whose builder is decorated with
``@register_optimizer("<name>")``; every module of this package is imported on first use
(:func:`discover_optimizers`), so no list or import line needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import nn

from stablelora.keyword_options import check_options, defaults, keyword_options
from stablelora.optim.pairs import LoRAPair, find_lora_pairs
from stablelora.optim.stable_lora import StableLoRA, StopRule, check_shrink_ratio

__all__ = [
    "OPTIMIZERS",
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

Builder = Callable[..., torch.optim.Optimizer]
OPTIMIZERS: dict[str, Builder] = {}
#: Cheap checks of a builder's options (all of them, defaults filled in), run before any model
#: is loaded; each raises a one-line ValueError.
OPTION_CHECKS: dict[str, Callable[[dict], None]] = {}
#: AdamW's hyper-parameters, shared by every builder (the ``optim`` config group).
SHARED_OPTIONS = ("lr", "weight_decay", "betas", "eps", "foreach", "fused")


def register_optimizer(
    name: str, check: Callable[[dict], None] | None = None
) -> Callable[[Builder], Builder]:
    """Decorator: make ``create_optimizer(model, method=name, ...)`` call the builder.

    ``check`` (optional) validates the builder's own options, given as one dict with the
    defaults filled in, without building anything.
    """

    def register(builder: Builder) -> Builder:
        OPTIMIZERS[name] = builder
        if check is not None:
            OPTION_CHECKS[name] = check
        return builder

    return register


def discover_optimizers() -> dict[str, Builder]:
    """Import every module of this package not imported yet (each registers its builders)
    and return :data:`OPTIMIZERS`."""
    for module in pkgutil.iter_modules(__path__):
        name = f"{__name__}.{module.name}"
        if name not in sys.modules:
            importlib.import_module(name)
    return OPTIMIZERS


def _builder(method: str) -> Builder:
    builders = discover_optimizers()
    if method not in builders:
        raise ValueError(
            f"Unknown method {method!r}: choose one of {sorted(builders)} "
            "(or add a module to stablelora/optim that registers it with register_optimizer)."
        )
    return builders[method]


def optimizer_options(method: str) -> dict[str, object]:
    """The options of ``method`` besides the shared AdamW ones, with their defaults."""
    builder = _builder(method)
    names = keyword_options(builder, exclude=("model", "pairs", *SHARED_OPTIONS))
    return {name: defaults(builder, [name]).get(name) for name in names}


def check_optimizer_options(
    method: str, options: Mapping[str, object], where: str | None = None
) -> None:
    """Raise a one-line ValueError for an unknown ``method``, an option ``method`` does not
    take (the message lists those it takes) or an invalid option value; builds nothing.
    ``where`` names the optimizer in the message (default ``optimizer '<method>'``)."""
    own = optimizer_options(method)
    check_options(options, own, where or f"optimizer {method!r}")
    if method in OPTION_CHECKS:
        OPTION_CHECKS[method]({**own, **options})


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _adamw_kwargs(betas, eps, foreach, fused) -> dict:
    return {"betas": tuple(betas), "eps": eps, "foreach": foreach, "fused": fused}


def _check_loraplus_lr_ratio(loraplus_lr_ratio, required: bool = True) -> None:
    ratio = loraplus_lr_ratio
    if ratio is None and not required:
        return
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise ValueError(
            f"loraplus_lr_ratio must be a positive number (lr of B / lr of A), got "
            f"{ratio!r}; the LoRA+ paper suggests 16."
        )


def _check_stable_lora(options: dict) -> None:
    check_shrink_ratio(options["shrink_ratio"])
    StopRule.parse(options["stop_rule"])
    _check_loraplus_lr_ratio(options["loraplus_lr_ratio"], required=False)


def _loraplus_groups(model, optimizer_cls, lr, weight_decay, loraplus_lr_ratio, **kwargs):
    """peft's LoRA+ grouping (B factors and 1-D tensors at ``ratio * lr``), with our wd."""
    from peft.optimizers import create_loraplus_optimizer

    _check_loraplus_lr_ratio(loraplus_lr_ratio)
    return create_loraplus_optimizer(
        model,
        optimizer_cls,
        lr=lr,
        loraplus_lr_ratio=float(loraplus_lr_ratio),
        loraplus_weight_decay=weight_decay,
        **kwargs,
    )


@register_optimizer("lora")
def _build_adamw(model, pairs, *, lr, weight_decay, betas, eps, foreach, fused):
    return torch.optim.AdamW(
        _trainable(model),
        lr=lr,
        weight_decay=weight_decay,
        **_adamw_kwargs(betas, eps, foreach, fused),
    )


@register_optimizer("rslora")
def _build_rslora(model, pairs, *, lr, weight_decay, betas, eps, foreach, fused):
    config = getattr(model, "peft_config", {}).get("default")
    if config is not None and not getattr(config, "use_rslora", False):
        warnings.warn(
            "method='rslora' on a model without rsLoRA scaling: build the model with "
            "apply_lora(..., scaling='rslora') so that s = alpha/sqrt(r).",
            stacklevel=3,
        )
    return _build_adamw(
        model,
        pairs,
        lr=lr,
        weight_decay=weight_decay,
        betas=betas,
        eps=eps,
        foreach=foreach,
        fused=fused,
    )


@register_optimizer("loraplus", check=lambda options: _check_loraplus_lr_ratio(**options))
def _build_loraplus(
    model, pairs, *, lr, weight_decay, betas, eps, foreach, fused, loraplus_lr_ratio=16.0
):
    return _loraplus_groups(
        model,
        torch.optim.AdamW,
        lr,
        weight_decay,
        loraplus_lr_ratio,
        **_adamw_kwargs(betas, eps, foreach, fused),
    )


@register_optimizer("stable_lora", check=_check_stable_lora)
def _build_stable_lora(
    model,
    pairs,
    *,
    lr,
    weight_decay,
    betas,
    eps,
    foreach,
    fused,
    shrink_ratio=5e-4,
    stop_rule="norm",
    loraplus_lr_ratio=None,
):
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
    foreach: bool | None = None,
    fused: bool | None = None,
    **options,
) -> torch.optim.Optimizer:
    """Build the optimizer of a LoRA ``method`` over every trainable parameter of ``model``.

    Args:
        model: a model with LoRA layers, e.g. from :func:`stablelora.apply_lora`.
        method: a registered builder, with its own options:

            - ``"lora"``: AdamW; no options.
            - ``"rslora"``: AdamW; the alpha/sqrt(r) scale comes from
              ``apply_lora(scaling="rslora")``; no options.
            - ``"loraplus"``: AdamW with every B, and every 1-D tensor, at
              ``loraplus_lr_ratio * lr`` (peft's grouping); ``loraplus_lr_ratio=16``.
            - ``"stable_lora"``: AdamW + the shrink of A; ``shrink_ratio=5e-4`` (lambda in
              [0, 1)), ``stop_rule="norm"`` (``"never"``, ``"steps:N"``),
              ``loraplus_lr_ratio=None`` (a number combines it with LoRA+).
            - ``"riemann"``: Riemannian-preconditioned AdamW; ``reg``, ``authors_variant``,
              ``scaled_gd``.
            - ``"lora_rite"``: LoRA-RITE; ``rite_eps``, ``clip_unmagnified_grad``,
              ``update_skipping``, ``update_capping``, ``apply_escape``.
            - ``"adamw_large_wd"`` (control): AdamW with ``large_weight_decay`` on the A
              factors (``large_wd_on="A"``) or on A and B (``"AB"``).
            - any other name in :data:`OPTIMIZERS` (:func:`optimizer_options` lists its
              options).
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
    builder = _builder(method)
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
    return builder(
        model,
        pairs,
        lr=lr,
        weight_decay=weight_decay,
        betas=betas,
        eps=eps,
        foreach=foreach,
        fused=fused,
        **options,
    )


discover_optimizers()  # every module of the package registers its builders
