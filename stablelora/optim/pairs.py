"""Find the (A, B) factor pairs of every LoRA layer in a model, paired by their module.

Pairing by the owning module (never by the order of a parameter list) is what keeps DoRA's
magnitude vectors, biases, classifier heads and multiple adapters from being mistaken for a
factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRAPair:
    """One LoRA layer ``W = W0 + s * B @ A``.

    Attributes:
        name: the adapted module's path in the base model, e.g.
            ``model.layers.0.self_attn.q_proj`` (with ``:<adapter>`` appended for adapters
            other than ``default``).
        A: the down-projection, shape ``(r, n)``, n = input width (fan-in).
        B: the up-projection, shape ``(m, r)``, m = output width.
        scale: the scale s of the layer (alpha/r, or alpha/sqrt(r) with rsLoRA).
    """

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def numel_ratio(self) -> float:
        """``numel(A) / numel(B)`` = n / m: the stop rule is ``||A|| < numel_ratio * ||B||``."""
        return self.A.numel() / self.B.numel()


def _factor(container: nn.ModuleDict | nn.ParameterDict, adapter: str) -> torch.Tensor:
    entry = container[adapter]
    # LoRA keeps an nn.Linear per adapter, AdaLoRA a bare Parameter in a ParameterDict.
    return cast(torch.Tensor, entry.weight) if isinstance(entry, nn.Module) else entry


def find_lora_pairs(model: nn.Module, trainable_only: bool = True) -> list[LoRAPair]:
    """Return the LoRA factor pairs of ``model`` in module order.

    A layer counts as LoRA when it has ``lora_A`` and ``lora_B`` dictionaries keyed by adapter
    name (peft's LoRA, DoRA and AdaLoRA layers, and any layer that follows the same layout).
    With ``trainable_only`` (default), adapters whose A or B is frozen are skipped.
    """
    pairs = []
    for module_name, module in model.named_modules():
        lora_A, lora_B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_A, (nn.ModuleDict, nn.ParameterDict)) or not isinstance(
            lora_B, (nn.ModuleDict, nn.ParameterDict)
        ):
            continue
        for adapter in lora_A:
            if adapter not in lora_B:
                continue
            A, B = _factor(lora_A, adapter), _factor(lora_B, adapter)
            if trainable_only and not (A.requires_grad and B.requires_grad):
                continue
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise ValueError(
                    f"LoRA layer {module_name!r} has factors of shapes {tuple(A.shape)} and "
                    f"{tuple(B.shape)}; expected A (r, n) and B (m, r)."
                )
            name = module_name.removeprefix(_PEFT_PREFIX)
            if adapter != "default":
                name = f"{name}:{adapter}"
            scaling = getattr(module, "scaling", {})
            scale = float(scaling.get(adapter, 1.0)) if isinstance(scaling, dict) else 1.0
            pairs.append(LoRAPair(name=name, A=A, B=B, scale=scale))
    return pairs
