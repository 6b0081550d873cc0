"""Tokens per second of the main job's training step and evaluation, before and after each
change of issue 19, and the share of this CPU's matmul rate the step reaches.

One process, one model: the same examples are trained on (the first ``--steps`` batches of the
shuffled stream, a multiple of the grouping pool, so grouped and plain batches hold the same
examples) in four variants, interleaved over ``--repeats`` so that a noisy shared machine hits
all alike:

- ``plain, all``: the stream before issue 19, LM head at every position (the baseline);
- ``plain, used``: LM head and cross-entropy at label positions only (``trainer.lm_head``);
- ``grouped, all``: length-grouped batches (``trainer.length_grouping``);
- ``grouped, used``: both (the runner's default);
- ``packed, used`` (with ``--packing``): each batch's examples in one row, no padding
  (``trainer.packing``; sdpa computes the row's whole masked attention square, counted so).

A step is forward, backward, ``loss.item()`` and the Stable-LoRA step, as in the runner. The
FLOPs of a step are counted from its batches (frozen weights: forward 2N and input gradients
2N per token for the body's linears, attention 12 L^2 d per sequence and layer, the head
4 V d per position it runs at; padding counted: it is computed) and divided by the step's
time and by the rate of a large float32 matmul timed here. Times are the process's CPU
seconds by default (a shared machine's other jobs do not count; with one thread, CPU time is
the time the step needs), ``--clock wall`` for the wall clock. Evaluation is timed on the task's
eval examples with the head at every position and at the continuations only.

    python benchmarks/step_speed.py                                      # SmolLM2, BBC News
    python benchmarks/step_speed.py --tasks bbc_news arc_easy --data-root /data   # + ARC-Easy
    python benchmarks/step_speed.py --packing                       # + packed batches

Targets (issue 19): training step >= 1.4x on BBC News and >= 1.8x on ARC-Easy, ARC-Easy
evaluation >= 1.5x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from benchmarks.throughput import compose  # noqa: E402

#: The process's CPU time (all its threads): on a machine other jobs share, the wall clock
#: counts their time slices too, the CPU time only this process's work (``--clock wall`` for
#: the wall clock on an idle machine).
CLOCK = time.process_time
VARIANTS = [("plain", "all"), ("plain", "used"), ("grouped", "all"), ("grouped", "used")]
POOL_BATCHES = 8


def build(model_name: str, task_name: str, data_root: str | None):
    """The main job's model with LoRA r8 on q/v, its Stable-LoRA optimizer and the task."""
    from stablelora.config.check import plain_config
    from stablelora.lora import adapter_arguments, apply_lora
    from stablelora.models import load_model
    from stablelora.optim import create_optimizer
    from stablelora.tasks import build_task

    overrides = [f"model={model_name}", f"task={task_name}", "logger.mode=disabled"]
    if data_root:
        overrides.append(f"data_root={data_root}")
    cfg = compose(overrides)
    model, tokenizer = load_model(cfg.model)
    model = apply_lora(model, **adapter_arguments(plain_config(cfg.adapter), 100))
    optimizer = create_optimizer(model, "stable_lora", lr=1e-4, shrink_ratio=5e-4)
    return cfg, model, optimizer, build_task(cfg.task, tokenizer, seed=0)


def batches(task, steps: int, batch_size: int, grouping: str) -> list[dict]:
    from stablelora.runner.setup import TrainOrder

    pool = POOL_BATCHES if grouping == "grouped" else 0
    order = TrainOrder(task.num_train_examples, 0, batch_size, pool, length_of=task.train_length)
    collate = task.collate_packed if grouping == "packed" else task.collate
    return [collate(order.indices(step * batch_size, batch_size)) for step in range(steps)]


def train_seconds(loss_fn, optimizer, data: list[dict]) -> float:
    start = CLOCK()
    for batch in data:
        loss = loss_fn(**batch)
        loss.backward()
        loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return CLOCK() - start


def step_flops(model, data: list[dict], head: str) -> float:
    """Counted FLOPs of training on ``data`` (see the module docstring)."""
    config = model.get_base_model().config
    parts = model.get_base_model()
    body = getattr(parts, parts.base_model_prefix)
    linear = sum(
        m.weight.numel()
        for name, m in body.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in name
    )
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    total = 0.0
    for batch in data:
        b, length = batch["input_ids"].shape
        positions = int((batch["labels"][:, 1:] != -100).sum()) if head == "used" else b * length
        total += 4 * linear * b * length + 12 * layers * b * length**2 * d
        total += 4 * vocab * d * positions
    return total


def matmul_rate(size: int = 1536, repeats: int = 5) -> float:
    """FLOP/s of a float32 ``size`` x ``size`` matmul (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def padding_share(data: list[dict]) -> float:
    if "attention_mask" not in data[0]:  # packed: no padding
        return 0.0
    real = sum(int(batch["attention_mask"].sum()) for batch in data)
    padded = sum(batch["attention_mask"].numel() for batch in data)
    return 1 - real / padded


def bench_training(task_name, model, optimizer, task, args, rate) -> None:
    from stablelora.runner.lm_head import CausalLMLoss

    variants = VARIANTS + ([("packed", "used")] if args.packing else [])
    data = {
        grouping: batches(task, args.steps, args.batch_size, grouping)
        for grouping in dict.fromkeys(grouping for grouping, _ in variants)
    }
    real_tokens = sum(int(batch["attention_mask"].sum()) for batch in data["plain"])
    losses = {head: CausalLMLoss(model, head=head) for head in ("all", "used")}
    model.train()
    train_seconds(losses["used"], optimizer, data["plain"][:1])  # warm-up
    times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for grouping, head in variants:
            times[(grouping, head)].append(train_seconds(losses[head], optimizer, data[grouping]))
    base = statistics.median(times[VARIANTS[0]])
    print(
        f"\n{task_name}: {args.steps} steps x batch {args.batch_size}, {real_tokens} real tokens "
        f"(the same examples in every variant), median of {args.repeats}"
    )
    print("| batches, LM head | padding | s/step | real tokens/s | speed-up | matmul rate |")
    print("|---|---|---|---|---|---|")
    for grouping, head in variants:
        seconds = statistics.median(times[(grouping, head)])
        share = step_flops(model, data[grouping], head) / seconds / rate
        print(
            f"| {grouping}, {head} | {padding_share(data[grouping]):.1%} | "
            f"{seconds / args.steps:.3f} | {real_tokens / seconds:.0f} | {base / seconds:.2f}x | "
            f"{share:.0%} |"
        )


def bench_eval(task_name, model, task, args) -> None:
    times: dict[tuple[str, int], list[float]] = {}
    variants = [("all", args.eval_batch_size), ("used", args.eval_batch_size)]
    variants += [("used", size) for size in args.eval_batch_sizes if size != args.eval_batch_size]
    kwargs = {"max_examples": args.eval_examples}
    scores = {}
    for _ in range(args.repeats):
        for head, size in variants:
            task.lm_head = head
            start = CLOCK()
            scores[(head, size)] = task.evaluate(model, batch_size=size, **kwargs)
            times.setdefault((head, size), []).append(CLOCK() - start)
    base = statistics.median(times[variants[0]])
    reference = scores[variants[0]]
    drift = choice_score_drift(model, task, args.eval_examples, args.eval_batch_size)
    print(f"\n{task_name} evaluation, {args.eval_examples} examples, median of {args.repeats}")
    print("| LM head, eval batch | seconds | speed-up | max score difference |")
    print("|---|---|---|---|")
    for head, size in variants:
        seconds = statistics.median(times[(head, size)])
        diff = max(abs(scores[(head, size)][k] - reference[k]) for k in reference)
        print(f"| {head}, {size} | {seconds:.2f} | {base / seconds:.2f}x | {diff:.2g} |")
    print(f"choice log-likelihoods, head at continuations vs every position: {drift}")


def choice_score_drift(model, task, max_examples: int, batch_size: int) -> str:
    """The largest relative difference of any choice's summed log-likelihood between the two
    heads, over the task's first ``max_examples`` eval examples (multiple choice, loglik)."""
    from stablelora.tasks.prompts import multiple_choice_requests
    from stablelora.tasks.scoring import loglikelihoods

    requests = []
    for examples in task.eval_sets.values():
        for example in examples[:max_examples]:
            context, choices = multiple_choice_requests(example, task.cfg.prompt_format)
            requests += [
                task.encoder.loglik_request(context, " " + choice, task.cfg.max_length)
                for choice in choices
            ]
    pad = task.encoder.pad_id
    with torch.no_grad():
        full = loglikelihoods(model, requests, batch_size=batch_size, pad_id=pad, head="all")
        used = loglikelihoods(model, requests, batch_size=batch_size, pad_id=pad, head="used")
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(full, used))
    return f"max relative difference {worst:.1e} over {len(requests)} (context, choice) pairs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--tasks", nargs="+", default=["bbc_news"])
    parser.add_argument("--data-root", default=None, help="local Hub-schema copies (ARC...)")
    parser.add_argument("--steps", type=int, default=16, help="a multiple of 8 (the pool)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-sizes", type=int, nargs="*", default=[32])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--packing", action="store_true", help="add packed batches, head used")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    if args.steps % POOL_BATCHES:
        parser.error(f"--steps must be a multiple of {POOL_BATCHES} (the grouping pool)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rate = matmul_rate()
    print(
        f"{args.model}, LoRA r8 q/v, Stable-LoRA; cpu x {torch.get_num_threads()} threads; "
        f"float32 matmul rate {rate / 1e9:.1f} GFLOP/s; times: {args.clock} seconds"
    )
    for task_name in args.tasks:
        _, model, optimizer, task = build(args.model, task_name, args.data_root)
        bench_training(task_name, model, optimizer, task, args, rate)
        bench_eval(task_name, model, task, args)


if __name__ == "__main__":
    main()
