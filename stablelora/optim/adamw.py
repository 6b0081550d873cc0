"""Plain AdamW over every trainable parameter: the LoRA baseline (``adamw``; ``lora`` before it
was renamed, still accepted), and rsLoRA (``rslora``), whose alpha/sqrt(r) scale is the
adapter's (``apply_lora(scaling="rslora")``)."""

from __future__ import annotations

import warnings

import torch

from stablelora.optim.registry import AdamWSettings, register_optimizer, trainable_parameters


@register_optimizer("adamw")
def _build_adamw(model, pairs, adamw: AdamWSettings):
    return torch.optim.AdamW(trainable_parameters(model), **adamw.kwargs())


@register_optimizer("rslora")
def _build_rslora(model, pairs, adamw: AdamWSettings):
    config = getattr(model, "peft_config", {}).get("default")
    if config is not None and not getattr(config, "use_rslora", False):
        warnings.warn(
            "method='rslora' on a model without rsLoRA scaling: build the model with "
            "apply_lora(..., scaling='rslora') so that s = alpha/sqrt(r).",
            stacklevel=3,
        )
    return _build_adamw(model, pairs, adamw)
