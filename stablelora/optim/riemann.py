"""Riemannian-preconditioned AdamW for LoRA (Zhang & Pilanci, ICML 2024, arXiv 2402.02347).

For every LoRA layer ``W = W0 + s * B @ A`` with ``A`` of shape (r, n) and ``B`` of shape
(m, r), each factor's gradient is preconditioned by the damped inverse Gram matrix of the
*other* factor before it enters the Adam moments (the paper's scaled AdamW)::

    g~_A = (B^T B + reg * I_r)^-1 @ g_A      (r, r) @ (r, n)
    g~_B = g_B @ (A A^T + reg * I_r)^-1      (m, r) @ (r, r)

With ``reg = 0`` a step of scaled gradient descent projects the full fine-tuning gradient on the
tangent space of the rank-r manifold, so it does not depend on how ``B @ A`` is factored.

Variants:

- default (peft's semantics): both preconditioners come from the factors before the step
  (Jacobi), then torch's AdamW formulas with bias correction and the decoupled weight decay
  ``p *= 1 - lr * wd`` before the Adam step.
- ``authors_variant=True`` (pilancilab's ``AdamWr`` as run in their Mistral/GPT-2 code): B's
  preconditioner is built from the *already updated* A (Gauss-Seidel), the Adam step has no
  bias correction (the first step is about ``3.16 * lr`` per coordinate), and weight decay is
  applied after the Adam step.
- ``scaled_gd=True`` (pilancilab's ``SGDr``): ``p <- p * (1 - lr * wd) - lr * g~``, Jacobi.

Every trainable parameter that is not a LoRA factor (classifier head, biases, DoRA magnitude
vectors) gets the plain ``torch.optim.AdamW`` step of its parameter group, in every variant.

Why not ``peft.optimizers.create_riemannian_optimizer``: peft 0.21.2's helper reproduces the
numbers of a worked example for the Jacobi/bias-corrected variant (``tests/test_baselines.py``
checks this), but it inverts each layer's Gram matrices with its own ``pinv`` (an SVD launch per
factor per layer), overwrites the caller's ``.grad`` in place, and has neither the authors'
variant nor scaled GD. Here the Gram matrices of all layers are stacked and factorised with one
batched Cholesky per (rank, dtype, device), and the preconditioned gradients never replace
``.grad``.

Failure rule (pilancilab): where ``Gram + reg * I`` is not positive definite (e.g. ``reg = 0``
and ``B = 0`` at init), that layer's preconditioner is the identity.

State: Adam's ``step``, ``exp_avg``, ``exp_avg_sq`` per parameter under torch's names (scaled GD
keeps only ``step``), so :meth:`state_dict` resumes exactly; the preconditioners are recomputed
every step from the factors and need no state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from stablelora.optim.adamw_settings import ADAMW_DEFAULTS
from stablelora.optim.factor_adamw import (
    LoRAFactorAdamW,
    by_layout,
    compute_dtype,
    stack_as,
    tall_gram,
    tall_times,
)
from stablelora.optim.pairs import LoRAPair
from stablelora.optim.registry import AdamWSettings, register_optimizer, trainable_parameters

# ---------------------------------------------------------------------------- preconditioner


def damped_gram_inverses(grams: Sequence[Tensor], reg: float) -> list[Tensor]:
    """``(gram + reg * I)^-1`` for stacks of Gram matrices, batched.

    Args:
        grams: tensors of shape (k_i, r_i, r_i), symmetric positive semi-definite.
        reg: the damping delta >= 0.

    Returns:
        Tensors like ``grams``. All stacks with the same (r, dtype, device) are concatenated
        and factorised by ONE batched Cholesky in float64 (r x r, so the cost is nothing, and
        a tiny ``reg`` such as 1e-6 stays well conditioned). Where a matrix is not positive
        definite its inverse is replaced by the identity (pilancilab's fallback), without a
        host-device sync.
    """
    inverses: list[Tensor | None] = [None] * len(grams)
    by_kind: dict[tuple, list[int]] = {}
    for index, gram in enumerate(grams):
        by_kind.setdefault((gram.shape[-1], gram.dtype, gram.device), []).append(index)
    for (rank, dtype, device), indices in by_kind.items():
        batch = torch.cat([grams[i] for i in indices]).to(torch.float64)
        batch.diagonal(dim1=-2, dim2=-1).add_(reg)
        cholesky, info = torch.linalg.cholesky_ex(batch)
        failed = (info != 0)[:, None, None]
        identity = torch.eye(rank, dtype=torch.float64, device=device)
        # A failed factor holds garbage (zeros on its diagonal): invert the identity instead.
        inverse = torch.cholesky_inverse(torch.where(failed, identity, cholesky))
        inverse = torch.where(failed, identity, inverse).to(dtype)
        for i, block in zip(indices, inverse.split([grams[i].shape[0] for i in indices])):
            inverses[i] = block
    return inverses  # type: ignore[return-value]


def riemannian_gradients(
    grads_A: Sequence[Tensor],
    factors_B: Sequence[Tensor],
    grads_B: Sequence[Tensor],
    factors_A: Sequence[Tensor],
    reg: float,
    stacked: bool | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Preconditioned gradients of LoRA factors, batched over layers.

    Args:
        grads_A: gradients of A factors, each (r, n).
        factors_B: the B factor (m, r) of the same layer as each entry of ``grads_A``.
        grads_B: gradients of B factors, each (m, r).
        factors_A: the A factor (r, n) of the same layer as each entry of ``grads_B``.
        reg: the damping delta.
        stacked: the layout of the products: True stacks the layers of equal shapes (one
            ``bmm`` per stack: accelerators), False multiplies per layer (no copies: CPU);
            None (default) stacks when any tensor is off the CPU. Same result up to rounding.

    Returns:
        ``(g~_A, g~_B)``: ``(B^T B + reg I)^-1 g_A`` and ``g_B (A A^T + reg I)^-1``, with the
        shapes and dtypes of the gradients. The Gram matrices of all layers are inverted
        together (one batched Cholesky).
    """
    if stacked is None:
        tensors = [*grads_A, *factors_B, *grads_B, *factors_A]
        stacked = any(t.device.type != "cpu" for t in tensors)
    if stacked:
        return _stacked_riemannian_gradients(grads_A, factors_B, grads_B, factors_A, reg)
    # CPU: per-layer products (no stacked copies of the factors or gradients: a stack costs a full
    # copy, more than the launch of one small product per layer); only the r x r Gram matrices
    # are stacked, for one batched Cholesky. B is tall (m, r): see ``tall_gram``.
    grams = [tall_gram(B.to(compute_dtype(B.dtype))).unsqueeze(0) for B in factors_B]
    for A in factors_A:
        A = A.to(compute_dtype(A.dtype))
        grams.append((A @ A.mT).unsqueeze(0))  # (1, r, r)
    inverses = damped_gram_inverses(grams, reg)

    out_A = [
        (inverse[0] @ grad.to(inverse.dtype)).to(grad.dtype)  # left-multiply
        for inverse, grad in zip(inverses[: len(grads_A)], grads_A)
    ]
    out_B = [
        tall_times(grad.to(inverse.dtype), inverse[0]).to(grad.dtype)  # right-multiply
        for inverse, grad in zip(inverses[len(grads_A) :], grads_B)
    ]
    return out_A, out_B  # type: ignore[return-value]


def _stacked_riemannian_gradients(grads_A, factors_B, grads_B, factors_A, reg):
    """:func:`riemannian_gradients` with the layers of equal shapes stacked and multiplied by
    one ``bmm`` each (accelerators, where a launch costs more than the copy of a stack)."""
    # Layers whose (gradient, other factor) shapes agree are stacked; Gram matrices (k, r, r).
    a_side = by_layout(grads_A, factors_B)
    b_side = by_layout(grads_B, factors_A)
    grams = []
    for indices in a_side:
        B = stack_as([factors_B[i] for i in indices], compute_dtype(factors_B[indices[0]].dtype))
        grams.append(B.mT @ B)  # (k, m, r) -> (k, r, r)
    for indices in b_side:
        A = stack_as([factors_A[i] for i in indices], compute_dtype(factors_A[indices[0]].dtype))
        grams.append(A @ A.mT)  # (k, r, n) -> (k, r, r)
    inverses = damped_gram_inverses(grams, reg)

    # One stack of gradients at a time, so that the transient memory stays near 1x the factors.
    out_A: list[Tensor | None] = [None] * len(grads_A)
    out_B: list[Tensor | None] = [None] * len(grads_B)
    for slot, indices in enumerate(a_side):
        inverse = inverses[slot]
        stacked = stack_as([grads_A[i] for i in indices], inverse.dtype)  # (k, r, n)
        for i, grad in zip(indices, torch.bmm(inverse, stacked).unbind(0)):  # left-multiply
            out_A[i] = grad.to(grads_A[i].dtype)
    for slot, indices in enumerate(b_side, start=len(a_side)):
        inverse = inverses[slot]
        stacked = stack_as([grads_B[i] for i in indices], inverse.dtype)  # (k, m, r)
        for i, grad in zip(indices, torch.bmm(stacked, inverse).unbind(0)):  # right-multiply
            out_B[i] = grad.to(grads_B[i].dtype)
    return out_A, out_B  # type: ignore[return-value]


# ---------------------------------------------------------------------------- updates


def _adam_update_(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    decay_after_step: bool,
) -> None:
    """Adam with decoupled weight decay on ``params`` from (preconditioned) ``grads``, foreach.

    ``exp_avg = lerp(exp_avg, g, 1 - beta1)``, ``exp_avg_sq = beta2 exp_avg_sq + (1-beta2) g^2``,
    ``p -= lr_t * exp_avg / (sqrt(exp_avg_sq / bc2) + eps)`` with ``lr_t = lr / bc1`` and the
    bias corrections ``bc = 1 - beta^t`` when ``correct_bias``, else ``lr_t = lr``, ``bc2 = 1``.
    Weight decay ``p *= 1 - lr * wd`` before the Adam step (torch) or after it (pilancilab).
    On CPU the torch variant runs torch's own fused AdamW kernel (one pass over memory).
    """
    beta1, beta2 = betas
    steps = [state["step"] for state in states]
    exp_avgs = [state["exp_avg"] for state in states]
    exp_avg_sqs = [state["exp_avg_sq"] for state in states]
    torch._foreach_add_(steps, 1.0)
    if (
        correct_bias
        and not decay_after_step
        and _fused_kernel_applies(params, grads, exp_avgs, exp_avg_sqs, steps)
    ):
        # torch AdamW's own fused CPU kernel: the same formulas in one pass over memory instead
        # of seven (the result differs from the foreach path by float rounding only).
        torch._fused_adamw_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            lr=float(lr),
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=eps,
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )
        return
    if weight_decay and not decay_after_step:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if correct_bias:
        # lr/bc1 m / (sqrt(v)/sqrt(bc2) + eps) = lr sqrt(bc2)/bc1 m / (sqrt(v) + eps sqrt(bc2)):
        # v's bias correction folds into two scalars (one pass over v fewer than torch's).
        counts = [float(step) for step in steps]
        if len(set(counts)) == 1:  # the usual case: one scalar for all (cheaper launches)
            root_bc2 = math.sqrt(1.0 - beta2 ** counts[0])
            torch._foreach_add_(denom, eps * root_bc2)
            step_sizes: float | list[float] = -lr * root_bc2 / (1.0 - beta1 ** counts[0])
        else:
            roots_bc2 = [math.sqrt(1.0 - beta2**t) for t in counts]
            torch._foreach_add_(denom, [eps * root for root in roots_bc2])
            step_sizes = [-lr * root / (1.0 - beta1**t) for root, t in zip(roots_bc2, counts)]
    else:
        torch._foreach_add_(denom, eps)
        step_sizes = -lr
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
    if weight_decay and decay_after_step:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)


def _fused_kernel_applies(*tensor_lists: list[Tensor]) -> bool:
    """Whether ``torch._fused_adamw_`` can take these lists: CPU, contiguous, one float dtype."""
    params = tensor_lists[0]
    if not params or not hasattr(torch, "_fused_adamw_"):
        return False
    dtype = params[0].dtype
    if dtype not in (torch.float32, torch.float64):
        return False
    for tensors in tensor_lists[:-1]:  # the last list: the step counts (CPU float32 scalars)
        for t in tensors:
            if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
                return False
    return all(s.device.type == "cpu" and s.dim() == 0 for s in tensor_lists[-1])


def _scaled_gd_update_(params, grads, states, *, lr: float, weight_decay: float) -> None:
    """``p <- p * (1 - lr * wd) - lr * g~`` (pilancilab SGDr: weight decay first)."""
    torch._foreach_add_([state["step"] for state in states], 1.0)
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, grads, alpha=-lr)


def _grads(params: list[Tensor]) -> list[Tensor]:
    """The gradients of ``params`` (the caller kept only factors that have one)."""
    return [p.grad for p in params if p.grad is not None]


class RiemannianAdamW(LoRAFactorAdamW):
    """AdamW whose LoRA-factor gradients are Riemannian-preconditioned (module docstring).

    Args:
        params: all trainable parameters or parameter groups, as for ``torch.optim.AdamW``.
        lora_pairs: the LoRA layers (:func:`stablelora.find_lora_pairs`); pairing is by module.
        reg: the damping delta added to the Gram matrices' diagonal. The default is the
            pilancilab class default; peft uses 1e-2 and the Mistral GLUE table up to 100 (with
            a large reg the method degenerates to AdamW: the inverse Gram tends to I / reg).
        authors_variant: pilancilab's ``AdamWr``: Gauss-Seidel B preconditioner (from the
            updated A), no bias correction, weight decay after the Adam step.
        scaled_gd: pilancilab's ``SGDr`` for the factors instead of Adam (Jacobi).
        layout: ``"auto"``, ``"per_layer"`` or ``"stacked"``: how the preconditioner products
            run (:class:`~stablelora.optim.factor_adamw.LoRAFactorAdamW`).
        lr, betas, eps, weight_decay, foreach, fused, **adamw_kwargs: AdamW's, for every
            parameter (factors included: ``betas``/``eps`` of a factor's group drive its Adam).
    """

    _STATE_KEY = "riemann"

    def __init__(
        self,
        params: Iterable,
        lora_pairs: Sequence[LoRAPair],
        *,
        reg: float = 1e-6,
        authors_variant: bool = False,
        scaled_gd: bool = False,
        layout: str = "auto",
        lr: float = ADAMW_DEFAULTS.lr,
        betas: tuple[float, float] = ADAMW_DEFAULTS.betas,
        eps: float = ADAMW_DEFAULTS.eps,
        weight_decay: float = ADAMW_DEFAULTS.weight_decay,
        foreach: bool | None = ADAMW_DEFAULTS.foreach,
        fused: bool | None = ADAMW_DEFAULTS.fused,
        **adamw_kwargs,
    ):
        if not (isinstance(reg, (int, float)) and math.isfinite(reg) and reg >= 0):
            raise ValueError(f"reg (the damping delta) must be a finite number >= 0, got {reg!r}.")
        if authors_variant and scaled_gd:
            raise ValueError(
                "authors_variant (pilancilab AdamWr) and scaled_gd (pilancilab SGDr) are two "
                "different optimizers: choose one."
            )
        self.reg = float(reg)
        self.authors_variant = bool(authors_variant)
        self.scaled_gd = bool(scaled_gd)
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
            "reg": self.reg,
            "authors_variant": self.authors_variant,
            "scaled_gd": self.scaled_gd,
        }

    def _step_lora_factors(self) -> None:
        with_grad_A = [pair for pair in self.lora_pairs if pair.A.grad is not None]
        with_grad_B = [pair for pair in self.lora_pairs if pair.B.grad is not None]
        A_params = [pair.A for pair in with_grad_A]
        B_params = [pair.B for pair in with_grad_B]
        stacked = {"auto": None, "stacked": True, "per_layer": False}[self.layout]
        if self.authors_variant:
            # Gauss-Seidel: B's preconditioner must see A after its update.
            grads_A, _ = riemannian_gradients(
                _grads(A_params),
                [pair.B for pair in with_grad_A],
                [],
                [],
                self.reg,
                stacked,
            )
            self._update(A_params, grads_A)
            _, grads_B = riemannian_gradients(
                [],
                [],
                _grads(B_params),
                [pair.A for pair in with_grad_B],
                self.reg,
                stacked,
            )
            self._update(B_params, grads_B)
            return
        grads_A, grads_B = riemannian_gradients(
            _grads(A_params),
            [pair.B for pair in with_grad_A],
            _grads(B_params),
            [pair.A for pair in with_grad_B],
            self.reg,
            stacked,
        )
        self._update(A_params + B_params, grads_A + grads_B)

    def _update(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """Adam (or scaled GD) with each parameter's group hyper-parameters."""
        group_of = self._group_index()
        by_group: dict[int, list[int]] = {}
        for index, param in enumerate(params):
            by_group.setdefault(group_of[id(param)], []).append(index)
        for group_index, indices in by_group.items():
            group = self.param_groups[group_index]
            members = [params[i] for i in indices]
            states = [self._factor_state(p) for p in members]
            member_grads = [grads[i] for i in indices]
            if self.scaled_gd:
                _scaled_gd_update_(
                    members,
                    member_grads,
                    states,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                )
            else:
                _adam_update_(
                    members,
                    member_grads,
                    states,
                    lr=group["lr"],
                    betas=group["betas"],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    correct_bias=not self.authors_variant,
                    decay_after_step=self.authors_variant,
                )

    def _factor_state(self, param: Tensor) -> dict:
        state = self.state[param]
        if not state:
            # torch's AdamW names and dtypes, so a checkpoint reads like AdamW's.
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if not self.scaled_gd:
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state


@register_optimizer("riemann", forwards_to=RiemannianAdamW)
def _build_riemann(model, pairs, adamw: AdamWSettings, **options):
    return RiemannianAdamW(trainable_parameters(model), pairs, **options, **adamw.kwargs())
