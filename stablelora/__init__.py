"""stablelora: reproducible LoRA fine-tuning research, with the Stable-LoRA optimizer.

Public API::

    from stablelora import apply_lora, create_optimizer
    model = apply_lora(hf_model, rank=8, alpha=16, target_modules=["q_proj", "v_proj"])
    optimizer = create_optimizer(model, method="stable_lora", lr=1e-4, shrink_ratio=5e-4)
"""

from stablelora.lora import apply_lora
from stablelora.optim import (
    OPTIMIZERS,
    LoRAPair,
    StableLoRA,
    create_optimizer,
    find_lora_pairs,
    register_optimizer,
)

__version__ = "0.1.0"

__all__ = [
    "OPTIMIZERS",
    "LoRAPair",
    "StableLoRA",
    "apply_lora",
    "create_optimizer",
    "find_lora_pairs",
    "register_optimizer",
]
