"""AdamW's hyper-parameters, which every optimizer of this package shares, with their defaults
written once: :class:`AdamWSettings`. The optimizer classes (``StableLoRA``, ``RiemannianAdamW``,
``LoRARITE``) keep AdamW's keyword arguments, so that they replace ``torch.optim.AdamW`` in a
user's code, and take their defaults from :data:`ADAMW_DEFAULTS`; so do
:func:`stablelora.optim.create_optimizer` and the runner (``optim:`` in ``conf/config.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class AdamWSettings:
    """AdamW's hyper-parameters, shared by every optimizer (``optim:`` in ``conf/config.yaml``):
    decoupled weight decay, and ``foreach`` / ``fused`` choose torch's implementation. The
    field defaults are the package's (:data:`ADAMW_DEFAULTS`): torch AdamW's, but ``lr`` 1e-4
    (torch: 1e-3)."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    foreach: bool | None = None
    fused: bool | None = None

    def kwargs(self) -> dict[str, Any]:
        """As keyword arguments of ``torch.optim.AdamW`` (and of this package's optimizers)."""
        return {field.name: getattr(self, field.name) for field in fields(self)}


#: The defaults of every optimizer of this package (LoRA-RITE's weight decay aside:
#: :data:`stablelora.optim.lora_rite.RITE_DEFAULTS`).
ADAMW_DEFAULTS = AdamWSettings()
#: The names of :class:`AdamWSettings`, as ``create_optimizer`` and ``optim:`` spell them.
ADAMW_SETTINGS = tuple(field.name for field in fields(AdamWSettings))
