"""Stable-LoRA's records under transformers' ``Trainer`` and TRL's ``SFTTrainer``.

Usage (the PeftModel must exist before the optimizer, so build it yourself rather than
passing ``peft_config=`` to ``SFTTrainer``, which creates it inside the trainer)::

    model = apply_lora(base_model, rank=8, alpha=16, target_modules=["q_proj", "v_proj"])
    optimizer = create_optimizer(model, "stable_lora", lr=1e-3, shrink_ratio=5e-3)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data,
                         optimizers=(optimizer, None),
                         callbacks=[StableLoRACallback(probe_every=10)])

The callback logs through the trainer's own ``log`` (so ``report_to`` integrations, W&B,
TensorBoard, ..., and ``trainer.state.log_history`` receive the values), in rows of their own
at the step they describe:

- on every logging step (``logging_steps``), the optimizer's shrink state, under the keys
  ``run.py`` records (:func:`stablelora.records.summary.optimizer_metrics`):
  ``shrink/num_shrinking``, ``shrink/fraction_shrinking``, plus ``shrink/newly_stopped``
  (layers that stopped since the callback's previous row: this step's stops when logging
  every step) and, once a layer has stopped, ``shrink/median_stop_step``;
- with ``probe_every=N`` (and/or ``probe_first_steps=K``), on steps 1..K and every multiple of
  N, the layer means of the feature probe (:class:`stablelora.probes.gamma.FeatureProbe`, the keys
  ``run.py`` records): ``feat/delta1``, ``feat/delta2``, ``feat/delta3``, ``feat/dY``,
  ``lora/norm_A``, ``lora/norm_B``, the other ``feat/*`` and their ``gamma/*`` values.

Resuming from a Trainer checkpoint keeps the shrink state: the Trainer saves the optimizer's
``state_dict``, which for Stable-LoRA holds the per-layer flags and stop steps. A checkpoint
written by another optimizer (LoRA's AdamW) has none, and loading it is a ValueError unless
``optimizer.missing_shrink_state = "restart"`` was set: then the shrink starts afresh at the
Trainer's ``global_step`` (stop steps count on from it), and the callback logs
``shrink/restart_step`` in a row of its own at that step.
"""

from __future__ import annotations

import inspect

from transformers import Trainer, TrainerCallback

from stablelora.optim.pairs import find_lora_pairs
from stablelora.optim.stable_lora import shrink_counts
from stablelora.probes.gamma import FeatureProbe
from stablelora.records.summary import optimizer_metrics


def _inner(optimizer):
    """The optimizer itself, without accelerate's ``AcceleratedOptimizer`` wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _calling_trainer(callback: TrainerCallback) -> Trainer:
    """The Trainer whose callback handler is calling ``callback`` right now.

    Callbacks receive no reference to their trainer, and logging must go through
    ``Trainer.log`` to reach the reporting callbacks (which run before user callbacks, so
    adding keys to ``logs`` in ``on_log`` would come too late for them).
    """
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and callback in candidate.callback_handler.callbacks:
            return candidate
        frame = frame.f_back
    raise RuntimeError(
        "StableLoRACallback found no Trainer calling it: pass it to a transformers Trainer "
        "(or TRL trainer) as callbacks=[StableLoRACallback(...)] or trainer.add_callback(...)."
    )


class StableLoRACallback(TrainerCallback):
    """Logs Stable-LoRA's shrink state and, optionally, the feature probe (module docstring).

    Args:
        probe_every: measure the feature updates every N optimizer steps (0: never).
        probe_first_steps: also measure every step 1..K (the shrink phase), as ``run.py``'s
            ``probe.first_steps`` does.
        max_tokens: token positions of each layer's input kept on a measured step.
    """

    def __init__(self, probe_every: int = 0, probe_first_steps: int = 0, max_tokens: int = 256):
        if probe_every < 0 or probe_first_steps < 0 or max_tokens < 1:
            raise ValueError(
                f"StableLoRACallback needs probe_every >= 0, probe_first_steps >= 0 and "
                f"max_tokens >= 1, got {probe_every}, {probe_first_steps}, {max_tokens}."
            )
        self.probe_every, self.probe_first_steps = probe_every, probe_first_steps
        self.max_tokens = max_tokens
        self.probe: FeatureProbe | None = None
        self.trainer: Trainer | None = None
        self._pending: dict[str, float] = {}  # the probe's values of the current step
        self._stopped: int | None = None  # stopped layers at the previous row

    @property
    def probes(self) -> bool:
        return self.probe_every > 0 or self.probe_first_steps > 0

    # ------------------------------------------------------------------ lifecycle
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.trainer = _calling_trainer(self)
        inner = _inner(optimizer)
        if not self.probes and not hasattr(inner, "shrink_state"):
            raise ValueError(
                f"StableLoRACallback: the trainer's optimizer is {type(inner).__name__}, not "
                "Stable-LoRA, and probe_every=0: nothing to log. Pass optimizers=(create_"
                "optimizer(model, 'stable_lora', ...), None) to the trainer, or set probe_every."
            )
        if self.probes and self.probe is None:
            self.probe = FeatureProbe(
                model,
                find_lora_pairs(model),
                first_steps=self.probe_first_steps,
                every=self.probe_every,
                max_tokens=self.max_tokens,
                enabled=state.is_world_process_zero,  # one process measures, as in run.py
                per_layer=False,
            )
        self._stopped = None
        self._log_a_restart(inner, state)

    def _log_a_restart(self, optimizer, state) -> None:
        """After a resume whose checkpoint had no shrink state (the optimizer restarted its
        shrink while loading it, and has taken no step since): put the restart on the
        Trainer's clock and log it."""
        restart = getattr(optimizer, "shrink_restart_step", None)
        if restart is None or optimizer.shrink_step != restart:
            return
        if restart != state.global_step:
            # The optimizer counted the checkpoint's AdamW steps, which a GradScaler's skipped
            # steps leave behind the Trainer's global_step; stop steps are on the Trainer's.
            optimizer.restart_shrink(state.global_step)
        if state.is_world_process_zero:
            Trainer.log(self._trainer(), {"shrink/restart_step": state.global_step})

    def on_train_end(self, args, state, control, **kwargs):
        if self.probe is not None:
            self.probe.close()
            self.probe = None

    # ------------------------------------------------------------------ one optimizer step
    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self._stopped is None:  # after a resume has loaded the optimizer's shrink state
            self._stopped = self._num_stopped(_inner(optimizer))
        if self.probe is not None:
            self.probe.arm(state.global_step + 1)  # before the step's first forward

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.probe is not None:
            self.probe.before_update()  # after gradient clipping, as in run.py

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.probe is not None:
            self._pending = self.probe.after_update(_inner(optimizer))

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        # DefaultFlowCallback ran before this callback and set should_log for this step.
        metrics, self._pending = self._pending, {}
        if control.should_log or metrics:
            metrics.update(self.shrink_metrics(_inner(optimizer)))
        if metrics and state.is_world_process_zero:
            trainer = self._trainer()
            should_log = control.should_log
            # Trainer.log itself: a subclass's log (TRL's) would flush its own averaged
            # metrics into this row.
            Trainer.log(trainer, metrics)
            # Logging clears should_log; the trainer's own row (loss, lr) of this step
            # must still follow.
            control.should_log = trainer.control.should_log = should_log
        return control

    # ------------------------------------------------------------------ values
    def shrink_metrics(self, optimizer) -> dict[str, float]:
        """The shrink keys of the module docstring ({} for an optimizer without a shrink)."""
        metrics = optimizer_metrics(optimizer)
        if not hasattr(optimizer, "shrink_state"):
            return metrics
        counts = shrink_counts(optimizer.shrink_state())
        stopped = int(counts["stopped"] or 0)
        metrics["shrink/newly_stopped"] = stopped - (self._stopped or 0)
        self._stopped = stopped
        if counts["median_stop_step"] is not None:
            metrics["shrink/median_stop_step"] = float(counts["median_stop_step"])
        return metrics

    def _num_stopped(self, optimizer) -> int:
        if not hasattr(optimizer, "shrink_state"):
            return 0
        return int(shrink_counts(optimizer.shrink_state())["stopped"] or 0)

    def _trainer(self) -> Trainer:
        if self.trainer is None:
            raise RuntimeError("StableLoRACallback logged before on_train_begin.")
        return self.trainer
