"""One training run: load, inject LoRA, train with the chosen optimizer, evaluate, record.

``train(cfg, run_dir)`` is the whole recipe; ``run.py`` only composes the config and calls
``run_job``, which turns errors into records. Single process or ``torchrun`` (DDP: every rank
trains, rank 0 evaluates, logs and writes).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import resource
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from stablelora.records import (
    RunRecorder,
    git_commit,
    package_versions,
    read_jsonl,
    result_table,
)

CHECKPOINT = "checkpoint.pt"
SCHEDULES = ("linear", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A user error in the config: reported as one line, before anything expensive."""


# ---------------------------------------------------------------------------- validation
def check_config(cfg) -> None:
    """Raise :class:`ConfigError` (one line: what is wrong, how to fix it) for a bad config."""
    from omegaconf import OmegaConf

    from stablelora.lora import SCALINGS
    from stablelora.models import check_model_config
    from stablelora.optim import OPTIMIZERS, StopRule, check_shrink_ratio
    from stablelora.tasks import check_task_config

    method, optim, trainer = cfg.method, cfg.optim, cfg.trainer
    rules = [  # (holds, "key must ...") for each value a user can get wrong
        (
            isinstance(method.rank, int) and method.rank > 0,
            "method.rank must be a positive integer",
        ),
        (method.alpha > 0, "method.alpha must be positive"),
        (optim.lr > 0, "optim.lr must be positive"),
        (optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (method.scaling in SCALINGS, f"method.scaling must be one of {SCALINGS}"),
        (method.init_scale >= 0, "method.init_scale must be >= 0"),
        (method.optimizer in OPTIMIZERS, f"method.optimizer must be one of {sorted(OPTIMIZERS)}"),
        (trainer.max_steps > 0, "trainer.max_steps must be positive"),
        (trainer.batch_size > 0, "trainer.batch_size must be positive"),
        (trainer.grad_accum >= 1, "trainer.grad_accum must be >= 1"),
        (optim.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}"),
        (trainer.device in DEVICES, f"trainer.device must be one of {DEVICES}"),
    ]
    for holds, rule in rules:
        if not holds:
            key = rule.split()[0]
            raise ConfigError(f"{rule}, got {key}={OmegaConf.select(cfg, key)}.")
    try:
        check_shrink_ratio(method.shrink_ratio)
        StopRule.parse(method.stop_rule)
        check_model_config(cfg.model)
        check_task_config(cfg.task)
    except ValueError as error:
        raise ConfigError(str(error).replace("shrink_ratio", "method.shrink_ratio")) from None
    from stablelora.lora import check_target_modules
    from stablelora.models import skeleton

    model_tree = skeleton(cfg.model)
    if model_tree is not None:
        try:
            check_target_modules(model_tree, list(method.target_modules))
        except ValueError as error:
            message = str(error).replace("target_modules", "method.target_modules", 1)
            raise ConfigError(message) from None
    if trainer.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device=cuda, but no CUDA device is visible: use trainer.device=cpu."
        )


# ---------------------------------------------------------------------------- helpers
class Distributed:
    """torchrun's environment: rank, world size, device; a no-op for one process."""

    def __init__(self, device_preference: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_preference != "cpu" and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.world_size
        return value

    def close(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def batch_indices(num_examples, seed, position, batch_size) -> list[int]:
    """Examples ``position .. position+batch_size-1`` of an endless, per-epoch shuffled stream.

    The data position is a pure function of the step, so a resumed run needs no data state.
    """
    return [
        _epoch_order(num_examples, seed, index // num_examples)[index % num_examples]
        for index in range(position, position + batch_size)
    ]


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


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


def save_atomic(payload: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def build_scheduler(optimizer, optim_cfg, max_steps):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(optim_cfg.schedule, optim_cfg.schedule)
    return get_scheduler(name, optimizer, num_warmup_steps=optim_cfg.warmup_steps,
                         num_training_steps=max_steps)  # fmt: skip


def run_name(cfg, override_dirname: str) -> str:
    base = f"{cfg.method.name}-{cfg.task.name}-{cfg.model.name}-s{cfg.seed}"
    return override_dirname or base


# ---------------------------------------------------------------------------- the recipe
@dataclass
class Run:
    """Everything the training loop touches, built from the config by :func:`build_run`."""

    cfg: object
    dist: Distributed
    model: torch.nn.Module  # the peft model (what is saved and evaluated)
    ddp: torch.nn.Module  # the model the loop calls: DDP-wrapped under torchrun
    task: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    probe: object
    recorder: RunRecorder
    autocast: object


def build_run(cfg, dist: Distributed, recorder: RunRecorder) -> Run:
    """Load the model, inject LoRA, build the task, optimizer, schedule and probe."""
    from stablelora.gamma import FeatureProbe
    from stablelora.lora import apply_lora
    from stablelora.models import load_model
    from stablelora.optim import create_optimizer, find_lora_pairs
    from stablelora.tasks import build_task

    method, optim = cfg.method, cfg.optim
    model, tokenizer = load_model(cfg.model)
    model = apply_lora(
        model, rank=method.rank, alpha=method.alpha, target_modules=list(method.target_modules),
        dropout=method.dropout, scaling=method.scaling, init_scale=method.init_scale,
        init=method.init, use_dora=method.use_dora, adapter=method.adapter,
        adalora={**method.adalora, "total_step": cfg.trainer.max_steps},
    ).to(dist.device)  # fmt: skip
    optimizer = create_optimizer(
        model, method.optimizer, lr=optim.lr, weight_decay=optim.weight_decay,
        betas=tuple(optim.betas), eps=optim.eps, shrink_ratio=method.shrink_ratio,
        stop_rule=method.stop_rule, loraplus_lr_ratio=method.loraplus_lr_ratio,
        foreach=optim.foreach, fused=optim.fused, **method.options,
    )  # fmt: skip
    ddp = model
    if dist.world_size > 1:
        device_ids = None if dist.device.type == "cpu" else [dist.device]
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    probe = FeatureProbe(
        model, find_lora_pairs(model), first_steps=cfg.probe.first_steps,
        every=cfg.probe.every, max_tokens=cfg.probe.max_tokens,
        enabled=cfg.probe.enabled and dist.is_main, per_layer=cfg.probe.per_layer,
    )  # fmt: skip
    precision = cfg.model.precision
    use_bf16 = precision == "bf16" or (precision == "auto" and dist.device.type == "cuda")
    autocast = functools.partial(
        torch.autocast, dist.device.type, dtype=torch.bfloat16, enabled=use_bf16
    )
    return Run(
        cfg, dist, model, ddp, build_task(cfg.task, tokenizer, seed=cfg.seed), optimizer,
        build_scheduler(optimizer, optim, cfg.trainer.max_steps), probe, recorder, autocast,
    )  # fmt: skip


def train_step(run: Run, step: int) -> float:
    """Forward and backward over the step's micro-batches; return the mean loss (all ranks).

    The optimizer step is the caller's, so that a non-finite loss can stop the run first.
    """
    trainer, dist = run.cfg.trainer, run.dist
    run.probe.arm(step)
    loss_sum = torch.zeros((), device=dist.device)
    for micro in range(trainer.grad_accum):
        # Each rank takes its own slice of the global batch; the position depends on the
        # step only, so a resumed run reads exactly the data it would have read.
        position = ((step - 1) * trainer.grad_accum + micro) * dist.world_size + dist.rank
        indices = batch_indices(run.task.num_train_examples, run.cfg.seed,
                                position * trainer.batch_size, trainer.batch_size)  # fmt: skip
        batch = {k: v.to(dist.device) for k, v in run.task.collate(indices).items()}
        is_last = micro == trainer.grad_accum - 1
        no_sync = dist.world_size > 1 and not is_last
        with run.ddp.no_sync() if no_sync else contextlib.nullcontext():
            with run.autocast():
                loss = run.ddp(**batch).loss / trainer.grad_accum
            loss.backward()
        loss_sum += loss.detach()
    return float(dist.mean(loss_sum))


def evaluate(run: Run, step: int) -> dict[str, float]:
    """Evaluate on rank 0 (the others wait) and record ``eval/<metric>`` at ``step``."""
    metrics = {}
    if run.dist.is_main:
        with run.autocast():
            result = run.task.evaluate(run.model, batch_size=run.cfg.trainer.eval_batch_size,
                                       max_examples=run.cfg.trainer.max_eval_examples)  # fmt: skip
        metrics = {f"eval/{k}": v for k, v in result.items()}
        run.recorder.log(step, metrics)
    run.dist.barrier()
    return metrics


def save_checkpoint(run: Run, path: Path, state: dict) -> None:
    """Everything a resumed run needs: trainable weights, optimizer (with the shrink flags),
    scheduler and RNG states; the data position follows from ``state["step"]``."""
    if run.dist.is_main:
        trainable = {n: p.detach() for n, p in run.model.named_parameters() if p.requires_grad}
        save_atomic({"trainable": trainable, "optimizer": run.optimizer.state_dict(),
                     "scheduler": run.scheduler.state_dict(), "rng": rng_state(run.dist.device),
                     "state": state}, path)  # fmt: skip
    run.dist.barrier()


def load_checkpoint(run: Run, path: Path) -> dict:
    # Our own file, holding Python RNG state: not loadable with weights_only.
    checkpoint = torch.load(path, map_location=run.dist.device, weights_only=False)
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if p.requires_grad:
                p.copy_(checkpoint["trainable"][name])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    set_rng_state(checkpoint["rng"], run.dist.device)
    return checkpoint["state"]


def shrink_metrics(optimizer) -> dict[str, float]:
    if not hasattr(optimizer, "shrink_state"):
        return {}
    shrinking = [layer["shrinking"] for layer in optimizer.shrink_state().values()]
    return {"shrink/num_shrinking": sum(shrinking),
            "shrink/fraction_shrinking": sum(shrinking) / len(shrinking)}  # fmt: skip


def train(cfg, run_dir: Path, override_dirname: str = "") -> dict:
    """Run one configured fine-tuning job in ``run_dir`` (resuming it if it has a
    checkpoint); return its summary."""
    from omegaconf import OmegaConf

    check_config(cfg)
    started, run_dir, trainer = time.time(), Path(run_dir), cfg.trainer
    previous = read_summary(run_dir)
    if trainer.resume and previous.get("status") in ("completed", "diverged"):
        print(f"[stablelora] {run_dir} already {previous['status']}; nothing to do.")
        return previous
    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    dist = Distributed(trainer.device)
    if dist.device.type == "cuda":  # jobs of a multirun share the process: one peak per job
        torch.cuda.reset_peak_memory_stats(dist.device)
    seed_everything(cfg.seed, trainer.deterministic)
    recorder = RunRecorder(run_dir, OmegaConf.to_container(cfg, resolve=True), cfg.logger,
                           run_name(cfg, override_dirname), enabled=dist.is_main)  # fmt: skip
    if dist.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        return _train(cfg, run_dir, dist, recorder, started)
    except BaseException:
        recorder.finish(exit_code=1)  # close the W&B run; run_job records the failure
        raise


def _train(cfg, run_dir: Path, dist: Distributed, recorder: RunRecorder, started: float) -> dict:
    trainer = cfg.trainer
    run = build_run(cfg, dist, recorder)
    trainable = [p for p in run.model.parameters() if p.requires_grad]

    state = {"step": 0, "initial": {}, "best": {}, "train_time": 0.0, "status": "running",
             "error": None, "loss": None}  # fmt: skip
    checkpoint_path = run_dir / CHECKPOINT
    if trainer.resume and checkpoint_path.exists():
        state = load_checkpoint(run, checkpoint_path)
        recorder.truncate_after(state["step"])
        print(f"[stablelora] resuming {run_dir} from step {state['step']}")
    elif trainer.eval_before:
        state["initial"] = evaluate(run, 0)
    progress = Progress(trainer, state["step"], run_name(cfg, ""), enabled=dist.is_main)
    loop_start = time.time() - state["train_time"]
    run.model.train()
    for step in range(state["step"] + 1, trainer.max_steps + 1):
        loss = train_step(run, step)
        if not math.isfinite(loss):
            state.update(status="diverged", error=f"loss is {loss} at step {step}", step=step)
            recorder.log(step, {"train/loss": loss})
            break
        if cfg.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.max_grad_norm)
        run.probe.before_update()
        run.optimizer.step()
        run.scheduler.step()
        if cfg.method.adapter == "adalora":  # AdaLoRA's rank allocation reads the gradients
            run.model.base_model.update_and_allocate(step)
        run.optimizer.zero_grad(set_to_none=True)
        metrics = run.probe.after_update(run.optimizer)
        state.update(step=step, loss=loss, train_time=time.time() - loop_start)
        if step % trainer.log_every == 0 or step == trainer.max_steps:
            metrics |= {"train/loss": loss, "train/lr": run.scheduler.get_last_lr()[0],
                        **progress.throughput(step), **shrink_metrics(run.optimizer)}  # fmt: skip
        recorder.log(step, metrics)
        progress.update(loss)
        if trainer.eval_every and step % trainer.eval_every == 0 and step < trainer.max_steps:
            state["best"] = better(state["best"], evaluate(run, step), run.task, step)
            run.model.train()
        if trainer.checkpoint_every and step % trainer.checkpoint_every == 0:
            recorder.flush()  # the per-layer rows up to this step, before the checkpoint
            save_checkpoint(run, checkpoint_path, state)
    progress.close()
    run.probe.close()

    final = {}
    if state["status"] == "running":
        state["status"] = "completed"
        final = evaluate(run, state["step"])
        state["best"] = better(state["best"], final, run.task, state["step"])
        if dist.is_main:
            run.model.save_pretrained(run_dir / "adapter")
    summary = summarize(cfg, run, state, final, time.time() - started)
    recorder.write_summary(summary)
    recorder.finish(exit_code=0 if state["status"] == "completed" else 1)
    if dist.is_main and state["status"] == "completed" and checkpoint_path.exists():
        checkpoint_path.unlink()  # the adapter and the records now hold everything
    dist.close()
    return summary


def better(best: dict, result: dict, task, step: int) -> dict:
    """The better of two evaluations by the task's main metric (the earlier one on ties)."""
    key = f"eval/{task.main_metric}"
    sign = 1.0 if getattr(task, "greater_is_better", True) else -1.0
    if result and sign * result.get(key, -sign * math.inf) > sign * best.get(key, -sign * math.inf):
        return {**result, "step": step}
    return best


def summarize(cfg, run: Run, state: dict, final: dict, wall_time: float) -> dict:
    """The ``summary.json`` of a run (schema in the README)."""
    optimizer = run.optimizer
    return {
        "status": state["status"],
        "error": state["error"],
        "steps": state["step"],
        "max_steps": cfg.trainer.max_steps,
        "main_metric": f"eval/{run.task.main_metric}",
        "initial": state["initial"],
        "final": final,
        "best": state["best"],
        "train_loss_final": state["loss"],
        "wall_time_s": wall_time,
        "train_time_s": state["train_time"],
        "peak_memory_mb": peak_memory_mb(run.dist.device),
        "world_size": run.dist.world_size,
        "device": str(run.dist.device),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "method": cfg.method.name,
        "task": cfg.task.name,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "shrink": optimizer.shrink_state() if hasattr(optimizer, "shrink_state") else None,
    }


class Progress:
    """The progress bar (rank 0) and the tokens-per-second clock between log steps."""

    def __init__(self, trainer_cfg, start_step: int, name: str, enabled: bool):
        self.bar = None
        if enabled and trainer_cfg.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=trainer_cfg.max_steps, initial=start_step, desc=name,
                            dynamic_ncols=True, file=sys.stderr)  # fmt: skip
        self.last_step, self.last_time = start_step, time.time()

    def throughput(self, step: int) -> dict[str, float]:
        now = time.time()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        return {"train/steps_per_s": rate}

    def update(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_summary(run_dir: Path) -> dict:
    import json

    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_job(cfg, run_dir: Path, override_dirname: str = "", multirun: bool = False):
    """Train, turning errors into records: a bad config is one line and exit code 2; any
    other error marks the run ``failed``. In a multirun the error is recorded and the sweep
    goes on; in a single run the process exits non-zero."""
    try:
        summary = train(cfg, run_dir, override_dirname)
        if int(os.environ.get("RANK", "0")) == 0:
            print(result_table(summary) + f"\nrecords: {run_dir}")
        return summary
    except ConfigError as error:
        message = f"stablelora: config error: {error}"
        _record_failure(cfg, run_dir, message)
        if multirun:
            print(message, file=sys.stderr)
            return None
        sys.exit(message)  # exit code 1 with one line on stderr
    except Exception as error:
        _record_failure(cfg, run_dir, f"{type(error).__name__}: {error}", traceback.format_exc())
        if multirun:
            print(f"stablelora: run {run_dir} failed: {error}", file=sys.stderr)
            return None
        raise


def _record_failure(cfg, run_dir: Path, message: str, trace: str | None = None) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from stablelora.records import write_json_atomic

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl")]
    write_json_atomic(run_dir / "summary.json", {
        "status": "failed", "error": message, "traceback": trace,
        "steps": max(steps, default=0), "max_steps": cfg.trainer.max_steps,
        "method": cfg.method.name, "task": cfg.task.name, "model": cfg.model.name,
        "seed": cfg.seed, "initial": {}, "final": {}, "best": {},
        "versions": package_versions(), "git_commit": git_commit(),
    })  # fmt: skip
