"""The runner's training step, built and timed outside ``train()``: what ``peers.py`` and
``shape_limit.py`` measure as "the project".

:func:`build` makes a :class:`stablelora.runner.setup.Run` from a composed config exactly as
``train()`` does (seeded, ``build_run``: model, LoRA, task, optimizer, schedule, probe, the
``CausalLMLoss`` with the configured LM head, the length-grouped order), with a recorder that
writes nothing (several Runs of one process share one built task); :class:`RunnerLoop`'s
``step`` is one iteration of ``train()``'s loop: the runner's own ``train_step`` (collate,
packed when ``trainer.packing`` is on and the model passes its check, forward, backward,
``loss.item()``), clipping when configured, the probe around the optimizer step, the
scheduler, the adapter's step hooks, ``zero_grad``. Not timed here: the loop's records
(metrics rows, progress line), which a benchmarked run does not write.
:func:`step_examples` gives the examples of each step in the runner's order, so that another
trainer can read the same ones.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from benchmarks.throughput import compose  # noqa: E402

#: The model the issue's measurements are on, and the tiny one the tests use.
MODELS = ("smollm2_135m", "tiny_llama")


def overrides(
    model: str,
    task: str,
    *,
    max_steps: int,
    batch_size: int = 8,
    device: str = "auto",
    data_root: str | None = None,
    probe: bool = False,
    packing: bool = False,
) -> list[str]:
    """Hydra overrides of a benchmarked run: the runner's defaults (LoRA r8 on q/v,
    Stable-LoRA, head at label positions, length-grouped batches), no logger or checkpoints."""
    items = [
        f"model={model}",
        f"task={task}",
        "method=stable_lora",
        "logger.mode=disabled",
        f"trainer.max_steps={max_steps}",
        f"trainer.batch_size={batch_size}",
        "trainer.checkpoint_every=0",
        "trainer.progress_bar=false",
        f"trainer.device={device}",
    ]
    if not probe:
        items.append("probe=off")
    if data_root:
        items.append(f"data_root={data_root}")
    if packing:
        items.append("trainer.packing=true")
    return items


#: Tasks already built, by (task config, seed, tokenizer): several Runs of one benchmark
#: share one (building a task checks its train/eval overlap, seconds on a CPU).
_TASKS: dict[tuple, object] = {}


def build(cfg):
    """The Run ``train(cfg, ...)`` would train (seeded the same way), recording nothing."""
    import stablelora.tasks as tasks
    from stablelora.config.check import plain_config
    from stablelora.records.recorder import RunRecorder
    from stablelora.runner.setup import Distributed, build_run, seed_everything

    dist = Distributed(cfg.trainer.device)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    recorder = RunRecorder(
        Path(os.devnull), plain_config(cfg), cfg.logger, "benchmark", enabled=False
    )
    original = tasks.build_task

    def shared_task(task_cfg, tokenizer, seed):
        key = (repr(task_cfg), seed, tokenizer.name_or_path, len(tokenizer))
        if key not in _TASKS:
            _TASKS[key] = original(task_cfg, tokenizer, seed=seed)
        return _TASKS[key]

    tasks.build_task = shared_task  # build_run looks it up on the module at call time
    try:
        return build_run(cfg, dist, recorder)
    finally:
        tasks.build_task = original


def uses_bf16(run) -> bool:
    """Whether the runner trains and evaluates this run under bf16 autocast."""
    precision = run.cfg.model.precision
    return precision == "bf16" or (precision == "auto" and run.dist.device.type == "cuda")


@dataclass
class RunnerLoop:
    """``train()``'s loop body over a built Run (see the module docstring)."""

    run: object
    trainable: list = field(default_factory=list)
    after_step: list = field(default_factory=list)
    #: Packed batches (``trainer.packing`` asked for and the model passes its check).
    packed: bool = False

    @classmethod
    def of(cls, run) -> RunnerLoop:
        from stablelora.lora import step_hooks
        from stablelora.runner import train

        trainable = [p for p in run.model.parameters() if p.requires_grad]
        packed = hasattr(train, "packed_batches") and train.packed_batches(run)
        return cls(run, trainable, step_hooks(run.model), packed)

    def step(self, step: int) -> tuple[float, int]:
        """Optimizer step ``step`` (1-based) of the run; (loss, input tokens read)."""
        from stablelora.runner.train import train_step

        run = self.run
        loss, tokens = train_step(run, step, True) if self.packed else train_step(run, step)
        if run.cfg.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.trainable, run.cfg.optim.max_grad_norm)
        run.probe.before_update()
        run.optimizer.step()
        run.scheduler.step()
        for hook in self.after_step:
            hook(step)
        run.optimizer.zero_grad(set_to_none=True)
        run.probe.after_update(run.optimizer)
        return loss, tokens


def step_examples(run, steps: int) -> list[list[int]]:
    """The train examples of steps 1..``steps``, one list per step, in the runner's order
    (one process, no gradient accumulation)."""
    batch = run.cfg.trainer.batch_size
    if run.cfg.trainer.grad_accum != 1 or run.dist.world_size != 1:
        raise ValueError("benchmarks read one batch per step in one process")
    return [run.order.indices((step - 1) * batch, batch) for step in range(1, steps + 1)]


def real_tokens(run, examples: list[list[int]]) -> int:
    """Tokens (no padding) of those steps' sequences."""
    return sum(run.task.train_length(i) for indices in examples for i in indices)


class Clock:
    """Both clocks at once: the process's CPU time (all its threads; a shared machine's other
    jobs do not count) and the wall clock; on CUDA the device is synchronised first."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return time.process_time(), time.perf_counter()


def elapsed(start: tuple[float, float], end: tuple[float, float]) -> dict[str, float]:
    return {"cpu": end[0] - start[0], "wall": end[1] - start[1]}


def clocks(device: torch.device) -> list[str]:
    """The clocks worth reporting: on CUDA only the wall clock means anything."""
    return ["wall"] if device.type == "cuda" else ["cpu", "wall"]


__all__ = [
    "MODELS",
    "Clock",
    "RunnerLoop",
    "build",
    "clocks",
    "compose",
    "elapsed",
    "overrides",
    "real_tokens",
    "step_examples",
    "uses_bf16",
]
