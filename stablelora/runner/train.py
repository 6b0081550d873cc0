"""One training run: load, inject LoRA, train with the chosen optimizer, evaluate, record.

``train(cfg, run_dir)`` is the whole recipe; ``run.py`` only composes the config and calls
:func:`stablelora.runner.job.run_job`, which turns errors into records. Single process or
``torchrun`` (DDP: every rank trains, rank 0 evaluates, logs and writes).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from stablelora.config.check import check_config
from stablelora.config.spec import RunSpec
from stablelora.contamination import record_overlap
from stablelora.records.layers import LayerRecords
from stablelora.records.recorder import RunRecorder
from stablelora.records.summary import (
    make_summary,
    optimizer_metrics,
    optimizer_summary,
    read_summary,
)
from stablelora.runner.folder import (
    RunLock,
    StopRequested,
    StopSignals,
    check_run_folder,
    load_checkpoint_file,
    remove_checkpoints,
    save_adapter,
    save_checkpoint_file,
)
from stablelora.runner.packing import packing_problem
from stablelora.runner.setup import Distributed, Run, build_run, seed_everything


class RunInterrupted(Exception):
    """A stop signal ended the run after a checkpoint; rerunning the command resumes it."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} after step {step}")
        self.signum, self.step = signum, step


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------- the loop
@dataclass
class LoopState:
    """The training loop's state, and a checkpoint's ``state``: saved as the dict of these
    fields (:meth:`to_dict`, the keys checkpoints have always had) and read back from one
    (:meth:`from_dict`, which takes older checkpoints' dicts too). The data position follows
    from ``step``."""

    step: int = 0
    initial: dict = field(default_factory=dict)  # the evaluation at step 0
    best: dict = field(default_factory=dict)  # the best evaluation so far, with its step
    train_time: float = 0.0
    wall_time: float = 0.0
    attempts: int = 0
    records: int = 0  # rows of metrics.jsonl written
    #: The steps whose per-example rows examples.parquet holds (None in older checkpoints).
    example_steps: list[int] | None = None
    status: str = "running"
    error: str | None = None
    loss: float | None = None
    #: The step of an evaluation still to run: the initial one (0), or one a stop signal
    #: interrupted (run again on resume). The final evaluation follows the last step.
    eval_pending: int | None = None

    def to_dict(self) -> dict:
        """The checkpoint's ``state``: a plain dict keyed by the field names."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, state: dict) -> LoopState:
        """The state a checkpoint's ``state`` dict holds; keys it lacks (an older checkpoint)
        keep their defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in names})


def train_step(run: Run, step: int, packed: bool = False) -> tuple[float, int]:
    """Forward and backward over the step's micro-batches; return the mean loss (all ranks)
    and the number of input tokens this rank read (counted on the host: no device sync).
    ``packed``: each micro-batch's examples in one row without padding (``trainer.packing``,
    the same examples and loss).

    The optimizer step is the caller's, so that a non-finite loss can stop the run first.
    """
    trainer, dist = run.cfg.trainer, run.dist
    run.probe.arm(step)
    loss_sum, tokens = torch.zeros((), device=dist.device), 0
    for micro in range(trainer.grad_accum):
        # Each rank takes its own slice of the global batch; the position depends on the
        # step only, so a resumed run reads exactly the data it would have read.
        position = ((step - 1) * trainer.grad_accum + micro) * dist.world_size + dist.rank
        indices = run.order.indices(position * trainer.batch_size, trainer.batch_size)
        if packed:
            batch = run.task.collate_packed(indices)
            tokens += batch["input_ids"].numel()
        else:
            batch = run.task.collate(indices)
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        batch = {k: v.to(dist.device) for k, v in batch.items()}
        is_last = micro == trainer.grad_accum - 1
        # The loop's model is DDP-wrapped under torchrun only; gradients sync on the last
        # micro-batch.
        ddp = run.ddp if isinstance(run.ddp, torch.nn.parallel.DistributedDataParallel) else None
        with ddp.no_sync() if ddp is not None and not is_last else contextlib.nullcontext():
            with run.autocast():
                loss = run.ddp(**batch) / trainer.grad_accum
            loss.backward()
        loss_sum += loss.detach()
    return float(dist.mean(loss_sum)), tokens


def evaluate(run: Run, step: int) -> dict[str, float]:
    """Evaluate on rank 0 (the others wait) and record ``eval/<metric>`` at ``step``.

    Raises:
        StopRequested: on every rank, when a stop signal ended the evaluation (it polls
            :func:`~stablelora.runner.folder.check_stop` between batches); nothing is recorded.
    """
    metrics, stop = {}, None
    if run.dist.is_main:
        try:
            with run.autocast():
                result = run.task.evaluate(
                    run.model,
                    batch_size=run.cfg.trainer.eval_batch_size,
                    max_examples=run.cfg.trainer.max_eval_examples,
                )
        except StopRequested as error:
            stop = error
        else:
            metrics = {f"eval/{k}": v for k, v in result.items()}
            run.recorder.log_examples(step, getattr(run.task, "last_examples", []))
            run.recorder.log(step, metrics)
    run.dist.barrier()
    if run.dist.any(stop is not None):
        raise stop or StopRequested(0)
    return metrics


def save_checkpoint(run: Run, run_dir: Path, state: LoopState) -> None:
    """Everything a resumed run needs: trainable weights, optimizer (with the shrink flags),
    scheduler and RNG states, and the loop's ``state`` (step, metrics rows written, times;
    saved as a dict: :meth:`LoopState.to_dict`); the data position follows from
    ``state.step``. The previous checkpoint is kept."""
    if run.dist.is_main:
        trainable = {n: p.detach() for n, p in run.model.named_parameters() if p.requires_grad}
        payload = {
            "trainable": trainable,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": rng_state(run.dist.device),
            "state": state.to_dict(),
        }
        save_checkpoint_file(payload, run_dir)
    run.dist.barrier()


def load_checkpoint(run: Run, run_dir: Path) -> LoopState | None:
    """Restore the newest readable checkpoint of ``run_dir``; its loop state, or None."""
    checkpoint = load_checkpoint_file(run_dir, map_location=run.dist.device)
    if checkpoint is None:
        return None
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if p.requires_grad:
                p.copy_(checkpoint["trainable"][name])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    set_rng_state(checkpoint["rng"], run.dist.device)
    return LoopState.from_dict(checkpoint["state"])


def train(cfg, run_dir: Path, spec: RunSpec | None = None) -> dict:
    """Run one configured fine-tuning job in ``run_dir`` (resuming it if it has a
    checkpoint); return its summary. ``spec``: what ``check_config(cfg)`` returned (the config
    is checked here when it is not given).

    Raises:
        ConfigError: a bad config (before anything is loaded).
        RunFolderError: the folder is held by another process, holds another configuration,
            or has only unreadable checkpoints (nothing written into it).
        RecordsError: records the checkpoint stands on are short or damaged
            (``metrics.jsonl``, ``examples.parquet``, ``layers.parquet``): left as found.
        RunInterrupted: a stop signal; a checkpoint and an ``interrupted`` summary are written.
    """
    from omegaconf import OmegaConf

    spec = check_config(cfg) if spec is None else spec
    started, run_dir, trainer = time.time(), Path(run_dir), cfg.trainer
    is_main = int(os.environ.get("RANK", "0")) == 0
    resolved = spec.config
    lock = RunLock(run_dir)
    if is_main:
        lock.acquire()
    try:
        if is_main:
            check_run_folder(run_dir, resolved)
        previous = read_summary(run_dir)
        finished = previous.get("status") == "diverged" or (
            previous.get("status") == "completed" and (run_dir / "adapter").is_dir()
        )
        if trainer.resume and finished:
            if is_main:  # a kill after the adapter save left the per-layer parts unmerged
                LayerRecords(run_dir).close()
            print(f"[stablelora] {run_dir} already {previous['status']}; nothing to do.")
            return previous
        if trainer.num_threads:
            torch.set_num_threads(trainer.num_threads)
        dist = Distributed(trainer.device)
        if dist.device.type == "cuda":  # jobs of a multirun share the process: one peak per job
            torch.cuda.reset_peak_memory_stats(dist.device)
        seed_everything(cfg.seed, trainer.deterministic)
        recorder = RunRecorder(run_dir, resolved, cfg.logger, run_dir.name, enabled=dist.is_main)
        if dist.is_main:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        try:
            with StopSignals() as signals:
                return training_loop(cfg, spec, run_dir, dist, recorder, started, signals)
        except BaseException:
            recorder.finish(exit_code=1)  # close the W&B run; run_job records the failure
            raise
    finally:
        lock.release()


def _start(run: Run, run_dir: Path, recorder: RunRecorder) -> LoopState:
    """The state to train from: the checkpoint's (records cut back to the rows it had seen)
    or a fresh one (no records kept, old checkpoints dropped, the initial evaluation due)."""
    loaded = load_checkpoint(run, run_dir) if run.cfg.trainer.resume else None
    if loaded is not None:
        state = loaded
        recorder.keep_rows(state.records, state.step, state.example_steps)
        print(f"[stablelora] resuming {run_dir} from step {state.step}")
    else:
        state = LoopState()
        recorder.keep_rows(0)
        if run.dist.is_main:
            remove_checkpoints(run_dir)
        if run.cfg.trainer.eval_before:
            state.eval_pending = 0
    state.attempts += 1
    return state


def packed_batches(run: Run) -> bool:
    """Whether the loop trains on packed batches: ``trainer.packing`` asked for and the model
    keeps packed examples apart (:func:`stablelora.runner.packing.packing_problem`); if it
    does not, one line says so and the run trains on padded batches (the same loss)."""
    if not run.cfg.trainer.get("packing", False):
        return False
    problem = packing_problem(run.model, run.task)
    if problem is not None and run.dist.is_main:
        print(f"[stablelora] trainer.packing: {problem}; training on padded batches instead.")
    return problem is None


def training_loop(
    cfg,
    spec: RunSpec,
    run_dir: Path,
    dist: Distributed,
    recorder: RunRecorder,
    started: float,
    signals: StopSignals,
) -> dict:
    """The training loop of one run: build it, start from its checkpoint or afresh, train
    ``trainer.max_steps`` steps with the evaluations and checkpoints due, evaluate, and write
    the summary (and the adapter when it completed); its state is a :class:`LoopState`."""
    from stablelora.lora import step_hooks

    trainer = cfg.trainer
    run = build_run(cfg, dist, recorder, spec)
    if dist.is_main:
        record_overlap(run_dir, cfg.task, getattr(run.task, "overlap", {}))
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    after_step = step_hooks(run.model)  # the adapter's own work after an optimizer step
    packed = packed_batches(run)
    state = _start(run, run_dir, recorder)
    wall_before = state.wall_time

    def checkpoint() -> None:
        recorder.flush()  # the per-layer rows up to this step, before the checkpoint
        state.records = recorder.rows
        state.example_steps = recorder.examples.steps
        state.wall_time = wall_before + time.time() - started
        save_checkpoint(run, run_dir, state)

    def evaluation(step: int) -> None:
        """The evaluation at ``step`` (0: the initial one). A stop signal ends it at once and
        leaves it in ``state.eval_pending``, so that the checkpoint runs it on resume."""
        state.eval_pending = step
        with contextlib.suppress(StopRequested):
            result = evaluate(run, step)
            state.eval_pending = None
            if step == 0:
                state.initial = result
            else:
                state.best = better(state.best, result, run.task, step)
        run.model.train()

    if state.eval_pending is not None:  # the initial one, or one a stop interrupted
        evaluation(state.eval_pending)
    last_step = trainer.max_steps
    if state.eval_pending is not None:  # stopped during that evaluation: no training
        checkpoint()
        state.status, last_step = "interrupted", state.step
    progress = Progress(trainer, state.step, run_dir.name, enabled=dist.is_main)
    loop_start = time.time() - state.train_time
    run.model.train()
    for step in range(state.step + 1, last_step + 1):
        loss, tokens = train_step(run, step, packed)
        if not math.isfinite(loss):
            state.status, state.error = "diverged", f"loss is {loss} at step {step}"
            state.step, state.loss = step, loss
            recorder.log(step, {"train/loss": loss})
            break
        if cfg.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.max_grad_norm)
        run.probe.before_update()
        run.optimizer.step()
        run.scheduler.step()
        for hook in after_step:
            hook(step)
        run.optimizer.zero_grad(set_to_none=True)
        metrics = run.probe.after_update(run.optimizer)
        state.step, state.loss, state.train_time = step, loss, time.time() - loop_start
        progress.count(tokens * dist.world_size)
        if step % trainer.log_every == 0 or step == trainer.max_steps:
            lr = float(run.scheduler.get_last_lr()[0])
            metrics |= {
                "train/loss": loss,
                "train/lr": lr,
                **progress.throughput(step),
                **optimizer_metrics(run.optimizer),
            }
        recorder.log(step, metrics)
        progress.update(loss)
        if trainer.eval_every and step % trainer.eval_every == 0 and step < trainer.max_steps:
            evaluation(step)  # a stop signal during it: the checkpoint below keeps it due
        saved = trainer.checkpoint_every and step % trainer.checkpoint_every == 0
        if saved:
            checkpoint()
        if dist.any(signals.received is not None) and step < trainer.max_steps:
            if not saved:
                checkpoint()
            state.status = "interrupted"
            break
    progress.close()
    run.probe.close()

    final = {}
    if state.status == "running":
        try:
            final = evaluate(run, state.step)
        except StopRequested:  # checkpointed at the last step: a rerun only evaluates
            checkpoint()
            state.status = "interrupted"
        else:
            state.status = "completed"
            state.best = better(state.best, final, run.task, state.step)
    wall_time = wall_before + time.time() - started
    summary = summarize(cfg, run, state, final, wall_time, packed)
    recorder.write_summary(summary)  # before the adapter: a full disk keeps this summary
    if dist.is_main and state.status == "completed":
        save_adapter(run.model, run_dir)
        remove_checkpoints(run_dir)  # the adapter and the records now hold everything
    recorder.finish(exit_code=0 if state.status in ("completed", "diverged") else 1)
    dist.close()
    if state.status == "interrupted":
        raise RunInterrupted(signals.received or 0, state.step)
    return summary


def better(best: dict, result: dict, task, step: int) -> dict:
    """The better of two evaluations by the task's main metric (the earlier one on ties)."""
    key = f"eval/{task.main_metric}"
    sign = 1.0 if getattr(task, "greater_is_better", True) else -1.0
    if result and sign * result.get(key, -sign * math.inf) > sign * best.get(key, -sign * math.inf):
        return {**result, "step": step}
    return best


def summarize(
    cfg, run: Run, state: LoopState, final: dict, wall_time: float, packed: bool = False
) -> dict:
    """The ``summary.json`` of a run (schema: ``stablelora.records.summary.make_summary``);
    a run that asked for ``trainer.packing`` also records ``packed_batches``, whether it
    trained on packed batches (False: its model failed the check and it trained on padded
    ones)."""
    from stablelora.tasks import task_record

    extra = optimizer_summary(run.optimizer)
    if cfg.trainer.get("packing", False):
        extra["packed_batches"] = packed
    return make_summary(
        state.status,
        run.spec.config,
        error=state.error,
        steps=state.step,
        main_metric=f"eval/{run.task.main_metric}",
        initial=state.initial,
        final=final,
        best=state.best,
        train_loss_final=state.loss,
        wall_time_s=wall_time,
        train_time_s=state.train_time,
        attempts=state.attempts,
        peak_memory_mb=peak_memory_mb(run.dist.device),
        world_size=run.dist.world_size,
        device=str(run.dist.device),
        base_model=run.base_model,
        **task_record(cfg.task),
        extra=extra,
    )


class Progress:
    """The progress bar (rank 0) and the steps- and tokens-per-second clock between logs."""

    def __init__(self, trainer_cfg, start_step: int, name: str, enabled: bool):
        self.bar = None
        if enabled and trainer_cfg.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=trainer_cfg.max_steps,
                initial=start_step,
                desc=name,
                dynamic_ncols=True,
                file=sys.stderr,
            )
        self.last_step, self.last_time, self.tokens = start_step, time.time(), 0

    def count(self, tokens: int) -> None:
        self.tokens += tokens

    def throughput(self, step: int) -> dict[str, float]:
        """``train/steps_per_s`` and ``train/tokens_per_s`` (input tokens of all ranks,
        padding excluded) since the last call."""
        now = time.time()
        elapsed = max(now - self.last_time, 1e-9)
        rates = {
            "train/steps_per_s": (step - self.last_step) / elapsed,
            "train/tokens_per_s": self.tokens / elapsed,
        }
        self.last_step, self.last_time, self.tokens = step, now, 0
        return rates

    def update(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
