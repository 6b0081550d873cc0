"""LoRA-RITE: transformation-invariant adaptive LoRA optimizer (Yen et al., ICLR 2025).

Follows the PyTorch reimplementation of the authors (gkevinyen5418/LoRA-RITE, ``lora_rite.py``)
(Algorithm 1 of arXiv 2410.20625), in the peft layout. Per LoRA layer ``W = W0 + s B A``
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

Implementation: one algorithm over two memory layouts. Layers of equal shapes (and dtype,
device, step count and parameter groups) form a stack; the r x r algebra of a stack (pinv,
eigh, moments V, the global clip) runs batched, and nothing waits on an accelerator (no
host-device synchronisation; on CPU one cheap check of finiteness). Only the full-size work
(QR, the Gram matrix of the gradients, products of the moments, gradients and factors with
r x r matrices) depends on the layout (:mod:`stablelora.optim.lora_rite_layouts`):

- ``"per_layer"`` (the default on CPU): every full-size tensor stays where it is and each
  product runs per layer, in its parameter's layout (A rank-first), so every product writes a
  contiguous result; a stack would copy every factor, gradient and state each step. A tall
  contiguous B (m, r) is multiplied as an (m/2, 2r) view (``factor_adamw.tall_times``), which
  BLAS runs several times faster.
- ``"stacked"`` (the default on accelerators, where a launch costs more than a copy): the
  full-size tensors of a stack are stacked and every product is one batched ``bmm``.

The full-size unmagnified gradient ``gbar`` is never formed: its Gram matrix
``pinv(R_Y)^T (G^T G) pinv(R_Y)`` gives ``V``, its norm (clip) and RMS (skipping), and
``Sbar = G (c pinv(R_Y) Q)`` enters ``M`` through one fused multiply-add (c: the skip/clip
factor); the factor update ``X <- (1 - lr wd) X - lr M pinv(R_Y)^T`` reads M once.

Deviations from the reimplementation, all in degenerate cases only: eigenvalues ``lambda + rho``
are clamped at 0 before the square root (round-off can make them slightly negative, which in the
reference turns the whole factor's update into NaN and then 0); a layer whose whitening is not
finite (``eps = 0`` with a zero eigenvalue) gets a zero whitened gradient, as the reference's
``nan_to_num`` of the NaN product gives; a factor with a non-finite gradient is skipped (the
reference lets it turn ``V`` into NaN); a missing gradient counts as zero. ``balance_param``
(off by default in the reference) is not implemented.

Memory per layer: ``M`` and the previous basis ``U_old`` for each factor (like Adam's two
moments), plus two r x r second moments and two scalars; transient: the new bases (kept
between the passes, about 1x the factors) and one layer's moment at a time (stacked layout: a
stack's copies of its factors, gradients and moments).

Other trainable parameters (classifier head, biases, DoRA magnitudes) get plain AdamW. With
the global clip on, the reference trains with ``max_grad_norm = 0`` (LLM-Adapters); the
paper set weight decay to 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor

from stablelora.optim.adamw_settings import ADAMW_DEFAULTS
from stablelora.optim.factor_adamw import LoRAFactorAdamW, compute_dtype
from stablelora.optim.lora_rite_layouts import PerLayerFactor, StackedFactor, stack_state
from stablelora.optim.pairs import LoRAPair
from stablelora.optim.registry import AdamWSettings, register_optimizer, trainable_parameters


def bias_corrected_decay(beta: float, steps_done: float) -> float:
    """``beta (1 - beta^k) / (1 - beta^(k+1))``: an EMA with it needs no bias correction."""
    return beta * (1.0 - beta**steps_done) / (1.0 - beta ** (steps_done + 1.0))


def _sym(x: Tensor) -> Tensor:
    return (x + x.mT) / 2


def _trace(x: Tensor) -> Tensor:
    return x.diagonal(dim1=-2, dim2=-1).sum(-1)


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


# ---------------------------------------------------------------------------- the algorithm


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
class _Factor:
    """One factor (all the A's, or all the B's) of a stack of same-shape layers.

    Attributes:
        tensors: its full-size tensors, in one of the two layouts.
        group: the factors' parameter group.
        triangular: R of ``X = U R``, (k, r, r); ``triangular_pinv`` its pseudo-inverse.
        basis_change: ``U^T U_old`` (k, r, r), the new basis against the previous step's.
        unmagnified_gram: ``gbar^T gbar`` (k, r, r) of this factor's unmagnified gradient
            ``gbar = G pinv(R_other)``; ``keep``: (k,) False where the update is skipped.
    """

    tensors: PerLayerFactor | StackedFactor
    group: dict
    triangular: Tensor
    basis_change: Tensor
    # Set by pass 1 (LoRARITE._unmagnify) once both factors of the stack are factorized.
    triangular_pinv: Tensor = field(init=False)
    unmagnified_gram: Tensor = field(init=False)
    keep: Tensor = field(init=False)

    @property
    def states(self) -> list[dict]:
        return self.tensors.states

    @property
    def rows(self) -> int:
        shape = self.tensors.params[0].shape
        return shape[-1] if self.tensors.rank_first else shape[-2]

    def squared_norm(self) -> Tensor:
        """``||gbar||_F^2`` per layer, (k,)."""
        return _trace(self.unmagnified_gram)


#: LoRA-RITE's defaults: :data:`~stablelora.optim.adamw_settings.ADAMW_DEFAULTS` but no weight
#: decay, as the reference (the authors' PyTorch reimplementation, gkevinyen5418/LoRA-RITE:
#: ``LoRARite(..., weight_decay=0.0)``) and the paper's runs (App. A.1). Only a user who
#: builds ``LoRARITE`` directly gets it: ``create_optimizer`` and the runner always pass a
#: weight decay (``optim.weight_decay``, 0.01 for every method).
RITE_DEFAULTS = replace(ADAMW_DEFAULTS, weight_decay=0.0)


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
        layout: ``"auto"``, ``"per_layer"`` or ``"stacked"``: how the full-size work runs
            (module docstring; :class:`~stablelora.optim.factor_adamw.LoRAFactorAdamW`).
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
        layout: str = "auto",
        lr: float = RITE_DEFAULTS.lr,
        betas: tuple[float, float] = RITE_DEFAULTS.betas,
        eps: float = RITE_DEFAULTS.eps,
        weight_decay: float = RITE_DEFAULTS.weight_decay,
        foreach: bool | None = RITE_DEFAULTS.foreach,
        fused: bool | None = RITE_DEFAULTS.fused,
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
            params,
            lora_pairs,
            layout=layout,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            foreach=foreach,
            fused=fused,
            **adamw_kwargs,
        )

    def _options(self) -> dict:
        return {
            "rite_eps": self.rite_eps,
            "clip_unmagnified_grad": self.clip_unmagnified_grad,
            "update_skipping": self.update_skipping,
            "update_capping": self.update_capping,
            "apply_escape": self.apply_escape,
        }

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
                tuple(pair.A.shape),
                tuple(pair.B.shape),
                pair.A.dtype,
                pair.A.device,
                float(state_A["step"]),
                group_of[id(pair.A)],
                group_of[id(pair.B)],
            )
            stacks.setdefault(key, []).append(pair)
        layers = [
            (key.steps_done, *self._unmagnify(key, members)) for key, members in stacks.items()
        ]

        # Global clip of all unmagnified gradients together: one scalar, no host sync.
        clip_scale = None
        if self.clip_unmagnified_grad > 0:
            device = layers[0][1].triangular.device
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
            # A's statistics live in B's basis and vice versa (gbar_A = G_A pinv(R_B) =
            # s G^T U_B), so A's moments move with P = U_B^T U_B,old (computed in pass 1).
            self._update_factor(A, B, B.basis_change, steps_done, clip_scale)
            self._update_factor(B, A, A.basis_change, steps_done, clip_scale)

    def _unmagnify(self, key: _StackKey, pairs: list[LoRAPair]) -> tuple[_Factor, _Factor]:
        """Pass 1 for a stack of layers: QR bases, and the unmagnified gradients' statistics."""
        layout = StackedFactor if self._stacked(key.device) else PerLayerFactor
        factors = []
        for params, group, rank_first in [
            ([p.A for p in pairs], self.param_groups[key.group_A], True),
            ([p.B for p in pairs], self.param_groups[key.group_B], False),
        ]:
            states = [self.state[p] for p in params]
            tensors = layout(params, states, rank_first, compute_dtype(params[0].dtype))
            triangular, basis_change = tensors.factorize()
            factors.append(_Factor(tensors, group, triangular, basis_change))
        A, B = factors
        # pinv, not inverse: B = 0 gives pinv(R_B) = 0, hence no update of A on step 1.
        A.triangular_pinv, B.triangular_pinv = torch.linalg.pinv(
            torch.cat([A.triangular, B.triangular])
        ).chunk(2)
        for own, other in [(A, B), (B, A)]:
            # gbar = G pinv(R_other) is never formed: its Gram, norm and RMS are r x r algebra.
            own.unmagnified_gram = (
                other.triangular_pinv.mT @ own.tensors.gradient_gram() @ other.triangular_pinv
            )
            squared = own.squared_norm()
            # A non-finite gradient is skipped too (the reference lets it poison V).
            own.keep = torch.isfinite(squared)
            if self.update_skipping > 0:
                rms = (squared / (own.rows * own.triangular.shape[-1])).sqrt()
                own.keep &= rms <= self.update_skipping
        return A, B

    def _update_factor(
        self,
        own: _Factor,
        other: _Factor,
        projection: Tensor,
        steps_done: float,
        clip_scale: Tensor | None,
    ) -> None:
        """Pass 2 for one factor of a stack: second moment, whitening, first moment, update.

        With ``c`` the skip/clip factor of each layer, the whitened gradient
        ``Sbar = c gbar Q = G (c pinv(R_other) Q)``, so the first-moment update is
        ``M <- beta1' M P^T + (1 - beta1') G T`` with ``T = c pinv(R_other) Q``: two products
        of each full-size moment/gradient with r x r matrices, run by the layout.
        """
        dtype = own.triangular.dtype
        beta1, beta2 = (bias_corrected_decay(b, steps_done) for b in own.group["betas"])
        scale = own.keep.to(dtype)
        if clip_scale is not None:
            scale = scale * clip_scale.to(scale.device, dtype)
        second = torch.where(own.keep[:, None, None], own.unmagnified_gram, 0.0)
        second = _sym(scale[:, None, None] ** 2 * second / own.rows)

        V = stack_state(own.states, "second_moment").to(dtype)
        rho = stack_state(own.states, "escaped_mass").to(dtype)
        V_transported = torch.nan_to_num(_sym(projection @ V @ projection.mT))
        if self.apply_escape:
            rho = beta2 * (rho + escaped_mass(V, V_transported))
        else:
            rho = torch.zeros_like(rho)
        V = _sym(beta2 * V_transported + (1.0 - beta2) * second)
        whitening = (
            scale[:, None, None] * other.triangular_pinv @ inverse_sqrt(V, rho, self.rite_eps)
        )
        own.tensors.update(
            beta1 * projection.mT,
            (1.0 - beta1) * whitening,
            other.triangular_pinv.mT,
            keep=own.keep,
            finite=torch.isfinite(own.squared_norm()),
            lr=own.group["lr"],
            weight_decay=own.group["weight_decay"],
            update_capping=self.update_capping,
        )
        states = own.states
        torch._foreach_copy_([s["second_moment"] for s in states], list(V.unbind(0)))
        torch._foreach_copy_([s["escaped_mass"] for s in states], list(rho.unbind(0)))
        torch._foreach_add_([s["step"] for s in states], 1.0)


@register_optimizer("lora_rite", forwards_to=LoRARITE)
def _build_lora_rite(model, pairs, adamw: AdamWSettings, **options):
    return LoRARITE(trainable_parameters(model), pairs, **options, **adamw.kwargs())
