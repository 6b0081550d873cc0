"""Feature-update instrumentation: measure the paper's delta1, delta2, delta3 in training.

For a LoRA layer ``W = W0 + s * B @ A`` with ``A`` (r, n), ``B`` (m, r) and layer input ``Z``
(n, T) (T token positions of the step's batch as columns; the code keeps them as rows, (T, n)),
one optimizer step takes
``A, B`` to ``A', B'`` (Stable-LoRA's shrink of ``A`` included) and changes the LoRA output by::

    dY     = s * (B'A' - BA) Z  =  delta1 + delta2 + delta3      (exactly)
    delta1 = s * (B' - B) A Z            B moves, A fixed
    delta2 = s * B (A' - A) Z            A moves, B fixed
    delta3 = s * (B' - B)(A' - A) Z      both move

This is the Stable-LoRA paper's numbering. The LoRA+ paper numbers delta1 and delta2 the
other way round (its delta1 is our delta2).

Each is summarised by its RMS over output coordinates and tokens, ``sqrt(mean(x**2))``, and
by its gamma-value ``log(rms) / log(n)`` with n the layer's input width: the exponent of
width at which the magnitude would sit if its prefactor were one. A single width only gives
this proxy; the exponent itself is the slope of log(rms) against log(n) over a width sweep
(``experiments/width_sweep.py``, ``analysis/width_fit.py``). gamma is ``-inf`` when the RMS
is exactly zero (delta2 on step 1, where B = 0).

Usage (the contract with the training loop)::

    probe = FeatureProbe(model, find_lora_pairs(model), first_steps=200, every=50)
    for step in range(1, num_steps + 1):        # optimizer steps, counted from 1
        probe.arm(step)                         # before the step's first forward
        ... forward / backward, one or several micro-batches ...
        probe.before_update()                   # right before optimizer.step()
        optimizer.step()
        metrics = probe.after_update(optimizer) # {} on steps that do not log
        optimizer.zero_grad()                   # before or after after_update: either works
    probe.close()

What is measured, and how:

- Z is the input ``x`` of the peft LoRA layer (a forward pre-hook on that module), that is the
  input *before* LoRA dropout; with dropout the gradient saw a dropped-out copy of it. It is
  captured on the first forward after :meth:`FeatureProbe.arm` of a logging step (the first
  micro-batch under gradient accumulation, the first call under activation checkpointing),
  flattened to token rows and subsampled to at most ``max_tokens`` evenly spaced rows (a
  deterministic choice; padding positions are not excluded).
- A, B are snapshot in :meth:`FeatureProbe.before_update` on logging steps only; A', B' are
  the parameters after ``optimizer.step()`` (a step the optimizer skips, e.g. on an fp16
  GradScaler overflow, logs zero updates). All products are computed in float32 (the r x r
  Gram matrices behind the norms in float64), outside autocast, whatever the parameters' or
  activations' dtype.
- gAZ (the paper's Assumption 1, ``gamma[g_A Z] = 1``) uses the optimizer's direction for A:
  for Adam-type optimizers (state ``exp_avg``/``exp_avg_sq``, e.g. AdamW, StableLoRA, LoRA+)
  the bias-corrected Adam direction ``m_hat / (sqrt(v_hat) + eps)`` of this step, which is the
  update without lr, weight decay or shrink; for other optimizers A's gradient as it stands
  at :meth:`FeatureProbe.before_update` (accumulated over micro-batches, clipped if the loop
  clips first). gAZ is the RMS of that (r, n) direction applied to Z, over r rows and T tokens.
- A model wrapped in DDP works: layers are found through the pairs' tensors, never through
  module paths. FSDP's flattened parameters are not supported, nor is tracing the hooks with
  ``torch.compile`` (they store tensors on the probe: expect a graph break on logging steps).

Metric keys returned by :meth:`FeatureProbe.after_update` (``<layer>`` is
``LoRAPair.name``, e.g. ``model.layers.0.self_attn.q_proj``). ``<q>`` stands for each of
``delta1``, ``delta2``, ``delta3``, ``dY`` (the decomposition above), ``gAZ`` (Assumption 1),
``AZ`` (``A Z``, A before the step: the factor delta1 multiplies) and ``Z`` (the layer input).

Aggregates over the layers logged on the step:

- ``feat/<q>``: the mean over layers of the per-layer RMS.
- ``gamma/<q>``: the mean over layers of the per-layer gamma (each with its own n), so layers
  of different widths each contribute their own exponent.
- ``lora/norm_A``, ``lora/norm_B``: the mean over layers of ``||A'||_F``, ``||B'||_F``.
  (The fraction of layers still shrinking is the runner's ``shrink/fraction_shrinking``.)

Per layer (with ``per_layer=True``):

- ``feat/<layer>/<q>``: the RMS of q for that layer.
- ``gamma/<layer>/<q>``: ``log(feat/<layer>/<q>) / log(n)``, computed by
  :func:`stablelora.probes.quantities.gamma_values` (the run records keep only the RMS and n and
  recompute it with the same function).
- ``lora/<layer>/norm_A``, ``lora/<layer>/norm_B``: ``||A'||_F``, ``||B'||_F`` after the step.
- ``lora/<layer>/width``: n, the layer's input width (the denominator of its gamma values).
- ``lora/<layer>/shrinking``: 1.0 while the layer shrinks, 0.0 after it stopped (StableLoRA).
- ``lora/<layer>/stop_step``: the step at which the layer stopped shrinking; present once it
  has stopped (StableLoRA).

Cost: nothing when ``enabled=False`` (no hooks, no snapshots). Otherwise a pre-hook that
returns at once on non-logging steps, and on logging steps a copy of A, B and of at most
``max_tokens`` input rows per layer, a few (r x n) @ (n x T) products and one device-to-host
transfer for all the numbers. The (m x T) matrices delta1 ... dY are never formed: their
norms come from r x r Gram matrices (:func:`stablelora.probes.feature_updates.update_rms`), so
memory stays O(r (n + m + T)) per layer even when many wide layers are measured at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn

from stablelora.optim.pairs import LoRAPair
from stablelora.probes.feature_updates import adam_directions, rms, update_rms
from stablelora.probes.quantities import DECOMPOSITION, QUANTITIES, gamma_values


@dataclass
class _Layer:
    """One LoRA pair and its input captured on the armed step."""

    pair: LoRAPair
    width: int  # n, the input width
    Z: torch.Tensor | None = None  # (T, n) float32, T <= max_tokens


@dataclass
class _Snapshot:
    """Layers measured together with batched ops (same shapes of A, B and Z, same device),
    and their factors before the step, stacked (stacking is the copy)."""

    layers: list[_Layer]
    A: torch.Tensor  # (L, r, n) float32
    B: torch.Tensor  # (L, m, r) float32
    grad_A: torch.Tensor | None  # (L, r, n) float32: gAZ's direction without Adam moments

    @classmethod
    def take(cls, layers: list[_Layer]) -> _Snapshot:
        grads = [layer.pair.A.grad for layer in layers]
        present = [grad for grad in grads if grad is not None]
        return cls(
            layers=layers,
            A=torch.stack([layer.pair.A.detach() for layer in layers]).float(),
            B=torch.stack([layer.pair.B.detach() for layer in layers]).float(),
            grad_A=torch.stack(present).float() if len(present) == len(grads) else None,
        )

    def stats(self, optimizer) -> torch.Tensor:
        """(L, len(QUANTITIES) + 2): the RMS of each quantity, then ||A'||_F and ||B'||_F."""
        pairs = [layer.pair for layer in self.layers]
        A_new = torch.stack([pair.A.detach() for pair in pairs]).float()
        B_new = torch.stack([pair.B.detach() for pair in pairs]).float()
        # (L, T, n); a snapshot holds only layers that captured their input
        Z = torch.stack(cast(list[torch.Tensor], [layer.Z for layer in self.layers]))
        scale = torch.tensor([pair.scale for pair in pairs], device=Z.device)
        terms = update_rms(self.A, self.B, A_new, B_new, Z, scale)
        direction = adam_directions(optimizer, [pair.A for pair in pairs])
        direction = self.grad_A if direction is None else direction
        gAZ = (
            rms(direction @ Z.transpose(-2, -1))
            if direction is not None
            else torch.full((len(pairs),), math.nan, device=Z.device)
        )
        return torch.stack(
            [terms[q] for q in DECOMPOSITION]
            + [gAZ, terms["AZ"], rms(Z)]
            + [torch.linalg.vector_norm(x, dim=(-2, -1)) for x in (A_new, B_new)],
            dim=1,
        )


def _owning_modules(model: nn.Module, pairs: Sequence[LoRAPair]) -> list[tuple[nn.Module, list]]:
    """(peft layer module, indices of the pairs whose A it owns), found by tensor identity."""
    index_of_A = {id(pair.A): i for i, pair in enumerate(pairs)}
    owners = []
    for module in model.modules():  # each module once, even if registered twice
        lora_A = getattr(module, "lora_A", None)
        if not isinstance(lora_A, (nn.ModuleDict, nn.ParameterDict)):
            continue
        factors = [f.weight if isinstance(f, nn.Module) else f for f in lora_A.values()]
        indices = [index_of_A[id(f)] for f in factors if id(f) in index_of_A]
        if indices:
            owners.append((module, indices))
    found = {i for _, indices in owners for i in indices}
    missing = [pair.name for i, pair in enumerate(pairs) if i not in found]
    if missing:
        raise ValueError(
            f"FeatureProbe found no LoRA module owning the A factor of {missing}: pass pairs "
            "from stablelora.find_lora_pairs(model) of this very model."
        )
    return owners


class FeatureProbe:
    """Logs the feature-update decomposition of every LoRA layer on chosen steps.

    Args:
        model: the model holding the LoRA layers (possibly wrapped, e.g. in DDP).
        pairs: its LoRA layers, from :func:`stablelora.find_lora_pairs`.
        first_steps: log every step t <= first_steps (the shrink phase).
        every: after that, log every step that is a multiple of ``every`` (0: never).
        max_tokens: at most this many token positions of Z per layer (evenly spaced).
        enabled: False turns the probe off entirely: no hooks, no snapshots, no metrics.
        per_layer: also return the per-layer keys (the aggregates are always returned).

    See the module docstring for the metric keys and for what exactly is measured. Layers
    whose A, B and Z have the same shapes are measured together with batched matrix products,
    so a logging step costs a few dozen kernels per distinct layer shape, not per layer.
    """

    def __init__(
        self,
        model: nn.Module,
        pairs: Sequence[LoRAPair],
        *,
        first_steps: int = 200,
        every: int = 50,
        max_tokens: int = 256,
        enabled: bool = True,
        per_layer: bool = True,
    ):
        if first_steps < 0 or every < 0 or max_tokens < 1:
            raise ValueError(
                f"FeatureProbe needs first_steps >= 0, every >= 0 and max_tokens >= 1, got "
                f"{first_steps}, {every}, {max_tokens}."
            )
        self.first_steps, self.every, self.max_tokens = first_steps, every, max_tokens
        self.enabled, self.per_layer = enabled, per_layer
        self.layers = [_Layer(pair, width=pair.A.shape[1]) for pair in pairs]
        self.step: int | None = None
        self.armed = False
        self._snapshots: list[_Snapshot] | None = None
        self._row_index: dict[tuple, torch.Tensor] = {}  # (rows, device) -> subsample rows
        self._hooks = []
        if enabled:
            for module, indices in _owning_modules(model, pairs):
                hook = module.register_forward_pre_hook(
                    self._capture_hook(indices), with_kwargs=True
                )
                self._hooks.append(hook)

    # ------------------------------------------------------------------ cadence
    def is_logging_step(self, step: int) -> bool:
        """True on steps 1..first_steps and on every multiple of ``every`` after them."""
        if not self.enabled:
            return False
        return step <= self.first_steps or (self.every > 0 and step % self.every == 0)

    def arm(self, step: int) -> bool:
        """Start optimizer step ``step`` (counted from 1); return whether it logs."""
        self._clear()
        self.step, self.armed = step, self.is_logging_step(step)
        return self.armed

    def _clear(self) -> None:
        for layer in self.layers:
            layer.Z = None
        self._snapshots = None

    # ------------------------------------------------------------------ capture
    def _capture_hook(self, indices: list[int]):
        layers = [self.layers[i] for i in indices]

        def hook(module, args, kwargs):
            # Only the first forward of an armed step: later micro-batches, or the re-run of
            # an activation-checkpointed forward, must not replace the captured Z.
            if not self.armed or layers[0].Z is not None:
                return None
            x = args[0] if args else kwargs["x"]
            Z = self._subsample(x.detach())
            for layer in layers:
                layer.Z = Z
            return None

        return hook

    def _subsample(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n) -> (T, n) float32 copy, T <= max_tokens rows evenly spaced over the batch."""
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= self.max_tokens:
            return rows.to(torch.float32, copy=True)
        key = (rows.shape[0], rows.device)
        if key not in self._row_index:
            index = torch.linspace(0, rows.shape[0] - 1, self.max_tokens, device=rows.device)
            self._row_index[key] = index.round().long()
        return rows.index_select(0, self._row_index[key]).float()

    @torch.no_grad()
    def before_update(self) -> None:
        """Snapshot A and B (and A's gradient) of every layer, on logging steps only."""
        if not self.armed:
            return
        same_shapes: dict[tuple, list[_Layer]] = {}
        for layer in self.layers:
            if layer.Z is None:  # the layer took no part in this step's forward
                continue
            A, B = layer.pair.A, layer.pair.B
            key = (A.shape, B.shape, layer.Z.shape, A.device, A.dtype, B.dtype)
            same_shapes.setdefault(key, []).append(layer)
        self._snapshots = [_Snapshot.take(layers) for layers in same_shapes.values()]

    # ------------------------------------------------------------------ measure
    @torch.no_grad()
    def after_update(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """The metrics of this step (see the module docstring); {} when it does not log."""
        if not self.armed:
            return {}
        if self._snapshots is None:
            raise RuntimeError(
                f"FeatureProbe.after_update on logging step {self.step} without before_update: "
                "call probe.before_update() right before optimizer.step()."
            )
        self.armed = False
        snapshots = self._snapshots
        if not snapshots:
            return {}
        inner = getattr(optimizer, "optimizer", optimizer)  # e.g. accelerate's wrapper
        device = snapshots[0].A.device
        with torch.autocast(device.type, enabled=False):
            stats = torch.cat([snapshot.stats(inner).to(device) for snapshot in snapshots])
        values = stats.cpu().tolist()  # the one device-to-host transfer
        measured = [layer for snapshot in snapshots for layer in snapshot.layers]
        self._clear()
        return self._metrics(measured, values, inner)

    def _metrics(self, measured: list[_Layer], values: list[list[float]], optimizer) -> dict:
        count = len(QUANTITIES)
        magnitudes = np.array([row[:count] for row in values], dtype=np.float64)  # (L, q)
        widths = np.array([layer.width for layer in measured])
        # The analysis recomputes the per-layer gamma with this same function (bit for bit),
        # so the run records store only the RMS and the width.
        gammas = gamma_values(magnitudes, widths[:, None]).tolist()
        metrics: dict[str, float] = {}
        sums = dict.fromkeys(
            [f"{kind}/{q}" for kind in ("feat", "gamma") for q in QUANTITIES]
            + ["lora/norm_A", "lora/norm_B"],
            0.0,
        )
        for layer, row, gamma_row in zip(measured, values, gammas):
            name = layer.pair.name
            for q, value, gamma in zip(QUANTITIES, row, gamma_row):
                sums[f"feat/{q}"] += value
                sums[f"gamma/{q}"] += gamma
                if self.per_layer:
                    metrics[f"feat/{name}/{q}"] = value
                    metrics[f"gamma/{name}/{q}"] = gamma
            norm_A, norm_B = row[count:]
            sums["lora/norm_A"] += norm_A
            sums["lora/norm_B"] += norm_B
            if self.per_layer:
                metrics[f"lora/{name}/norm_A"] = norm_A
                metrics[f"lora/{name}/norm_B"] = norm_B
                metrics[f"lora/{name}/width"] = float(layer.width)
        metrics.update({key: total / len(measured) for key, total in sums.items()})
        metrics.update(self._shrink_metrics(measured, optimizer))
        return metrics

    def _shrink_metrics(self, measured: list[_Layer], optimizer) -> dict[str, float]:
        """The optimizer's per-layer scalars (its ``record_layers()``, see
        ``stablelora.records.summary.optimizer_summary``) as ``lora/<layer>/<key>``."""
        record_layers = getattr(optimizer, "record_layers", None)
        if record_layers is None or not self.per_layer:
            return {}
        state = record_layers()
        # Match layers by their A tensor: the optimizer's names may differ from ours (DDP).
        names = {id(p.A): p.name for p in getattr(optimizer, "lora_pairs", [])}
        metrics = {}
        for layer in measured:
            entry = state.get(names.get(id(layer.pair.A), layer.pair.name), {})
            for key, value in entry.items():
                if value is not None:
                    metrics[f"lora/{layer.pair.name}/{key}"] = float(value)
        return metrics

    # ------------------------------------------------------------------ teardown
    @property
    def num_hooks(self) -> int:
        """How many forward pre-hooks the probe has registered (0 when disabled or closed)."""
        return len(self._hooks)

    @property
    def holds_snapshots(self) -> bool:
        """Whether any captured input or parameter snapshot is held right now."""
        return bool(self._snapshots) or any(layer.Z is not None for layer in self.layers)

    def close(self) -> None:
        """Remove the hooks and drop every snapshot; the probe logs nothing afterwards."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._clear()
        self.enabled = self.armed = False
