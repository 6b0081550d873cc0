"""Stable-LoRA: AdamW with an early, self-stopping shrink of every LoRA ``A`` factor.

Algorithm (Stable-LoRA, Wu et al., ICLR 2026, Algorithm 1), for every optimizer step t and
every LoRA layer with ``A`` of shape (r, n) and ``B`` of shape (m, r), each with a flag
``shrinking`` initialised True:

1. gradients are computed at the current, unshrunk ``A_t, B_t`` (by the caller);
2. if ``shrinking`` and ``||A_t||_F < (numel(A) / numel(B)) * ||B_t||_F`` (strict, B before
   this step's update), the flag becomes False for good and this step does not shrink;
   otherwise, while the flag is True, ``A_t <- (1 - shrink_ratio) * A_t``;
3. the ordinary AdamW step (decoupled weight decay, bias-corrected moments) on all
   parameters, with ``A`` already shrunk. The Adam moments are never shrunk.

The norms, the stop test and the shrink run batched over all layers with foreach kernels and
tensor-valued flags, so a step never compares one layer's norm in Python and never blocks on
the device: once every layer has stopped (learnt through a non-blocking copy on CUDA), the
shrink costs nothing at all.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import torch

from stablelora.optim.adamw_settings import ADAMW_DEFAULTS
from stablelora.optim.loraplus import check_loraplus_lr_ratio, loraplus_optimizer
from stablelora.optim.pairs import LoRAPair
from stablelora.optim.registry import AdamWSettings, register_optimizer, trainable_parameters

STOP_RULES = ("norm", "never", "steps:N")


class LayerShrink(TypedDict):
    """One layer's entry of :meth:`StableLoRA.shrink_state`."""

    shrinking: bool
    stop_step: int | None  # the step it stopped shrinking at, None while it shrinks


@dataclass(frozen=True)
class StopRule:
    """When a layer stops shrinking: ``norm`` (the paper), ``never``, or after ``steps`` steps."""

    kind: str
    steps: int = 0  # kind "steps" only

    @classmethod
    def parse(cls, rule: str | StopRule) -> StopRule:
        """Parse ``"norm"``, ``"never"`` or ``"steps:N"`` (N >= 0)."""
        if isinstance(rule, StopRule):
            return rule
        text = str(rule).strip()
        if text in ("norm", "never"):
            return cls(text)
        if text.startswith("steps:"):
            count = text.removeprefix("steps:")
            if count.isdigit():
                return cls("steps", int(count))
        raise ValueError(
            f"Unknown stop_rule {rule!r}: use 'norm' (the paper's rule), 'never' (shrink all run) "
            "or 'steps:N' (shrink for the first N steps), e.g. stop_rule='steps:200'."
        )

    def __str__(self) -> str:
        return f"steps:{self.steps}" if self.kind == "steps" else self.kind


def shrink_counts(state: dict[str, LayerShrink]) -> dict[str, float | int | None]:
    """``{"layers", "shrinking", "stopped", "median_stop_step"}`` of a
    :meth:`StableLoRA.shrink_state` (the median over the layers that stopped; None when none
    did)."""
    stops = [entry["stop_step"] for entry in state.values() if entry["stop_step"] is not None]
    shrinking = sum(bool(entry["shrinking"]) for entry in state.values())
    return {
        "layers": len(state),
        "shrinking": shrinking,
        "stopped": len(stops),
        "median_stop_step": statistics.median(stops) if stops else None,
    }


def check_shrink_ratio(shrink_ratio: float) -> float:
    """Return ``shrink_ratio`` as a float if it lies in [0, 1), else raise a ValueError."""
    if not isinstance(shrink_ratio, (int, float)) or not 0.0 <= float(shrink_ratio) < 1.0:
        raise ValueError(
            f"shrink_ratio must be in [0, 1) (A is multiplied by 1 - shrink_ratio each step), "
            f"got {shrink_ratio!r}; the paper uses 5e-4."
        )
    return float(shrink_ratio)


class _LayerGroup:
    """The layers whose A and B share one device and dtype: foreach kernels need that."""

    def __init__(self, indices: list[int], pairs: Sequence[LoRAPair]):
        self.indices = indices
        self.A = [pairs[i].A for i in indices]
        self.B = [pairs[i].B for i in indices]
        device, dtype = self.A[0].device, self.A[0].dtype
        # Compare norms at least in float32, and in float64 when the factors are float64.
        self.norm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.numel_ratio = torch.tensor(
            [pairs[i].numel_ratio for i in indices], dtype=self.norm_dtype, device=device
        )
        self.shrinking = torch.ones(len(indices), dtype=torch.bool, device=device)
        self.stop_step = torch.full((len(indices),), -1, dtype=torch.long, device=device)
        self.one = torch.ones((), dtype=dtype, device=device)


def _adamw_step(optimizer: torch.optim.AdamW) -> None:
    """AdamW's own step, without the hook wrapper torch puts on ``AdamW.step``: our ``step``
    is wrapped already, and step hooks must run once per step, not twice."""
    step: Any = torch.optim.AdamW.step  # a function, possibly torch's hook wrapper
    if getattr(step, "hooked", False):
        step = step.__wrapped__
    step(optimizer)


class StableLoRA(torch.optim.AdamW):
    """AdamW plus Stable-LoRA's shrink of the LoRA ``A`` factors (see the module docstring).

    Args:
        params: parameters or parameter groups, exactly as for ``torch.optim.AdamW`` (any
            grouping, e.g. LoRA+'s). Every ``A`` and ``B`` in ``lora_pairs`` must be among them.
        lora_pairs: the LoRA layers, from :func:`stablelora.find_lora_pairs`.
        shrink_ratio: lambda in ``A <- (1 - lambda) A``, in [0, 1). Paper default 5e-4.
        stop_rule: ``"norm"`` (paper), ``"never"`` (shrink every step) or ``"steps:N"``
            (shrink on steps 1..N, then stop).
        lr, betas, eps, weight_decay, foreach, fused, **adamw_kwargs: passed to AdamW.

    The per-layer flags and stop steps are part of :meth:`state_dict`, so a run resumed
    mid-shrink continues exactly where it stopped. A checkpoint written by another optimizer
    (e.g. LoRA's AdamW) has no shrink state: :meth:`load_state_dict` refuses it unless
    ``missing_shrink_state`` is set to ``"restart"``, which loads AdamW's state and starts the
    shrink fresh at the checkpoint's step (:meth:`restart_shrink`; recorded as
    ``shrink_restart_step``). It is an attribute rather than a constructor argument so that
    it stays out of the runner's optimizer options: a run folder belongs to one optimizer, so
    the runner never resumes across optimizers.
    """

    def __init__(
        self,
        params: Iterable,
        lora_pairs: Sequence[LoRAPair],
        *,
        shrink_ratio: float = 5e-4,
        stop_rule: str | StopRule = "norm",
        lr: float = ADAMW_DEFAULTS.lr,
        betas: tuple[float, float] = ADAMW_DEFAULTS.betas,
        eps: float = ADAMW_DEFAULTS.eps,
        weight_decay: float = ADAMW_DEFAULTS.weight_decay,
        foreach: bool | None = ADAMW_DEFAULTS.foreach,
        fused: bool | None = ADAMW_DEFAULTS.fused,
        **adamw_kwargs,
    ):
        self.shrink_ratio = check_shrink_ratio(shrink_ratio)
        self.stop_rule = StopRule.parse(stop_rule)
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            foreach=foreach,
            fused=fused,
            **adamw_kwargs,
        )
        self.lora_pairs = list(lora_pairs)
        if not self.lora_pairs:
            raise ValueError(
                "StableLoRA got no LoRA layers to shrink: apply LoRA first "
                "(stablelora.apply_lora) and pass stablelora.find_lora_pairs(model)."
            )
        optimized = {id(p) for group in self.param_groups for p in group["params"]}
        for pair in self.lora_pairs:
            if id(pair.A) not in optimized or id(pair.B) not in optimized:
                raise ValueError(
                    f"LoRA layer {pair.name!r} is not among the optimizer's parameters: pass "
                    "every trainable parameter (e.g. model.parameters()) as params."
                )
            if pair.A.dtype in (torch.float16, torch.bfloat16) and self.shrink_ratio > 0:
                warnings.warn(
                    f"LoRA factor A of {pair.name!r} is {pair.A.dtype}: a shrink of "
                    f"{self.shrink_ratio:g} per step is below its resolution. Keep adapters in "
                    "float32 (peft's default autocast_adapter_dtype=True) and use autocast.",
                    stacklevel=2,
                )
                break
        by_key: dict[tuple, list[int]] = {}
        for index, pair in enumerate(self.lora_pairs):
            by_key.setdefault((pair.A.device, pair.A.dtype), []).append(index)
        self._groups = [_LayerGroup(indices, self.lora_pairs) for indices in by_key.values()]
        # With a GradScaler, an overflow step must skip the shrink too: let the scaler skip
        # step() as a whole instead of handing the inf check to a fused kernel.
        self._step_supports_amp_scaling = False
        self.shrink_step = 0  # the run's optimizer step: step() calls, plus the resumed ones
        # The step the shrink started afresh at, from a checkpoint without shrink state.
        self.shrink_restart_step: int | None = None
        self._missing_shrink_state = "error"
        self._all_stopped = False
        self._pending_check: tuple[torch.Tensor, torch.cuda.Event] | None = None

    # ------------------------------------------------------------------ the algorithm
    @torch.no_grad()
    def step(self, closure=None):
        """Shrink the A factors that are still shrinking, then take the AdamW step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.shrink_()
        _adamw_step(self)
        return loss

    @torch.no_grad()
    def shrink_(self) -> None:
        """Step 2 of the algorithm for all layers at once (called by :meth:`step`)."""
        self.shrink_step += 1
        if self._all_stopped or self._poll_all_stopped():
            return
        keep = 1.0 - self.shrink_ratio
        rule = self.stop_rule
        shrunk_for = self.shrink_step - (self.shrink_restart_step or 0)  # steps:N counts these
        if rule.kind == "never" or (rule.kind == "steps" and shrunk_for <= rule.steps):
            for group in self._groups:
                torch._foreach_mul_(group.A, keep)
            return
        if rule.kind == "steps":  # the first step past N: every layer stops now
            for group in self._groups:
                group.stop_step.fill_(self.shrink_step)
                group.shrinking.fill_(False)
            self._all_stopped = True
            return
        for group in self._groups:
            norm_A = torch.stack(torch._foreach_norm(group.A)).to(group.norm_dtype)
            norm_B = torch.stack(torch._foreach_norm(group.B)).to(group.norm_dtype)
            stops_now = group.shrinking & (norm_A < group.numel_ratio * norm_B)
            group.stop_step.masked_fill_(stops_now, self.shrink_step)
            group.shrinking &= ~stops_now
            factors = torch.where(group.shrinking, group.one * keep, group.one)
            torch._foreach_mul_(group.A, list(factors.unbind()))
        self._queue_all_stopped_check()

    def _queue_all_stopped_check(self) -> None:
        any_shrinking = torch.stack([group.shrinking.any() for group in self._groups]).any()
        if any_shrinking.device.type == "cuda":
            # Read the answer a step later through pinned memory: no host-device sync.
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(any_shrinking, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending_check = (host, event)
        else:
            self._all_stopped = not bool(any_shrinking)

    def _poll_all_stopped(self) -> bool:
        if self._pending_check is not None and self._pending_check[1].query():
            self._all_stopped = not bool(self._pending_check[0])
            self._pending_check = None
        return self._all_stopped

    # ------------------------------------------------------------------ inspection
    def _gather(self, attribute: str) -> torch.Tensor:
        out = torch.empty(len(self.lora_pairs), dtype=getattr(self._groups[0], attribute).dtype)
        for group in self._groups:
            out[group.indices] = getattr(group, attribute).cpu()
        return out

    @property
    def layer_names(self) -> list[str]:
        """Names of the LoRA layers, in the order of :meth:`shrink_state`."""
        return [pair.name for pair in self.lora_pairs]

    def shrink_state(self) -> dict[str, LayerShrink]:
        """Per layer: ``{"shrinking": bool, "stop_step": int or None}`` (one host sync)."""
        shrinking, stop_step = self._gather("shrinking"), self._gather("stop_step")
        return {
            name: {"shrinking": bool(s), "stop_step": int(t) if t >= 0 else None}
            for name, s, t in zip(self.layer_names, shrinking.tolist(), stop_step.tolist())
        }

    # ------------------------------------------------------------------ records protocol
    def record_metrics(self) -> dict[str, float]:
        """Logged by the runner on every logging step (one host sync)."""
        shrinking = self._gather("shrinking")
        return {
            "shrink/num_shrinking": int(shrinking.sum()),
            "shrink/fraction_shrinking": float(shrinking.float().mean()),
        }

    def record_summary(self) -> dict:
        """Added by the runner to ``summary.json``: ``shrink`` (per layer, see
        :meth:`shrink_state`) and ``shrink_layers`` (how many layers are still shrinking, how
        many stopped, and the median stop step of those that did), plus, once the shrink
        restarted from a checkpoint without shrink state, ``shrink_restart_step``."""
        state = self.shrink_state()
        summary: dict[str, Any] = {"shrink": state, "shrink_layers": shrink_counts(state)}
        if self.shrink_restart_step is not None:
            summary["shrink_restart_step"] = self.shrink_restart_step
        return summary

    def record_layers(self) -> dict[str, dict[str, float | None]]:
        """Per layer, logged by the feature probe as ``lora/<layer>/<key>``."""
        return {
            name: {"shrinking": float(entry["shrinking"]), "stop_step": entry["stop_step"]}
            for name, entry in self.shrink_state().items()
        }

    # ------------------------------------------------------------------ checkpointing
    @property
    def missing_shrink_state(self) -> str:
        """What :meth:`load_state_dict` does with a checkpoint that has no shrink state:
        ``"error"`` (the default: a ValueError) or ``"restart"`` (:meth:`restart_shrink` at the
        checkpoint's step, the largest AdamW step count among its parameters)."""
        return self._missing_shrink_state

    @missing_shrink_state.setter
    def missing_shrink_state(self, value: str) -> None:
        if value not in ("error", "restart"):
            raise ValueError(
                f"missing_shrink_state must be 'error' or 'restart', got {value!r}: 'restart' "
                "starts the shrink fresh when a checkpoint has no Stable-LoRA shrink state."
            )
        self._missing_shrink_state = value

    def restart_shrink(self, step: int) -> None:
        """Start the shrink afresh at the run's optimizer step ``step``: every layer shrinks
        again, stop steps count on from ``step`` and ``steps:N`` shrinks N more steps."""
        self.shrink_step = self.shrink_restart_step = int(step)
        for group in self._groups:
            group.shrinking.fill_(True)
            group.stop_step.fill_(-1)
        self._pending_check = None
        self._all_stopped = False

    def state_dict(self) -> dict:
        """AdamW's state dict plus ``"stable_lora"``: the step count, flags and stop steps."""
        state = super().state_dict()
        state["stable_lora"] = {
            "shrink_step": self.shrink_step,
            "layer_names": self.layer_names,
            "shrinking": self._gather("shrinking"),
            "stop_step": self._gather("stop_step"),
            "shrink_ratio": self.shrink_ratio,
            "stop_rule": str(self.stop_rule),
            "restart_step": self.shrink_restart_step,
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load AdamW's state and the shrink flags, matched by layer name; a state without
        shrink flags only with ``missing_shrink_state = "restart"`` (class docstring)."""
        state_dict = dict(state_dict)
        shrink = state_dict.pop("stable_lora", None)
        if shrink is None and self.missing_shrink_state == "error":
            # Loading AdamW's half alone would restart the shrink at step 0 of a run that is
            # further on, and count its stop steps from there: never without being asked.
            raise ValueError(
                "This checkpoint was written by another optimizer, e.g. LoRA's AdamW (it has no "
                "Stable-LoRA shrink state): resume with the optimizer that wrote it, or set "
                "optimizer.missing_shrink_state = 'restart' before resuming to start the shrink "
                "fresh at the checkpoint's step."
            )
        if shrink is not None and list(shrink["layer_names"]) != self.layer_names:
            raise ValueError(
                "The checkpoint's LoRA layers differ from this optimizer's: resume with the same "
                "model, target_modules and rank as the run that saved it."
            )
        super().load_state_dict(state_dict)
        if shrink is None:
            steps = [int(state["step"]) for state in self.state.values() if "step" in state]
            self.restart_shrink(max(steps, default=0))
            return
        self.shrink_step = int(shrink["shrink_step"])
        self.shrink_restart_step = shrink.get("restart_step")  # absent: an older checkpoint
        for group in self._groups:
            group.shrinking.copy_(torch.as_tensor(shrink["shrinking"])[group.indices])
            group.stop_step.copy_(torch.as_tensor(shrink["stop_step"])[group.indices])
        self._pending_check = None
        self._all_stopped = self.stop_rule.kind != "never" and not bool(
            torch.as_tensor(shrink["shrinking"]).any()
        )


def _check_options(options: dict) -> None:
    check_shrink_ratio(options["shrink_ratio"])
    StopRule.parse(options["stop_rule"])
    check_loraplus_lr_ratio(options["loraplus_lr_ratio"], required=False)


@register_optimizer("stable_lora", forwards_to=StableLoRA, check=_check_options)
def _build_stable_lora(model, pairs, adamw: AdamWSettings, *, loraplus_lr_ratio=None, **options):
    if loraplus_lr_ratio is not None:  # Stable-LoRA + LoRA+: LoRA+'s parameter groups
        return loraplus_optimizer(
            model, StableLoRA, adamw, loraplus_lr_ratio, lora_pairs=pairs, **options
        )
    return StableLoRA(trainable_parameters(model), pairs, **options, **adamw.kwargs())
