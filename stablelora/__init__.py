"""stablelora: reproducible LoRA fine-tuning research, with the Stable-LoRA optimizer.

Public API::

    from stablelora import apply_lora, create_optimizer
    model = apply_lora(hf_model, rank=8, alpha=16, target_modules=["q_proj", "v_proj"])
    optimizer = create_optimizer(model, method="stable_lora", lr=1e-4, shrink_ratio=5e-4)

The names below load on first use, so that light modules (``stablelora.records.recorder``, used by
the analysis) can be imported without importing torch.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "apply_lora": "stablelora.lora",
    "OPTIMIZERS": "stablelora.optim",
    "LoRAPair": "stablelora.optim",
    "StableLoRA": "stablelora.optim",
    "create_optimizer": "stablelora.optim",
    "find_lora_pairs": "stablelora.optim",
    "register_optimizer": "stablelora.optim",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'stablelora' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PUBLIC])
