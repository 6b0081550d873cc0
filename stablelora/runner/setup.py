"""Building a run: the torchrun environment (:class:`Distributed`), the seeded training order
(:class:`TrainOrder`), and :func:`build_run`, which loads the model, injects LoRA and builds the
task, optimizer, schedule and probe into the :class:`Run` the training loop
(:func:`stablelora.runner.train.train`) touches."""

from __future__ import annotations

import contextlib
import functools
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from stablelora.config.spec import RunSpec, plain_config, run_spec
from stablelora.records.recorder import RunRecorder

if TYPE_CHECKING:
    from stablelora.probes.gamma import FeatureProbe
    from stablelora.tasks import Task


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

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (so that every rank stops at the same step)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor(float(flag), device=self.device)
        torch.distributed.all_reduce(value)
        return bool(value.item())

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


class TrainOrder:
    """The training stream: example indices as a pure function of (seed, position).

    Without grouping it is :func:`batch_indices`' per-epoch shuffled stream. With
    ``pool_batches = k >= 2`` and ``length_of`` (an example's token length), the stream is cut
    into pools of ``k * batch_size`` consecutive positions; each pool's examples are sorted by
    length (ties by index), cut into ``k`` batches, and the batches shuffled (seeded by seed
    and pool). Every example keeps its epoch (up to the pool that straddles an epoch's end),
    a batch holds sequences of similar length (little padding), and a resumed run reads
    exactly what it would have read. ``batch_size`` is an optimizer step's batch (all
    micro-batches of all ranks): a step reads one sorted batch, whatever its split.
    """

    def __init__(self, num_examples, seed, batch_size, pool_batches=0, length_of=None):
        self.num_examples, self.seed, self.batch_size = num_examples, seed, batch_size
        self.grouped = pool_batches >= 2 and length_of is not None
        self.pool_size = pool_batches * batch_size
        self.length_of = length_of
        self._pool = functools.lru_cache(maxsize=4)(self._pool_order)

    def indices(self, position: int, count: int) -> list[int]:
        """Examples at stream positions ``position .. position+count-1``."""
        if not self.grouped:
            return batch_indices(self.num_examples, self.seed, position, count)
        return [
            self._pool(index // self.pool_size)[index % self.pool_size]
            for index in range(position, position + count)
        ]

    def _pool_order(self, pool: int) -> list[int]:
        examples = batch_indices(
            self.num_examples, self.seed, pool * self.pool_size, self.pool_size
        )
        assert self.length_of is not None
        examples.sort(key=lambda i: (self.length_of(i), i))
        batches = [
            examples[start : start + self.batch_size]
            for start in range(0, self.pool_size, self.batch_size)
        ]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + pool)
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [i for b in order for i in batches[b]]


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def build_scheduler(optimizer, optim_cfg, max_steps):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(optim_cfg.schedule, optim_cfg.schedule)
    return get_scheduler(
        name, optimizer, num_warmup_steps=optim_cfg.warmup_steps, num_training_steps=max_steps
    )


@dataclass
class Run:
    """Everything the training loop touches, built from the config by :func:`build_run`."""

    cfg: Any  # the run's DictConfig
    dist: Distributed
    model: torch.nn.Module  # the peft model (what is saved and evaluated)
    ddp: torch.nn.Module  # the loss the loop calls (CausalLMLoss): DDP-wrapped under torchrun
    task: Task
    order: TrainOrder  # which examples each step reads
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    probe: FeatureProbe
    recorder: RunRecorder
    autocast: Callable[[], contextlib.AbstractContextManager]
    #: The config resolved into what was built (:func:`stablelora.config.check.check_config`).
    spec: RunSpec
    #: What was loaded (``stablelora.models.model_record``): the summary's ``base_model``.
    base_model: dict | None = None


def build_run(cfg, dist: Distributed, recorder: RunRecorder, spec: RunSpec | None = None) -> Run:
    """Load the model, inject LoRA, build the task, optimizer, schedule and probe, with the
    arguments of ``spec`` (what :func:`stablelora.config.check.check_config` returned for
    ``cfg``; resolved from ``cfg`` when not given)."""
    # Imported here, not at the top: importing this module stays light (no transformers),
    # and tests replace a loader on its module (stablelora.tasks.build_task).
    from stablelora.lora import apply_lora
    from stablelora.models import count_parameters, load_model, model_record
    from stablelora.optim import create_optimizer, find_lora_pairs
    from stablelora.probes.gamma import FeatureProbe
    from stablelora.runner.lm_head import CausalLMLoss
    from stablelora.tasks import build_task

    spec = spec if spec is not None else run_spec(plain_config(cfg))
    model, tokenizer = load_model(cfg.model)
    base_model = model_record(model, cfg.model)  # before the adapter: the loaded model's count
    model = apply_lora(model, **spec.adapter).to(dist.device)
    base_model["trainable_parameters"] = count_parameters(model, trainable=True)
    optimizer = create_optimizer(
        model, spec.optimizer, **spec.adamw.kwargs(), **spec.optimizer_options
    )
    ddp: torch.nn.Module = CausalLMLoss(model, head=cfg.trainer.lm_head)
    if dist.world_size > 1:
        device_ids = None if dist.device.type == "cpu" else [dist.device]
        ddp = torch.nn.parallel.DistributedDataParallel(ddp, device_ids=device_ids)
    probe = FeatureProbe(
        model,
        find_lora_pairs(model),
        first_steps=cfg.probe.first_steps,
        every=cfg.probe.every,
        max_tokens=cfg.probe.max_tokens,
        enabled=cfg.probe.enabled and dist.is_main,
        per_layer=cfg.probe.per_layer,
    )
    precision = cfg.model.precision
    use_bf16 = precision == "bf16" or (precision == "auto" and dist.device.type == "cuda")
    autocast = functools.partial(
        torch.autocast, dist.device.type, dtype=torch.bfloat16, enabled=use_bf16
    )
    task = build_task(spec.task, tokenizer, seed=cfg.seed)
    task.lm_head = cfg.trainer.lm_head
    # Pools are cut in optimizer steps' batches (all micro-batches of all ranks), so the
    # examples of a step do not depend on how grad_accum and the ranks split it.
    trainer = cfg.trainer
    order = TrainOrder(
        task.num_train_examples,
        cfg.seed,
        trainer.batch_size * trainer.grad_accum * dist.world_size,
        pool_batches=cfg.trainer.length_grouping,
        length_of=getattr(task, "train_length", None),
    )
    return Run(
        cfg,
        dist,
        model,
        ddp,
        task,
        order,
        optimizer,
        build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps),
        probe,
        recorder,
        autocast,
        spec,
        base_model,
    )
