"""LoRA-RITE's full-size work in its two memory layouts (the algorithm: :mod:`.lora_rite`).

The algorithm is written rank-last; A is kept rank-first (r, n), B rank-last (m, r). Each
layout holds one factor (all the A's, or all the B's) of a stack of same-shape layers and does
its full-size work (QR, the Gram matrix of the gradients, the products of the moments,
gradients and factors with r x r matrices); the r x r operands it receives are stacks
(k, r, r), rank-last. Both compute the same update up to float rounding
(``tests/test_optimizer_layouts.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from stablelora.optim.factor_adamw import (
    block_diagonal,
    can_pair_rows,
    paired_view,
    stack_as,
    tall_gram,
)


class PerLayerFactor:
    """The full-size tensors of one factor kept per layer (``layout="per_layer"``).

    Attributes:
        params, states: the factors and their optimizer states.
        rank_first: True for A (each (r, n)), False for B ((m, r)).
        values, grads: each layer's factor X and its gradient, in the compute dtype (>= float32).
        bases: each layer's orthonormal basis U of the rank-last factor ``X = U R`` (reduced
            QR), stored rank-first, (r, rows): QR returns it in that memory order.
    """

    def __init__(self, params: list[Tensor], states: list[dict], rank_first: bool, dtype):
        self.params, self.states, self.rank_first = params, states, rank_first
        self.values = [p.to(dtype) for p in params]
        self.grads = [_grad(p).to(dtype) for p in params]
        self.bases: list[Tensor] = []

    def factorize(self) -> tuple[Tensor, Tensor]:
        """QR of every layer: ``(R, U^T U_old)``, each (k, r, r)."""
        triangulars, changes = [], []
        for value, state in zip(self.values, self.states):
            basis, triangular = torch.linalg.qr(value.mT if self.rank_first else value)
            self.bases.append(basis.mT)
            triangulars.append(triangular)
            # U^T U_old now, while the new basis is in cache (the state still holds U_old).
            changes.append(basis.mT @ state["basis"].to(basis.dtype).mT)
        return torch.stack(triangulars), torch.stack(changes)

    def gradient_gram(self) -> Tensor:
        """``G^T G`` (rank-last) of every layer's gradient, (k, r, r)."""
        if self.rank_first:
            return torch.stack([grad @ grad.mT for grad in self.grads])
        return torch.stack([tall_gram(grad) for grad in self.grads])

    def update(
        self,
        transport: Tensor,
        gradient_map: Tensor,
        remagnify: Tensor,
        *,
        keep: Tensor,
        finite: Tensor,
        lr: float,
        weight_decay: float,
        update_capping: float,
    ) -> None:
        """``M <- M transport + G gradient_map``; ``X <- (1 - lr wd) X - lr M' remagnify``.

        ``M'`` is M capped to RMS ``update_capping`` (0 = off); ``keep`` and ``finite`` (k,)
        say which layers' gradients count and which are finite.
        """
        # A skipped layer has a zero gradient map, so its G only needs zeroing where it is not
        # finite (NaN times 0). On CPU that is known for free; elsewhere mask every skipped layer.
        zero_grad = (~finite).tolist() if finite.device.type == "cpu" else None
        # In the rank-first layout (A) the rank-last ``Y @ mat`` is ``mat^T @ Y``; tall
        # contiguous B's are multiplied as (m/2, 2r) views by block-diagonal (2r, 2r) matrices.
        paired = not self.rank_first and all(
            can_pair_rows(param, grad, state["exp_avg"])
            for param, grad, state in zip(self.params, self.grads, self.states)
        )
        operands = [transport, gradient_map, remagnify]
        if self.rank_first:
            operands = [mat.mT for mat in operands]
        elif paired:
            operands = [block_diagonal(mat) for mat in operands]
        transports, maps, remagnifies = (mat.unbind(0) for mat in operands)

        decay = 1.0 - lr * weight_decay
        layers = zip(self.params, self.states, self.grads, self.values, self.bases)
        for i, (param, state, grad, value, basis) in enumerate(layers):
            if zero_grad is None:
                grad = torch.where(keep[i], grad, 0.0)
            elif zero_grad[i]:
                grad = torch.zeros_like(grad)
            M = state["exp_avg"].to(grad.dtype)
            # In place on the fresh product: an out-of-place addmm would first copy it.
            if self.rank_first:
                M = (transports[i] @ M).addmm_(maps[i], grad)
            elif paired:
                M = (paired_view(M) @ transports[i]).addmm_(paired_view(grad), maps[i])
            else:
                M = (M @ transports[i]).addmm_(grad, maps[i])
            remagnify_i = remagnifies[i]
            if update_capping > 0:
                rms = M.square().mean().sqrt()
                remagnify_i = remagnify_i / (rms / update_capping).clamp(min=1.0)
            if param.dtype == grad.dtype:  # X <- (1 - lr wd) X - lr M remagnify, one addmm
                if self.rank_first:
                    param.addmm_(remagnify_i, M, beta=decay, alpha=-lr)
                else:
                    (paired_view(param) if paired else param).addmm_(
                        M, remagnify_i, beta=decay, alpha=-lr
                    )
            else:
                delta = remagnify_i @ M if self.rank_first else M @ remagnify_i
                delta = delta.view(param.shape)
                if weight_decay:
                    delta.add_(value, alpha=weight_decay)
                param.add_(delta.to(param.dtype), alpha=-lr)
            state["exp_avg"] = M.view(param.shape).to(param.dtype)
            state["basis"] = basis.to(param.dtype).contiguous()


class StackedFactor:
    """The full-size tensors of one factor stacked (``layout="stacked"``): few launches.

    Attributes:
        params, states: the factors and their optimizer states.
        rank_first: True for A (stacks are (k, r, n)), False for B ((k, m, r)).
        value, grad: the stacked factor X and its gradient, in the compute dtype (>= float32).
        basis: the orthonormal bases U of the rank-last factors ``X = U R`` (reduced QR),
            stored rank-first, (k, r, rows): QR returns them in that memory order.
    """

    def __init__(self, params: list[Tensor], states: list[dict], rank_first: bool, dtype):
        self.params, self.states, self.rank_first = params, states, rank_first
        self.value = stack_as(params, dtype)
        self.grad = stack_as([_grad(p) for p in params], dtype)
        self.basis: Tensor | None = None

    def factorize(self) -> tuple[Tensor, Tensor]:
        """Batched QR: ``(R, U^T U_old)``, each (k, r, r)."""
        basis, triangular = torch.linalg.qr(self.value.mT if self.rank_first else self.value)
        self.basis = basis.mT
        return triangular, self.basis @ stack_state(self.states, "basis").to(basis.dtype).mT

    def gradient_gram(self) -> Tensor:
        """``G^T G`` (rank-last) of the stacked gradient, (k, r, r)."""
        return self.grad @ self.grad.mT if self.rank_first else self.grad.mT @ self.grad

    def _times(self, Y: Tensor, mat: Tensor) -> Tensor:
        """The rank-last product ``Y @ mat`` in Y's layout."""
        return mat.mT @ Y if self.rank_first else Y @ mat

    def update(
        self,
        transport: Tensor,
        gradient_map: Tensor,
        remagnify: Tensor,
        *,
        keep: Tensor,
        finite: Tensor,
        lr: float,
        weight_decay: float,
        update_capping: float,
    ) -> None:
        """As :meth:`PerLayerFactor.update`, one batched product at a time."""
        grad = self.grad.masked_fill_(~keep[:, None, None], 0.0)  # no NaN through G @ map
        M = stack_state(self.states, "exp_avg").to(grad.dtype)
        M = self._times(M, transport)
        if self.rank_first:
            M = torch.baddbmm(M, gradient_map.mT, grad)
        else:
            M = torch.baddbmm(M, grad, gradient_map)
        direction = M
        if update_capping > 0:
            rms = M.square().mean(dim=(-2, -1), keepdim=True).sqrt()
            direction = M / (rms / update_capping).clamp(min=1.0)
        delta = self._times(direction, remagnify)
        if weight_decay:
            delta.add_(self.value, alpha=weight_decay)
        params, states = self.params, self.states
        assert self.basis is not None, "factorize() comes first"
        torch._foreach_add_(params, list(delta.to(params[0].dtype).unbind(0)), alpha=-lr)
        torch._foreach_copy_([s["exp_avg"] for s in states], list(M.unbind(0)))
        torch._foreach_copy_([s["basis"] for s in states], list(self.basis.unbind(0)))


def _grad(factor: Tensor) -> Tensor:
    return factor.grad if factor.grad is not None else torch.zeros_like(factor)


def stack_state(states: list[dict], key: str) -> Tensor:
    """One optimizer-state tensor of every layer of a stack, stacked: (k, ...)."""
    return torch.stack([state[key] for state in states])
