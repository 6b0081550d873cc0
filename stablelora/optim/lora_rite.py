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

Implementation: all layers of equal shapes are stacked, so QR, pinv and eigh run batched, and
nothing waits on the device (no host-device synchronisation). The full-size unmagnified
gradient ``gbar`` is never formed: its Gram matrix ``pinv(R_Y)^T (G^T G) pinv(R_Y)`` gives
``V``, its norm (clip) and RMS (skipping), and ``Sbar = G (c pinv(R_Y) Q)`` enters ``M`` through
one fused ``baddbmm`` (c: the skip/clip factor). Each stack stays in its parameter's layout
(A rank-first), so every product writes a contiguous result.

Deviations from the reimplementation, all in degenerate cases only: eigenvalues ``lambda + rho``
are clamped at 0 before the square root (round-off can make them slightly negative, which in the
reference turns the whole factor's update into NaN and then 0); a layer whose whitening is not
finite (``eps = 0`` with a zero eigenvalue) gets a zero whitened gradient, as the reference's
``nan_to_num`` of the NaN product gives; a factor with a non-finite gradient is skipped (the
reference lets it turn ``V`` into NaN); a missing gradient counts as zero. ``balance_param``
(off by default in the reference) is not implemented.

Memory per layer: ``M`` and the previous basis ``U_old`` for each factor (like Adam's two
moments), plus two r x r second moments and two scalars; transient: the stacked factors,
gradients and states of one stack of layers at a time.

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
from stablelora.optim.factor_adamw import LoRAFactorAdamW, compute_dtype, stack_as
from stablelora.optim.pairs import LoRAPair


def bias_corrected_decay(beta: float, steps_done: float) -> float:
    """``beta (1 - beta^k) / (1 - beta^(k+1))``: an EMA with it needs no bias correction."""
    return beta * (1.0 - beta**steps_done) / (1.0 - beta ** (steps_done + 1.0))


def _sym(x: Tensor) -> Tensor:
    return (x + x.mT) / 2


def _trace(x: Tensor) -> Tensor:
    return x.diagonal(dim1=-2, dim2=-1).sum(-1)


# A stack of factors is kept in its parameters' own layout, so that every product writes a
# contiguous result: A's rank-first (k, r, n), B's rank-last (k, m, r). The algorithm is written
# rank-last; these three helpers apply a rank-last formula to either layout.


def _times(Y: Tensor, mat: Tensor, rank_first: bool) -> Tensor:
    """The rank-last product ``Y @ mat`` (mat (k, r, r)), in Y's layout."""
    return mat.mT @ Y if rank_first else Y @ mat


def _add_times(base: Tensor, Y: Tensor, mat: Tensor, rank_first: bool) -> Tensor:
    """``base + Y @ mat`` (rank-last), in Y's layout, as one fused ``baddbmm``."""
    return torch.baddbmm(base, mat.mT, Y) if rank_first else torch.baddbmm(base, Y, mat)


def _gram(Y: Tensor, rank_first: bool) -> Tensor:
    """``Y^T Y`` (rank-last), (k, r, r)."""
    return Y @ Y.mT if rank_first else Y.mT @ Y


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
            (key.steps_done, *self._unmagnify(key, members)) for key, members in stacks.items()
        ]

        # Global clip of all unmagnified gradients together: one scalar, no host sync.
        clip_scale = None
        if self.clip_unmagnified_grad > 0:
            device = layers[0][1].value.device
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
            self._whiten_and_update(A, B, steps_done=steps_done, clip_scale=clip_scale)

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
            value = stack_as(params, dtype)
            basis, triangular = torch.linalg.qr(value.mT if rank_first else value)
            factors.append(
                _FactorStack(
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
                other.triangular_pinv.mT @ _gram(own.grad, own.rank_first) @ other.triangular_pinv
            )
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
        transport_A = B.basis @ _stack_state(B.states, "basis").to(B.basis.dtype).mT
        transport_B = A.basis @ _stack_state(A.states, "basis").to(A.basis.dtype).mT
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
                     update_capping=0.0, apply_escape=False, **unused):  # fmt: skip
    return LoRARITE(
        [p for p in model.parameters() if p.requires_grad], pairs, rite_eps=rite_eps,
        clip_unmagnified_grad=clip_unmagnified_grad, update_skipping=update_skipping,
        update_capping=update_capping, apply_escape=apply_escape, lr=lr, betas=tuple(betas),
        eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused,
    )  # fmt: skip
