"""The feature-update decomposition of one optimizer step, as tensor functions: the terms
delta1, delta2, delta3 and dY of a LoRA layer's output change (:func:`feature_update_terms`,
the reference definition), their RMS without forming them (:func:`update_rms`, what the probe
measures), and the Adam direction behind gAZ (:func:`adam_directions`). The probe that
measures them in training, and the definitions: :mod:`stablelora.probes.gamma`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over the last two dimensions: (..., a, b) -> (...)."""
    return torch.linalg.vector_norm(x, dim=(-2, -1)) / math.sqrt(x.shape[-2] * x.shape[-1])


def product_norm(M: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """``||M @ N||_F`` over the last two dims, without forming ``M @ N``.

    M (..., m, r) and N (..., r, T) with a small inner size r: ``||MN||_F^2 = tr(M^T M N N^T)
    = sum((M^T M) * (N N^T))`` costs O(r^2 (m + T)) time and O(r^2) memory instead of
    O(m r T) and O(m T). The Gram matrices are in float64 (float32 on MPS, which has no
    float64): the sum of their products cancels when MN is much smaller than |M| |N|.
    """
    dtype = torch.float32 if M.device.type == "mps" else torch.float64
    M, N = M.to(dtype), N.to(dtype)
    gram_M = M.transpose(-2, -1) @ M  # (..., r, r)
    gram_N = N @ N.transpose(-2, -1)  # (..., r, r)
    return (gram_M * gram_N).sum(dim=(-2, -1)).clamp_min(0).sqrt()


def update_rms(
    A: torch.Tensor,
    B: torch.Tensor,
    A_new: torch.Tensor,
    B_new: torch.Tensor,
    Z: torch.Tensor,
    scale: float | torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The RMS of each term of :func:`feature_update_terms`, without forming the terms.

    Same arguments (``scale`` a number or a tensor of shape (...)); returns ``delta1``,
    ``delta2``, ``delta3``, ``dY`` and ``AZ``, each of shape (...), in float32. ``dY`` uses
    ``dY = s * ((B' - B) A' Z + B (A' - A) Z)``, the same update without the cancellation of
    two large products that ``B'A'Z - BAZ`` suffers at small learning rates.
    """
    Zt = Z.transpose(-2, -1)  # (..., n, T)
    AZ = A @ Zt  # (..., r, T)
    dAZ = (A_new - A) @ Zt  # (..., r, T)
    dB = B_new - B  # (..., m, r)
    m, T = B.shape[-2], Z.shape[-2]
    to_rms = abs(torch.as_tensor(scale, device=Z.device)) / math.sqrt(m * T)
    norms = {
        "delta1": product_norm(dB, AZ),
        "delta2": product_norm(B, dAZ),
        "delta3": product_norm(dB, dAZ),
        "dY": product_norm(torch.cat([dB, B], dim=-1), torch.cat([AZ + dAZ, dAZ], dim=-2)),
    }
    out = {q: (norm * to_rms).float() for q, norm in norms.items()}
    out["AZ"] = rms(AZ)
    return out


def feature_update_terms(
    A: torch.Tensor,
    B: torch.Tensor,
    A_new: torch.Tensor,
    B_new: torch.Tensor,
    Z: torch.Tensor,
    scale: float | torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The decomposition of one step's output change, in the dtype of the inputs.

    Args:
        A, A_new: (..., r, n), the down-projection before and after the step.
        B, B_new: (..., m, r), the up-projection before and after the step.
        Z: (..., T, n), T layer inputs as rows.
        scale: the LoRA scale s (a number, or a tensor that broadcasts against (..., m, T)).

    Leading dimensions, if any, index layers measured together. This is the reference
    definition; the probe measures the same RMS values with :func:`update_rms`, which never
    forms the (m, T) matrices.

    Returns:
        ``delta1``, ``delta2``, ``delta3``, ``dY``, each (..., m, T), and ``AZ`` (..., r, T).
        ``dY`` is computed directly as ``s * (B'A'Z - BAZ)``, so ``delta1 + delta2 + delta3 ==
        dY`` up to rounding is a real check of the decomposition.
    """
    Zt = Z.transpose(-2, -1)  # (..., n, T)
    AZ = A @ Zt  # (..., r, T)
    dAZ = (A_new - A) @ Zt  # (..., r, T)
    dB = B_new - B  # (..., m, r)
    return {
        "delta1": scale * (dB @ AZ),
        "delta2": scale * (B @ dAZ),
        "delta3": scale * (dB @ dAZ),
        "dY": scale * (B_new @ (A_new @ Zt) - B @ AZ),
        "AZ": AZ,
    }


def adam_directions(
    optimizer: torch.optim.Optimizer | None, params: Sequence[torch.Tensor]
) -> torch.Tensor | None:
    """The bias-corrected Adam directions ``m_hat / (sqrt(v_hat) + eps)`` of the last step of
    ``params`` (all of one shape), stacked in float32: (len(params), *shape). None unless the
    optimizer keeps Adam moments for every one of them."""
    if optimizer is None:
        return None
    states = [optimizer.state.get(p, {}) for p in params]
    if not all("exp_avg" in s and "exp_avg_sq" in s and "step" in s for s in states):
        return None
    wanted = {id(p) for p in params}
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"] if id(p) in wanted}
    groups = [group_of[id(p)] for p in params]
    steps = [float(s["step"]) for s in states]
    second = [
        s["max_exp_avg_sq"] if g.get("amsgrad") and "max_exp_avg_sq" in s else s["exp_avg_sq"]
        for s, g in zip(states, groups)
    ]
    shape = (-1,) + (1,) * params[0].ndim

    def per_param(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, device=params[0].device).view(shape)

    m_hat = torch.stack([s["exp_avg"] for s in states]).float() / per_param(
        [1 - g["betas"][0] ** t for g, t in zip(groups, steps)]
    )
    v_hat = torch.stack(second).float() / per_param(
        [1 - g["betas"][1] ** t for g, t in zip(groups, steps)]
    )
    return m_hat / (v_hat.sqrt() + per_param([g["eps"] for g in groups]))
