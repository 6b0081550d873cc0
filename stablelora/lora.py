"""LoRA injection through peft, with the options the Stable-LoRA experiments sweep."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from stablelora.config.keyword_options import check_options, keyword_options

SCALINGS = ("lora", "rslora")
ADAPTERS = ("lora", "adalora")
#: peft AdaLoraConfig fields that ``apply_lora(adalora={...})`` passes on.
ADALORA_OPTIONS = (
    "init_r",
    "total_step",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Sorted distinct last name parts of the model's linear layers (``q_proj``, ...)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model: nn.Module, target_modules: str | Sequence[str]) -> None:
    """Raise a ValueError naming the model's linear layers if a target matches none of them.

    ``target_modules`` follows peft: a list of module-name suffixes, a regex string matched
    against full names, or ``"all-linear"``.
    """
    module_names = [name for name, _ in model.named_modules() if name]
    if isinstance(target_modules, str):
        if target_modules == "all-linear" or any(
            re.fullmatch(target_modules, name) for name in module_names
        ):
            return
        missing = [target_modules]
    else:
        if not target_modules:
            raise ValueError("target_modules is empty: name at least one layer, e.g. ['q_proj'].")
        missing = [
            target
            for target in target_modules
            if not any(name == target or name.endswith("." + target) for name in module_names)
        ]
    if missing:
        raise ValueError(
            f"target_modules {missing} match no module of {type(model).__name__}; its linear "
            f"layers are {linear_layer_names(model)}: set target_modules to some of these."
        )


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
    dropout: float = 0.0,
    scaling: str = "lora",
    init_scale: float = 1.0,
    init: str = "default",
    use_dora: bool = False,
    modules_to_save: Sequence[str] | None = None,
    task_type: str | None = None,
    adapter: str = "lora",
    adalora: dict | None = None,
    **unknown,
):
    """Inject LoRA adapters into ``model`` with peft and return the ``PeftModel``.

    Each adapted linear ``W0`` (m x n) becomes ``W0 + s * B @ A`` with ``A`` of shape
    (rank, n) (peft's ``lora_A.default.weight``) and ``B`` of shape (m, rank), ``B0 = 0``.

    Args:
        model: a transformers model (or any ``nn.Module`` with named linear layers).
        rank: r > 0.
        alpha: ``lora_alpha`` > 0.
        target_modules: peft's target modules (name suffixes, a regex or ``"all-linear"``).
        dropout: LoRA dropout on the layer input.
        scaling: ``"lora"`` for s = alpha/r, ``"rslora"`` for s = alpha/sqrt(r)
            (peft's ``use_rslora``).
        init_scale: multiplies A0 after peft's init (the paper's "init scale" sweeps). 0 gives
            A0 = B0 = 0, a saddle where both gradients vanish: allowed, with a warning.
        init: peft's ``init_lora_weights``: ``"default"`` (kaiming-uniform A0, variance
            1/(3n)), ``"gaussian"`` (variance 1/r), ``"pissa"``, ``"olora"``, ...
        use_dora: DoRA (a trainable magnitude vector per output row).
        modules_to_save: extra modules trained in full (e.g. a classifier ``score``).
        task_type: peft's task type (e.g. ``"CAUSAL_LM"``), optional.
        adapter: ``"lora"`` (LoRA / rsLoRA / DoRA) or ``"adalora"`` (peft's AdaLoRA: ``rank`` is
            the target rank; ``adalora`` gives ``init_r``, ``total_step`` (required), ``tinit``,
            ``tfinal``, ``deltaT``, ``beta1``, ``beta2``, ``orth_reg_weight``). With AdaLoRA the
            training loop must call the hooks of :func:`step_hooks` after each optimizer
            step; its B0 is random, not 0.

    Returns:
        ``peft.PeftModel``; save with ``save_pretrained``, reload with
        ``PeftModel.from_pretrained``.

    Raises:
        ValueError: an unknown option (the message lists the valid ones), a non-positive rank
            or alpha, an unknown scaling, a negative init scale, or target modules that match
            nothing (the message lists the model's linear layers).
    """
    check_options(unknown, lora_options(), "apply_lora")
    check_lora_options(
        rank=rank,
        alpha=alpha,
        scaling=scaling,
        dropout=dropout,
        init_scale=init_scale,
        use_dora=use_dora,
        adapter=adapter,
        adalora=adalora,
    )
    check_target_modules(model, target_modules)

    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    common: dict[str, Any] = dict(
        lora_alpha=alpha,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        lora_dropout=dropout,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type=task_type,
    )
    config: LoraConfig  # AdaLoraConfig is a LoraConfig
    if adapter == "adalora":
        # check_lora_options has made sure that AdaLoRA gets its options (total_step at least).
        config = AdaLoraConfig(target_r=rank, **dict(adalora or {}), **common)
    else:
        config = LoraConfig(
            r=rank,
            use_rslora=scaling == "rslora",
            # peft types this as a Literal of its init names; an unknown name is peft's error.
            init_lora_weights=True if init == "default" else cast(Any, init),
            use_dora=use_dora,
            **common,
        )
    peft_model = get_peft_model(model, config)
    if init_scale != 1.0:
        scale_lora_init_(peft_model, init_scale)
    return peft_model


def lora_options() -> list[str]:
    """The keyword options of :func:`apply_lora` (besides the model)."""
    return keyword_options(apply_lora, exclude=("model",))


def check_lora_options(
    *,
    rank=8,
    alpha=16.0,
    scaling="lora",
    dropout=0.0,
    init_scale=1.0,
    use_dora=False,
    adapter="lora",
    adalora=None,
) -> None:
    """The checks of :func:`apply_lora` that need no model (one-line ValueErrors)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}.")
    if not _is_number(alpha) or not alpha > 0:
        raise ValueError(f"alpha (lora_alpha) must be positive, got {alpha!r}.")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}.")
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
    if not (_is_number(init_scale) and math.isfinite(init_scale) and init_scale >= 0):
        raise ValueError(f"init_scale must be a finite number >= 0, got {init_scale!r}.")
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}.")
    if adapter == "adalora":
        adalora = dict(adalora or {})
        check_options(adalora, ADALORA_OPTIONS, "AdaLoRA (apply_lora's adalora)")
        if not adalora.get("total_step"):
            raise ValueError("AdaLoRA needs adalora={'total_step': <training steps>, ...}.")
        if use_dora or scaling != "lora":
            raise ValueError("AdaLoRA supports neither DoRA nor rsLoRA: use scaling='lora'.")


def adapter_arguments(adapter_cfg: Mapping, total_steps: int) -> dict:
    """:func:`apply_lora`'s keyword options from an ``adapter`` config (``conf/adapter/``).

    ``name`` only names the config; ``kind`` is apply_lora's ``adapter``; AdaLoRA's
    ``total_step`` is the run's number of training steps.
    """
    options = {key: value for key, value in adapter_cfg.items() if key != "name"}
    if "kind" in options:
        options["adapter"] = options.pop("kind")
    if not isinstance(options.get("target_modules", ""), str):
        options["target_modules"] = list(options["target_modules"])
    if options.get("adapter") == "adalora":
        options["adalora"] = {**dict(options.get("adalora") or {}), "total_step": total_steps}
    return options


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@torch.no_grad()
def scale_lora_init_(model: nn.Module, init_scale: float) -> None:
    """Multiply every LoRA A factor by ``init_scale`` in place (B0 = 0 is left alone)."""
    from stablelora.optim.pairs import find_lora_pairs

    if init_scale == 0:
        warnings.warn(
            "init_scale=0 makes A0 = B0 = 0: a saddle where both LoRA gradients are zero, so "
            "the adapters will not train. Use a positive init_scale unless that is the point.",
            stacklevel=3,
        )
    for pair in find_lora_pairs(model, trainable_only=False):
        pair.A.mul_(init_scale)


def step_hooks(model: nn.Module) -> list:
    """What the adapter must do after each optimizer step, before the gradients are zeroed:
    callables ``hook(step)`` (1-based step). AdaLoRA reallocates its ranks from the gradients
    (peft's ``update_and_allocate``); plain LoRA, rsLoRA and DoRA need nothing."""
    from peft.tuners.adalora import AdaLoraModel

    base = getattr(model, "base_model", None)
    if isinstance(base, AdaLoraModel):
        return [base.update_and_allocate]
    return []
