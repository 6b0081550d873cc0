"""The base of optimizers that treat each LoRA pair (A, B) jointly (Riemann, LoRA-RITE).

``LoRAFactorAdamW`` runs torch's own AdamW step on every trainable parameter that is not a
LoRA factor (heads, biases, DoRA magnitudes) and leaves the factors to the subclass; it keeps
the options and layer names in ``state_dict`` and refuses a checkpoint of other layers.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from stablelora.optim.pairs import LoRAPair

LAYOUTS = ("auto", "per_layer", "stacked")


def check_layout(layout: str) -> str:
    """Return ``layout`` if it is one of :data:`LAYOUTS`, else raise a ValueError."""
    if layout not in LAYOUTS:
        raise ValueError(
            f"layout must be one of {', '.join(LAYOUTS)} (auto: stacked on accelerators, per "
            f"layer on CPU), got {layout!r}."
        )
    return layout


def by_layout(*tensor_lists: Sequence[Tensor]) -> list[list[int]]:
    """Indices ``i`` grouped so that ``torch.stack`` works on each list's entries ``i``.

    Two indices share a group when, in every list, their tensors have the same shape, dtype and
    device.
    """
    groups: dict[tuple, list[int]] = {}
    for index, tensors in enumerate(zip(*tensor_lists)):
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the r x r algebra: at least float32 (bf16/fp16 factors are upcast)."""
    return torch.promote_types(dtype, torch.float32)


def stack_as(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """``torch.stack`` of same-shape tensors, cast to ``dtype``: (k, *shape)."""
    return torch.stack([t.to(dtype) for t in tensors])


# Tall (..., m, r) products on CPU. BLAS kernels are slow for a tall matrix with only r = 8
# columns (slower than the same product in the (r, m) layout); viewing the contiguous (m, r)
# matrix as (m/2, 2r) doubles the column count and runs faster (measured: results/README.md,
# "Optimizer step"; benchmarks/optimizer_overhead.py). The results are the same up to float
# rounding (the extra terms are exact zeros for finite inputs).
_TALL_MIN_ROWS = 256


def can_pair_rows(*tensors: Tensor) -> bool:
    """Whether tall (..., m, r) CPU tensors may be multiplied as (..., m/2, 2r) views."""
    rows = tensors[0].shape[-2]
    return (
        rows >= _TALL_MIN_ROWS
        and rows % 2 == 0
        and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
    )


def paired_view(X: Tensor) -> Tensor:
    """(..., m, r) -> (..., m/2, 2r), a view."""
    return X.view(*X.shape[:-2], X.shape[-2] // 2, 2 * X.shape[-1])


def block_diagonal(mat: Tensor) -> Tensor:
    """(..., r, r) -> (..., 2r, 2r) with ``mat`` twice on the diagonal."""
    rank = mat.shape[-1]
    block = mat.new_zeros(*mat.shape[:-2], 2 * rank, 2 * rank)
    block[..., :rank, :rank] = mat
    block[..., rank:, rank:] = mat
    return block


def tall_gram(X: Tensor) -> Tensor:
    """``X^T X`` (..., r, r) of tall (..., m, r) matrices."""
    if not can_pair_rows(X):
        return X.mT @ X
    rank = X.shape[-1]
    paired = paired_view(X)
    gram = paired.mT @ paired  # (..., 2r, 2r): the sum of its diagonal blocks is X^T X
    return gram[..., :rank, :rank] + gram[..., rank:, rank:]


def tall_times(X: Tensor, mat: Tensor) -> Tensor:
    """``X @ mat`` of tall (..., m, r) and (..., r, r) matrices, contiguous (..., m, r)."""
    if not can_pair_rows(X) or mat.dim() != X.dim():
        return X @ mat
    return (paired_view(X) @ block_diagonal(mat)).view(X.shape)


class LoRAFactorAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` for the non-factor parameters; subclasses update the LoRA factors.

    ``step()`` runs torch's AdamW on every parameter that is not an A or B of ``lora_pairs``
    (their ``.grad`` is hidden from it for the call and restored), then
    :meth:`_step_lora_factors`, which a subclass implements with the hyper-parameters of each
    factor's parameter group (``lr``, ``betas``, ``weight_decay``: LR schedulers work).

    ``layout`` says how the subclass lays out the full-size work on the factors (their values,
    gradients, moments): ``"per_layer"`` runs one product per layer on the tensors themselves
    (no copies: the fastest on CPU), ``"stacked"`` stacks the layers of equal shapes and runs one
    batched product per stack (the fewest launches: the fastest on accelerators), ``"auto"``
    (default) picks ``stacked`` for factors off the CPU and ``per_layer`` on it. Both layouts
    compute the same update up to float rounding; tests force ``stacked`` on CPU to compare
    them. The layout is not saved in :meth:`state_dict` (a run may resume on another device).

    The subclass's options (``_options()``) and the layer names are saved in
    :meth:`state_dict` under ``_STATE_KEY``; loading checks the layers and warns when the options
    differ.
    """

    _STATE_KEY = "lora_factors"

    def __init__(
        self,
        params: Iterable,
        lora_pairs: Sequence[LoRAPair],
        *,
        layout: str = "auto",
        **adamw_kwargs,
    ):
        self.layout = check_layout(layout)
        super().__init__(params, **adamw_kwargs)
        # fused AdamW lets GradScaler pass its scale into step(); the factor updates cannot take
        # it, so GradScaler must unscale every gradient itself.
        self._step_supports_amp_scaling = False
        self.lora_pairs = list(lora_pairs)
        if not self.lora_pairs:
            raise ValueError(
                f"{type(self).__name__} got no LoRA layers: apply LoRA first "
                "(stablelora.apply_lora) and pass stablelora.find_lora_pairs(model)."
            )
        optimized = {id(p) for group in self.param_groups for p in group["params"]}
        seen: set[int] = set()
        for pair in self.lora_pairs:
            for factor in (pair.A, pair.B):
                if id(factor) not in optimized:
                    raise ValueError(
                        f"LoRA layer {pair.name!r} is not among the optimizer's parameters: pass "
                        "every trainable parameter (e.g. model.parameters()) as params."
                    )
                if id(factor) in seen:
                    raise ValueError(f"LoRA factor of {pair.name!r} appears in two pairs.")
                seen.add(id(factor))

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure=None):
        """AdamW on the other parameters, then the subclass's update of the LoRA factors."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_other_parameters()
        self._step_lora_factors()
        return loss

    def _step_other_parameters(self) -> None:
        factors = [factor for pair in self.lora_pairs for factor in (pair.A, pair.B)]
        grads = [factor.grad for factor in factors]
        for factor in factors:  # AdamW skips parameters without a gradient
            factor.grad = None
        adamw_step: Any = torch.optim.AdamW.step  # a function, possibly torch's hook wrapper
        if getattr(adamw_step, "hooked", False):
            # torch wraps each optimizer class's step() in the runner of the step hooks, which
            # already ran around this optimizer's step(): call AdamW's own step, so they run once.
            adamw_step = adamw_step.__wrapped__
        try:
            adamw_step(self)
        finally:
            for factor, grad in zip(factors, grads):
                factor.grad = grad

    def _step_lora_factors(self) -> None:
        raise NotImplementedError

    def _stacked(self, device: torch.device) -> bool:
        """Whether factors on ``device`` take the stacked layout (see the class docstring)."""
        return self.layout == "stacked" or (self.layout == "auto" and device.type != "cpu")

    def _group_index(self) -> dict[int, int]:
        """``id(param) -> index`` of its parameter group (rebuilt per step: groups can change)."""
        return {id(p): i for i, group in enumerate(self.param_groups) for p in group["params"]}

    # ------------------------------------------------------------------ checkpointing
    @property
    def layer_names(self) -> list[str]:
        return [pair.name for pair in self.lora_pairs]

    def _options(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        """AdamW's state dict (every factor's state included) plus the options and layers."""
        state = super().state_dict()
        state[self._STATE_KEY] = {"layer_names": self.layer_names, **self._options()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop(self._STATE_KEY, None)
        if saved is not None:
            saved = dict(saved)
            if list(saved.pop("layer_names")) != self.layer_names:
                raise ValueError(
                    "The checkpoint's LoRA layers differ from this optimizer's: resume with the "
                    "same model, target_modules and rank as the run that saved it."
                )
            if saved != self._options():
                warnings.warn(
                    f"Resuming {type(self).__name__} with options {self._options()} from a "
                    f"checkpoint saved with {saved}.",
                    stacklevel=2,
                )
        super().load_state_dict(state_dict)
