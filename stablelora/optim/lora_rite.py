"""LoRA-RITE: transformation-invariant adaptive LoRA optimizer (Yen et al., ICLR 2025).

Follows the PyTorch reimplementation of the authors (gkevinyen5418/LoRA-RITE, ``lora_rite.py``)
as specified in baselines.md section 2, in the peft layout. Per LoRA layer ``W = W0 + s B A``
write the factors rank-last, ``L = A^T`` (n, r) and ``R = B`` (m, r), and ``G_L = g_A^T``,
``G_R = g_B``. One step:

Pass 1, every layer:
    ``L = U_L R_L``, ``R = U_R R_R`` (reduced QR; U orthonormal, R_* upper-triangular r x r);
    unmagnified gradients ``gbar_L = G_L pinv(R_R)``, ``gbar_R = G_R pinv(R_L)`` (B = 0 gives
    ``gbar_L = 0``: A does not move on the first step); update skipping: a factor whose
    ``RMS(gbar) > update_skipping`` gets ``gbar = 0``.
Between the passes: a global clip, over all layers, of the unmagnified gradients to norm
    ``clip_unmagnified_grad``.
Pass 2, every layer and factor X in {L, R} (the "other" factor Y supplies the basis):
    ``P = U_Y^T U_Y,old`` (basis change; U_old = 0 at step 0, so P = 0);
    ``V~ = sym(P V P^T)``; with ``apply_escape`` the escaped mass
    ``rho <- beta2' (rho + min(max_i(lambda_i(V) - lambda_i(V~))^+, (tr V - tr V~)^+))``;
    ``V <- sym(beta2' V~ + (1 - beta2') gbar^T gbar / rows)``;
    ``Sbar = gbar E diag(1 / (sqrt(lambda + rho) + eps)) E^T`` for ``V = E diag(lambda) E^T``;
    ``M <- beta1' M P^T + (1 - beta1') Sbar`` (optionally capped to RMS ``update_capping``);
    ``X <- X - lr (M pinv(R_Y)^T + wd X)``.
``beta' = beta (1 - beta^k) / (1 - beta^(k+1))`` folds Adam's bias correction into the decay
(k = steps done so far; beta'(0) = 0).

Because ``gbar`` and ``M pinv(R)^T`` only see the factors through their bases, the update of
``B A`` is the same for every factorisation ``(M^-1 A, B M)`` (tested over 20 steps).

Implementation: the r x r algebra (pinv, eigh, moments V) of all layers of equal shapes runs
batched, and nothing waits on an accelerator (no host-device synchronisation; on CPU one cheap
check of finiteness). The full-size work (QR, products with r x r matrices) runs per layer on
the tensors themselves: stacking them would copy every factor, gradient and state each step.
The full-size unmagnified gradient ``gbar`` is never formed: its Gram matrix
``pinv(R_Y)^T (G^T G) pinv(R_Y)`` gives ``V``, its norm (clip) and RMS (skipping), and
``Sbar = G (c pinv(R_Y) Q)`` enters ``M`` through one in-place ``addmm_`` (c: the skip/clip
factor); the factor update ``X <- (1 - lr wd) X - lr M pinv(R_Y)^T`` is one ``addmm_`` on the
parameter. Each tensor stays in its parameter's layout (A rank-first), so every product writes
a contiguous result; a tall B (m, r) is multiplied on CPU as an (m/2, 2r) view
(``factor_adamw.tall_times``), which BLAS runs several times faster.

Deviations from the reimplementation, all in degenerate cases only: eigenvalues ``lambda + rho``
are clamped at 0 before the square root (round-off can make them slightly negative, which in the
reference turns the whole factor's update into NaN and then 0); a layer whose whitening is not
finite (``eps = 0`` with a zero eigenvalue) gets a zero whitened gradient, as the reference's
``nan_to_num`` of the NaN product gives; a factor with a non-finite gradient is skipped (the
reference lets it turn ``V`` into NaN); a missing gradient counts as zero. ``balance_param``
(off by default in the reference) is not implemented.

Memory per layer: ``M`` and the previous basis ``U_old`` for each factor (like Adam's two
moments), plus two r x r second moments and two scalars; transient: the new bases (kept
between the passes, about 1x the factors) and one layer's moment at a time.

Other trainable parameters (classifier head, biases, DoRA magnitudes) get plain AdamW. With
the global clip on, the reference trains with ``max_grad_norm = 0`` (LLM-Adapters); the
paper set weight decay to 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from stablelora.optim import register_optimizer
from stablelora.optim.factor_adamw import (
    LoRAFactorAdamW,
    block_diagonal,
    can_pair_rows,
    compute_dtype,
    paired_view,
    stack_as,
    tall_gram,
)
from stablelora.optim.pairs import LoRAPair


def bias_corrected_decay(beta: float, steps_done: float) -> float:
    """``beta (1 - beta^k) / (1 - beta^(k+1))``: an EMA with it needs no bias correction."""
    return beta * (1.0 - beta**steps_done) / (1.0 - beta ** (steps_done + 1.0))


def _sym(x: Tensor) -> Tensor:
    return (x + x.mT) / 2


def _trace(x: Tensor) -> Tensor:
    return x.diagonal(dim1=-2, dim2=-1).sum(-1)


# The algorithm is written rank-last; A is kept rank-first (r, n), B rank-last (m, r).


# Helpers of the stacked path (accelerators), in each stack's layout.


def _times(Y: Tensor, mat: Tensor, rank_first: bool) -> Tensor:
    """Stacked path: the rank-last product ``Y @ mat`` (mat (k, r, r)), in Y's layout."""
    return mat.mT @ Y if rank_first else Y @ mat


def _add_times(base: Tensor, Y: Tensor, mat: Tensor, rank_first: bool) -> Tensor:
    """``base + Y @ mat`` (rank-last), in Y's layout, as one fused ``baddbmm``."""
    return torch.baddbmm(base, mat.mT, Y) if rank_first else torch.baddbmm(base, Y, mat)


def _stacked_gram(Y: Tensor, rank_first: bool) -> Tensor:
    """``Y^T Y`` (rank-last) of a stack, (k, r, r)."""
    return Y @ Y.mT if rank_first else Y.mT @ Y


def _gram(Y: Tensor, rank_first: bool) -> Tensor:
    """``Y^T Y`` (rank-last), (k, r, r)."""
    return Y @ Y.mT if rank_first else tall_gram(Y)


def escaped_mass(V_old: Tensor, V_new: Tensor) -> Tensor:
    """Second-moment mass lost by the basis projection, per layer of a stack (k, r, r) -> (k,).

    ``min(max(0, max_i(lambda_i(V_old) - lambda_i(V_new))), max(0, tr V_old - tr V_new))`` with
    the eigenvalues sorted ascending and paired by index.
    """
    eigen_drop = (torch.linalg.eigvalsh(V_old) - torch.linalg.eigvalsh(V_new)).amax(-1)
    trace_drop = _trace(V_old) - _trace(V_new)
    return torch.minimum(eigen_drop.clamp(min=0), trace_drop.clamp(min=0))


def inverse_sqrt(V: Tensor, rho: Tensor, eps: float) -> Tensor:
    """``E diag(1 / (sqrt(lambda + rho) + eps)) E^T`` for a stack of symmetric V (k, r, r).

    A layer whose result is not finite (``eps = 0`` and a zero eigenvalue) gets 0: the reference
    maps the resulting NaN update to 0 with ``nan_to_num``.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(V)
    scale = 1.0 / ((eigenvalues + rho[:, None]).clamp(min=0).sqrt() + eps)
    result = _sym((eigenvectors * scale[:, None, :]) @ eigenvectors.mT)
    finite = torch.isfinite(result).all(dim=-1).all(dim=-1)
    return torch.where(finite[:, None, None], result, 0.0)


class _StackKey(NamedTuple):
    """What the layers of one stack share: shapes, dtype, device, step count, groups."""

    shape_A: tuple
    shape_B: tuple
    dtype: torch.dtype
    device: torch.device
    steps_done: float
    group_A: int
    group_B: int


@dataclass
class _FactorStack:
    """One factor (all the A's, or all the B's) of a stack of same-shape layers.

    The full-size tensors are kept per layer (stacking them would cost a copy of every factor,
    gradient and state per step); only the r x r algebra is stacked.

    Attributes:
        params, states, group: the factors, their optimizer states and parameter group.
        rank_first: True for A (each (r, n)), False for B ((m, r)).
        values, grads: each layer's factor X and its gradient, in the compute dtype (>= float32).
        bases: each layer's orthonormal basis U of the rank-last factor ``X = U R`` (reduced
            QR), stored rank-first, (r, rows): QR returns it in that memory order.
        triangular: R, (k, r, r); ``triangular_pinv`` its pseudo-inverse (set in pass 1).
        basis_change: ``U^T U_old`` (k, r, r), the new basis against the previous step's.
        unmagnified_gram: ``gbar^T gbar`` (k, r, r) of this factor's unmagnified gradient
            ``gbar = G pinv(R_other)``; ``keep``: (k,) False where the update is skipped.
    """

    params: list[Tensor]
    states: list[dict]
    group: dict
    rank_first: bool
    values: list[Tensor]
    grads: list[Tensor]
    bases: list[Tensor]
    triangular: Tensor
    basis_change: Tensor
    triangular_pinv: Tensor | None = None
    unmagnified_gram: Tensor | None = None
    keep: Tensor | None = None

    @property
    def rows(self) -> int:
        return self.values[0].shape[-1] if self.rank_first else self.values[0].shape[-2]

    @property
    def dtype(self) -> torch.dtype:
        return self.triangular.dtype

    @property
    def device(self) -> torch.device:
        return self.triangular.device

    def squared_norm(self) -> Tensor:
        """``||gbar||_F^2`` per layer, (k,)."""
        return _trace(self.unmagnified_gram)


@dataclass
class _StackedFactor:
    """Like :class:`_FactorStack`, with the full-size tensors stacked (accelerators: few launches).

    Attributes:
        params, states, group: the factors, their optimizer states and parameter group.
        rank_first: True for A (stacks are (k, r, n)), False for B ((k, m, r)).
        value, grad: the stacked factor X and its gradient, in the compute dtype (>= float32).
        basis: the orthonormal basis U of the rank-last factor ``X = U R`` (reduced QR),
            stored rank-first, (k, r, rows): QR returns it in that memory order.
        triangular: R, (k, r, r); ``triangular_pinv`` its pseudo-inverse (set in pass 1).
        unmagnified_gram: ``gbar^T gbar`` (k, r, r) of this factor's unmagnified gradient
            ``gbar = G pinv(R_other)``; ``keep``: (k,) False where the update is skipped.
    """

    params: list[Tensor]
    states: list[dict]
    group: dict
    rank_first: bool
    value: Tensor
    grad: Tensor
    basis: Tensor
    triangular: Tensor
    triangular_pinv: Tensor | None = None
    unmagnified_gram: Tensor | None = None
    keep: Tensor | None = None

    @property
    def rows(self) -> int:
        return self.value.shape[-1] if self.rank_first else self.value.shape[-2]

    @property
    def device(self) -> torch.device:
        return self.value.device

    def squared_norm(self) -> Tensor:
        """``||gbar||_F^2`` per layer, (k,)."""
        return _trace(self.unmagnified_gram)


class LoRARITE(LoRAFactorAdamW):
    """LoRA-RITE on the LoRA factors, AdamW on everything else (see the module docstring).

    Args:
        params: all trainable parameters or parameter groups, as for ``torch.optim.AdamW``.
        lora_pairs: the LoRA layers (:func:`stablelora.find_lora_pairs`); pairing is by module.
        rite_eps: epsilon of the whitening, ``1 / (sqrt(lambda) + rite_eps)``. Reference 1e-6.
        clip_unmagnified_grad: global clip norm of the unmagnified gradients (0 = off). 1.0.
        update_skipping: zero a factor's unmagnified gradient whose RMS exceeds this (0 = off).
            1.0.
        update_capping: cap the RMS of the first moment used in the update (0 = off). 0.0.
        apply_escape: add the escaped mass rho to the eigenvalues. False.
        lr, betas, weight_decay: per parameter group, for the factors as for AdamW's params
            (the reference's defaults: betas (0.9, 0.999), weight decay 0).
        eps, foreach, fused, **adamw_kwargs: torch AdamW's, for the non-factor parameters.

    State per factor (in :meth:`state_dict`): ``step``; ``exp_avg`` (the first moment, the
    factor's shape); ``second_moment`` (r, r); ``basis`` (the orthonormal basis U of the factor
    before the last step, stored as r orthonormal rows: (r, n) for A, (r, m) for B; zeros
    before the first step); ``escaped_mass`` (a scalar). The algebra runs in at least float32,
    the state is stored in the factor's dtype: keep adapters in float32 (peft's default).
    """

    _STATE_KEY = "lora_rite"

    def __init__(
        self,
        params: Iterable,
        lora_pairs: Sequence[LoRAPair],
        *,
        rite_eps: float = 1e-6,
        clip_unmagnified_grad: float = 1.0,
        update_skipping: float = 1.0,
        update_capping: float = 0.0,
        apply_escape: bool = False,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        fused: bool | None = None,
        **adamw_kwargs,
    ):
        for name, value in [
            ("rite_eps", rite_eps),
            ("clip_unmagnified_grad", clip_unmagnified_grad),
            ("update_skipping", update_skipping),
            ("update_capping", update_capping),
        ]:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (0 = off), got {value!r}.")
        self.rite_eps = float(rite_eps)
        self.clip_unmagnified_grad = float(clip_unmagnified_grad)
        self.update_skipping = float(update_skipping)
        self.update_capping = float(update_capping)
        self.apply_escape = bool(apply_escape)
        super().__init__(
            params, lora_pairs, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            foreach=foreach, fused=fused, **adamw_kwargs,
        )  # fmt: skip

    def _options(self) -> dict:
        return {
            "rite_eps": self.rite_eps,
            "clip_unmagnified_grad": self.clip_unmagnified_grad,
            "update_skipping": self.update_skipping,
            "update_capping": self.update_capping,
            "apply_escape": self.apply_escape,
        }

    # ------------------------------------------------------------------ state
    def _factor_state(self, factor: Tensor, rank: int, rank_first: bool) -> dict:
        state = self.state[factor]
        if not state:
            rows = factor.shape[1] if rank_first else factor.shape[0]
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(factor, memory_format=torch.contiguous_format)
            state["second_moment"] = factor.new_zeros(rank, rank)
            state["basis"] = factor.new_zeros(rank, rows)  # U_old = 0: P = 0 on the first step
            state["escaped_mass"] = factor.new_zeros(())
        return state

    # ------------------------------------------------------------------ the algorithm
    def _step_lora_factors(self) -> None:
        pairs = [p for p in self.lora_pairs if p.A.grad is not None or p.B.grad is not None]
        if not pairs:
            return
        group_of = self._group_index()
        stacks: dict[_StackKey, list[LoRAPair]] = {}
        for pair in pairs:
            rank = pair.A.shape[0]
            state_A = self._factor_state(pair.A, rank, rank_first=True)
            self._factor_state(pair.B, rank, rank_first=False)
            key = _StackKey(
                tuple(pair.A.shape), tuple(pair.B.shape), pair.A.dtype, pair.A.device,
                float(state_A["step"]), group_of[id(pair.A)], group_of[id(pair.B)],
            )  # fmt: skip
            stacks.setdefault(key, []).append(pair)
        layers = [
            (
                key.steps_done,
                *(self._unmagnify if key.device.type == "cpu" else self._unmagnify_stacked)(
                    key, members
                ),
            )
            for key, members in stacks.items()
        ]

        # Global clip of all unmagnified gradients together: one scalar, no host sync.
        clip_scale = None
        if self.clip_unmagnified_grad > 0:
            device = layers[0][1].device
            squared = [
                torch.where(f.keep, f.squared_norm(), 0.0).sum().to(device, torch.float64)
                for _, A, B in layers
                for f in (A, B)
            ]
            norm = torch.stack(squared).sum().sqrt()
            clip_scale = torch.where(
                norm > self.clip_unmagnified_grad, self.clip_unmagnified_grad / norm, 1.0
            )
        for steps_done, A, B in layers:
            whiten_and_update = (
                self._whiten_and_update
                if isinstance(A, _FactorStack)
                else self._whiten_and_update_stacked
            )
            whiten_and_update(A, B, steps_done=steps_done, clip_scale=clip_scale)

    def _unmagnify(
        self, key: _StackKey, pairs: list[LoRAPair]
    ) -> tuple[_FactorStack, _FactorStack]:
        """Pass 1 for a stack of layers: QR bases, and the unmagnified gradients' statistics."""
        factors = []
        for params, group, rank_first in [
            ([p.A for p in pairs], self.param_groups[key.group_A], True),
            ([p.B for p in pairs], self.param_groups[key.group_B], False),
        ]:
            dtype = compute_dtype(params[0].dtype)
            values = [p.to(dtype) for p in params]
            states = [self.state[p] for p in params]
            bases, triangulars, changes = [], [], []
            for value, state in zip(values, states):  # per layer: a stack would copy the factors
                basis, triangular = torch.linalg.qr(value.mT if rank_first else value)
                bases.append(basis.mT)
                triangulars.append(triangular)
                # U^T U_old now, while the new basis is in cache (the state still holds U_old).
                changes.append(basis.mT @ state["basis"].to(dtype).mT)
            factors.append(
                _FactorStack(
                    params=params,
                    states=states,
                    group=group,
                    rank_first=rank_first,
                    values=values,
                    grads=[_grad(p).to(dtype) for p in params],
                    bases=bases,
                    triangular=torch.stack(triangulars),
                    basis_change=torch.stack(changes),
                )
            )
        A, B = factors
        # pinv, not inverse: B = 0 gives pinv(R_B) = 0, hence no update of A on step 1.
        A.triangular_pinv, B.triangular_pinv = torch.linalg.pinv(
            torch.cat([A.triangular, B.triangular])
        ).chunk(2)
        for own, other in [(A, B), (B, A)]:
            # gbar = G pinv(R_other) is never formed: its Gram, norm and RMS are r x r algebra.
            grams = torch.stack([_gram(grad, own.rank_first) for grad in own.grads])
            own.unmagnified_gram = other.triangular_pinv.mT @ grams @ other.triangular_pinv
            squared = own.squared_norm()
            # A non-finite gradient is skipped too (the reference lets it poison V).
            own.keep = torch.isfinite(squared)
            if self.update_skipping > 0:
                rms = (squared / (own.rows * own.triangular.shape[-1])).sqrt()
                own.keep &= rms <= self.update_skipping
        return A, B

    def _whiten_and_update(
        self, A: _FactorStack, B: _FactorStack, *, steps_done: float, clip_scale: Tensor | None
    ) -> None:
        """Pass 2 for a stack of layers: moments in the new bases, then the factor updates."""
        # A's statistics live in B's basis and vice versa (gbar_A = G_A pinv(R_B) = s G^T U_B),
        # so A's moments move with P = U_B^T U_B,old. Both are read before a new basis is stored.
        transport_A = B.basis_change
        transport_B = A.basis_change
        self._update_factor(A, B, transport_A, steps_done, clip_scale)
        self._update_factor(B, A, transport_B, steps_done, clip_scale)

    def _update_factor(
        self, own: _FactorStack, other: _FactorStack, projection: Tensor, steps_done: float,
        clip_scale: Tensor | None,
    ) -> None:  # fmt: skip
        """Second moment, whitening, first moment and update of one factor (rank-last maths).

        With ``c`` the skip/clip factor of each layer, the whitened gradient
        ``Sbar = c gbar Q = G (c pinv(R_other) Q)``, so the first-moment update is
        ``M <- beta1' M P^T + (1 - beta1') G T`` with ``T = c pinv(R_other) Q``: two products
        of each full-size moment/gradient with r x r matrices.
        """
        dtype, rank_first = own.dtype, own.rank_first
        beta1, beta2 = (bias_corrected_decay(b, steps_done) for b in own.group["betas"])
        scale = own.keep.to(dtype)
        if clip_scale is not None:
            scale = scale * clip_scale.to(own.device, dtype)
        second = torch.where(own.keep[:, None, None], own.unmagnified_gram, 0.0)
        second = _sym(scale[:, None, None] ** 2 * second / own.rows)

        V = _stack_state(own.states, "second_moment").to(dtype)
        rho = torch.stack([s["escaped_mass"] for s in own.states]).to(dtype)
        V_transported = torch.nan_to_num(_sym(projection @ V @ projection.mT))
        if self.apply_escape:
            rho = beta2 * (rho + escaped_mass(V, V_transported))
        else:
            rho = torch.zeros_like(rho)
        V = _sym(beta2 * V_transported + (1.0 - beta2) * second)
        whitening = (
            scale[:, None, None] * other.triangular_pinv @ inverse_sqrt(V, rho, self.rite_eps)
        )
        transport = beta1 * projection.mT  # M <- M @ transport + G @ gradient_map (rank-last)
        gradient_map = (1.0 - beta1) * whitening
        remagnify = other.triangular_pinv.mT  # delta = M @ remagnify (rank-last)

        # A skipped layer has a zero gradient map, so its G only needs zeroing where it is not
        # finite (NaN times 0). On CPU that is known for free; elsewhere mask every skipped layer.
        if own.device.type == "cpu":
            zero_grad = (~torch.isfinite(own.squared_norm())).tolist()
        else:
            zero_grad = None

        # The per-layer (r, r) operands, prepared for all layers at once. In the rank-first layout
        # (A) the rank-last ``Y @ mat`` is ``mat^T @ Y``; tall contiguous B's are multiplied as
        # (m/2, 2r) views by block-diagonal (2r, 2r) matrices (see ``factor_adamw.tall_times``).
        paired = not rank_first and all(
            can_pair_rows(param, grad, state["exp_avg"])
            for param, grad, state in zip(own.params, own.grads, own.states)
        )
        operands = [transport, gradient_map, remagnify]
        if rank_first:
            operands = [mat.mT for mat in operands]
        elif paired:
            operands = [block_diagonal(mat) for mat in operands]
        transports, maps, remagnifies = (mat.unbind(0) for mat in operands)

        lr, weight_decay = own.group["lr"], own.group["weight_decay"]
        decay = 1.0 - lr * weight_decay if weight_decay else 1.0
        for i, (param, state, grad) in enumerate(zip(own.params, own.states, own.grads)):
            if zero_grad is None:
                grad = torch.where(own.keep[i], grad, 0.0)
            elif zero_grad[i]:
                grad = torch.zeros_like(grad)
            M = state["exp_avg"].to(dtype)
            # In place on the fresh product: an out-of-place addmm would first copy it.
            if rank_first:
                M = (transports[i] @ M).addmm_(maps[i], grad)
            elif paired:
                M = (paired_view(M) @ transports[i]).addmm_(paired_view(grad), maps[i])
            else:
                M = (M @ transports[i]).addmm_(grad, maps[i])
            remagnify_i = remagnifies[i]
            if self.update_capping > 0:
                rms = M.square().mean().sqrt()
                remagnify_i = remagnify_i / (rms / self.update_capping).clamp(min=1.0)
            if param.dtype == dtype:
                # X <- X - lr (M remagnify + wd X) = (1 - lr wd) X - lr M remagnify, one addmm
                if rank_first:
                    param.addmm_(remagnify_i, M, beta=decay, alpha=-lr)
                else:
                    (paired_view(param) if paired else param).addmm_(
                        M, remagnify_i, beta=decay, alpha=-lr
                    )
            else:
                delta = remagnify_i @ M if rank_first else M @ remagnify_i
                delta = delta.view(param.shape)
                if weight_decay:
                    delta.add_(own.values[i], alpha=weight_decay)
                param.add_(delta.to(param.dtype), alpha=-lr)
            state["exp_avg"] = M.view(param.shape).to(param.dtype)
            state["basis"] = own.bases[i].to(param.dtype).contiguous()

        states = own.states
        torch._foreach_copy_([s["second_moment"] for s in states], list(V.unbind(0)))
        torch._foreach_copy_([s["escaped_mass"] for s in states], list(rho.unbind(0)))
        torch._foreach_add_([s["step"] for s in states], 1.0)

    # ------------------------------------------------------------------ stacked path
    # On an accelerator, launches cost more than copies: the full-size tensors of a stack are
    # stacked and every product runs batched (the same algorithm as the per-layer CPU path).

    def _unmagnify_stacked(
        self, key: _StackKey, pairs: list[LoRAPair]
    ) -> tuple[_StackedFactor, _StackedFactor]:
        """Pass 1 for a stack of layers: QR bases, and the unmagnified gradients' statistics."""
        factors = []
        for params, group, rank_first in [
            ([p.A for p in pairs], self.param_groups[key.group_A], True),
            ([p.B for p in pairs], self.param_groups[key.group_B], False),
        ]:
            dtype = compute_dtype(params[0].dtype)
            value = stack_as(params, dtype)
            basis, triangular = torch.linalg.qr(value.mT if rank_first else value)
            factors.append(
                _StackedFactor(
                    params=params,
                    states=[self.state[p] for p in params],
                    group=group,
                    rank_first=rank_first,
                    value=value,
                    grad=stack_as([_grad(p) for p in params], dtype),
                    basis=basis.mT,
                    triangular=triangular,
                )
            )
        A, B = factors
        # pinv, not inverse: B = 0 gives pinv(R_B) = 0, hence no update of A on step 1.
        A.triangular_pinv, B.triangular_pinv = torch.linalg.pinv(
            torch.cat([A.triangular, B.triangular])
        ).chunk(2)
        for own, other in [(A, B), (B, A)]:
            # gbar = G pinv(R_other) is never formed: its Gram, norm and RMS are r x r algebra.
            own.unmagnified_gram = (
                other.triangular_pinv.mT
                @ _stacked_gram(own.grad, own.rank_first)
                @ other.triangular_pinv
            )
            squared = own.squared_norm()
            # A non-finite gradient is skipped too (the reference lets it poison V).
            own.keep = torch.isfinite(squared)
            if self.update_skipping > 0:
                rms = (squared / (own.rows * own.triangular.shape[-1])).sqrt()
                own.keep &= rms <= self.update_skipping
        return A, B

    def _whiten_and_update_stacked(
        self, A: _StackedFactor, B: _StackedFactor, *, steps_done: float, clip_scale: Tensor | None
    ) -> None:
        """Pass 2 for a stack of layers: moments in the new bases, then the factor updates."""
        # A's statistics live in B's basis and vice versa (gbar_A = G_A pinv(R_B) = s G^T U_B),
        # so A's moments move with P = U_B^T U_B,old. Both are read before a new basis is stored.
        transport_A = B.basis @ _stack_state(B.states, "basis").to(B.basis.dtype).mT
        transport_B = A.basis @ _stack_state(A.states, "basis").to(A.basis.dtype).mT
        self._update_factor_stacked(A, B, transport_A, steps_done, clip_scale)
        self._update_factor_stacked(B, A, transport_B, steps_done, clip_scale)

    def _update_factor_stacked(
        self, own: _StackedFactor, other: _StackedFactor, projection: Tensor, steps_done: float,
        clip_scale: Tensor | None,
    ) -> None:  # fmt: skip
        """Second moment, whitening, first moment and update of one factor (rank-last maths).

        With ``c`` the skip/clip factor of each layer, the whitened gradient
        ``Sbar = c gbar Q = G (c pinv(R_other) Q)``, so the first-moment update is
        ``M <- beta1' M P^T + (1 - beta1') G T`` with ``T = c pinv(R_other) Q``: two products
        of full-size stacks with r x r matrices.
        """
        dtype, rank_first = own.value.dtype, own.rank_first
        beta1, beta2 = (bias_corrected_decay(b, steps_done) for b in own.group["betas"])
        scale = own.keep.to(dtype)
        if clip_scale is not None:
            scale = scale * clip_scale.to(own.value.device, dtype)
        grad = own.grad.masked_fill_(~own.keep[:, None, None], 0.0)  # no NaN through G @ T
        second = torch.where(own.keep[:, None, None], own.unmagnified_gram, 0.0)
        second = _sym(scale[:, None, None] ** 2 * second / own.rows)

        V = _stack_state(own.states, "second_moment").to(dtype)
        M = _stack_state(own.states, "exp_avg").to(dtype)
        rho = torch.stack([s["escaped_mass"] for s in own.states]).to(dtype)
        V_transported = torch.nan_to_num(_sym(projection @ V @ projection.mT))
        if self.apply_escape:
            rho = beta2 * (rho + escaped_mass(V, V_transported))
        else:
            rho = torch.zeros_like(rho)
        V = _sym(beta2 * V_transported + (1.0 - beta2) * second)
        whitening = (
            scale[:, None, None] * other.triangular_pinv @ inverse_sqrt(V, rho, self.rite_eps)
        )
        M = _add_times(_times(M, beta1 * projection.mT, rank_first), grad,
                       (1.0 - beta1) * whitening, rank_first)  # fmt: skip
        direction = M
        if self.update_capping > 0:
            rms = M.square().mean(dim=(-2, -1), keepdim=True).sqrt()
            direction = M / (rms / self.update_capping).clamp(min=1.0)
        delta = _times(direction, other.triangular_pinv.mT, rank_first)  # re-magnify
        if own.group["weight_decay"]:
            delta.add_(own.value, alpha=own.group["weight_decay"])

        params, states = own.params, own.states
        torch._foreach_add_(params, list(delta.to(params[0].dtype).unbind(0)),
                            alpha=-own.group["lr"])  # fmt: skip
        torch._foreach_copy_([s["exp_avg"] for s in states], list(M.unbind(0)))
        torch._foreach_copy_([s["second_moment"] for s in states], list(V.unbind(0)))
        torch._foreach_copy_([s["basis"] for s in states], list(own.basis.unbind(0)))
        torch._foreach_copy_([s["escaped_mass"] for s in states], list(rho.unbind(0)))
        torch._foreach_add_([s["step"] for s in states], 1.0)


def _grad(factor: Tensor) -> Tensor:
    return factor.grad if factor.grad is not None else torch.zeros_like(factor)


def _stack_state(states: list[dict], key: str) -> Tensor:
    return torch.stack([state[key] for state in states])


@register_optimizer("lora_rite")
def _build_lora_rite(model, pairs, *, lr, weight_decay, betas, eps, foreach, fused,
                     rite_eps=1e-6, clip_unmagnified_grad=1.0, update_skipping=1.0,
                     update_capping=0.0, apply_escape=False):  # fmt: skip
    return LoRARITE(
        [p for p in model.parameters() if p.requires_grad], pairs, rite_eps=rite_eps,
        clip_unmagnified_grad=clip_unmagnified_grad, update_skipping=update_skipping,
        update_capping=update_capping, apply_escape=apply_escape, lr=lr, betas=tuple(betas),
        eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused,
    )  # fmt: skip
