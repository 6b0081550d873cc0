"""How fast the training step could be at this model's own shapes, against how fast it is,
and where a step's time goes.

``step_speed.py`` divides the step's FLOPs by the rate of one large square matmul, which the
step's matmuls cannot reach: SmolLM2-135M's are thin (hidden 576, LoRA rank 8, 3 of 9
heads' keys and values (GQA), the 49,152-word head at label positions) and short (a batch of
8 holds a few hundred tokens). This measures the limit with the step's own shapes:

1. The shapes: one forward of the runner's loss on each of the first ``--steps`` batches of
   the task (the runner's order and length-grouped batches, batch 8) records every linear
   (tokens x in x out: padding included, it is computed; whether its input and its weight
   need a gradient) and every ``scaled_dot_product_attention`` call (its tensors' shapes,
   mask and flags).
2. The limit: each linear's matmuls timed alone at that size, as the step computes them:
   forward ``X W^T``; grad input ``dY W`` only when the input needs a gradient (not the first
   layer's q/k/v, whose input is the frozen embedding); grad weight ``dY^T X`` only for
   trainable weights (LoRA A and B; the frozen base and head have none); the head only where
   the runner runs it (``trainer.lm_head``: label positions by default); plus each attention
   call's forward and backward at its real shapes and mask. Summed over the batches and
   divided by the steps: seconds a step needs for its matmuls and attention alone, each at
   its best (the fastest of ``--repeats`` timings).
3. The step: the runner's step (``runner_step.RunnerLoop``: ``train_step``, optimizer,
   schedule, hooks) on the same batches, the feature probe off and at the runner's default
   (every step for the first 200), interleaved over ``--repeats`` rounds after a warm-up
   round; medians. Step time / limit says how far the step is from its own matmuls.
4. One ``torch.profiler`` profile of a step (probe at the default) with each op's own time
   put in one group: the LoRA rank-8 matmuls (with their scale and add), the base model's
   matmuls, the LM head (and its cross-entropy), attention (sdpa and its reshapes), norms,
   rotary embeddings, other elementwise ops (activations, residual adds, casts, reductions),
   the optimizer (step, schedule, zero_grad), the probe, and everything else (embedding,
   masks, indexing, the autograd engine's and Python's own time). Backward ops count with
   the forward op that made them.

Times are the process's CPU time by default (``--clock wall`` for the wall clock; on CUDA,
the synchronised wall clock); on a shared machine use ``--threads 1``.

    python benchmarks/shape_limit.py --threads 1                       # SmolLM2, BBC News
    python benchmarks/shape_limit.py --tasks bbc_news arc_easy --data-root /path/to/data
    python benchmarks/shape_limit.py --model tiny_llama --steps 2 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.runner_step import (  # noqa: E402
    MODELS,
    RunnerLoop,
    build,
    compose,
    overrides,
    step_examples,
    uses_bf16,
)

TASKS = ("bbc_news", "arc_easy")
NEEDS_DATA_ROOT = {"arc_easy"}
#: The profile's groups, in the order printed.
GROUPS = (
    "LoRA rank-8 matmuls",
    "base matmuls",
    "lm_head",
    "softmax/attention",
    "norms",
    "rotary",
    "elementwise ops",
    "optimizer",
    "probe",
    "other",
)
LABEL = "stablelora::"  # prefix of this script's profiler ranges
#: Ops (aten names without the trailing ``_``) counted as elementwise when no range claims them.
ELEMENTWISE = {
    "add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "log", "reciprocal",
    "silu", "silu_backward", "sigmoid", "sigmoid_backward", "tanh", "gelu", "gelu_backward",
    "where", "masked_fill", "clamp", "fill", "zero", "copy", "_to_copy", "to", "abs",
    "sum", "mean", "threshold_backward", "addcmul", "addcdiv", "lerp", "maximum", "minimum",
}  # fmt: skip
#: Ops of the loss on the head's logits (the runner's cross-entropy at label positions).
HEAD_LOSS = {"cross_entropy", "log_softmax", "_log_softmax", "nll_loss", "nll_loss_nd",
             "_log_softmax_backward_data", "nll_loss_backward", "nll_loss_forward"}  # fmt: skip

CLOCK = time.process_time


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return CLOCK()


# ---------------------------------------------------------------------------- 1. the shapes
@dataclass(frozen=True)
class LinearShape:
    kind: str  # "base", "lora" or "head"
    tokens: int
    n_in: int
    n_out: int
    input_grad: bool
    weight_grad: bool


@dataclass(frozen=True)
class AttentionShape:
    query: tuple
    key: tuple
    value: tuple
    grads: tuple  # (q, k, v) need a gradient
    is_causal: bool
    enable_gqa: bool
    mask: int  # index into the captured masks (-1: none)


def linear_kind(name: str, head: torch.nn.Module, module: torch.nn.Module) -> str:
    if module is head:
        return "head"
    return "lora" if ".lora_A." in f"{name}." or ".lora_B." in f"{name}." else "base"


def capture_shapes(run, batch) -> tuple[Counter, Counter, list]:
    """One forward of the runner's loss on ``batch``: {LinearShape: calls},
    {AttentionShape: calls} and the attention masks seen."""
    model = run.model
    head = model.get_output_embeddings()
    linears: Counter = Counter()
    attentions: Counter = Counter()
    masks: list = []
    hooks = []

    def hook(kind):
        def record(module, args, output):
            x = args[0]
            linears[
                LinearShape(
                    kind,
                    x.numel() // x.shape[-1],
                    module.in_features,
                    module.out_features,
                    x.requires_grad,
                    module.weight.requires_grad,
                )
            ] += 1

        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(hook(linear_kind(name, head, module))))
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        index = -1
        if attn_mask is not None:
            for i, seen in enumerate(masks):
                if seen.shape == attn_mask.shape and torch.equal(seen, attn_mask):
                    index = i
                    break
            else:
                masks.append(attn_mask.detach().clone())
                index = len(masks) - 1
        attentions[
            AttentionShape(
                tuple(query.shape),
                tuple(key.shape),
                tuple(value.shape),
                (query.requires_grad, key.requires_grad, value.requires_grad),
                bool(is_causal),
                bool(kwargs.get("enable_gqa", False)),
                index,
            )
        ] += 1
        return original(query, key, value, attn_mask, dropout_p, is_causal, **kwargs)

    batch = {k: v.to(run.dist.device) for k, v in batch.items()}
    try:
        F.scaled_dot_product_attention = sdpa
        with run.autocast():
            run.ddp(**batch)
    finally:
        F.scaled_dot_product_attention = original
        for handle in hooks:
            handle.remove()
    return linears, attentions, masks


# ---------------------------------------------------------------------------- 2. the limit
def best_seconds(fn, device: torch.device, repeats: int, target: float = 2e-3) -> float:
    """The fastest of ``repeats`` timings of ``fn`` (each a loop long enough to time)."""
    fn()
    start = now(device)
    fn()
    once = max(now(device) - start, 1e-7)
    calls = max(1, min(1000, int(target / once)))
    best = float("inf")
    for _ in range(repeats):
        start = now(device)
        for _ in range(calls):
            fn()
        best = min(best, (now(device) - start) / calls)
    return best


def linear_seconds(shape: LinearShape, dtype, device, repeats: int) -> dict[str, float]:
    """The matmuls of one linear the step computes (forward; grad input where the input needs
    a gradient; grad weight where the weight does), each timed alone."""
    x = torch.randn(shape.tokens, shape.n_in, dtype=dtype, device=device)
    w = torch.randn(shape.n_out, shape.n_in, dtype=dtype, device=device)
    dy = torch.randn(shape.tokens, shape.n_out, dtype=dtype, device=device)
    times = {"forward": best_seconds(lambda: F.linear(x, w), device, repeats)}
    if shape.input_grad:
        times["grad input"] = best_seconds(lambda: torch.mm(dy, w), device, repeats)
    if shape.weight_grad:
        times["grad weight"] = best_seconds(lambda: torch.mm(dy.t(), x), device, repeats)
    return times


def attention_seconds(shape: AttentionShape, masks, dtype, device, repeats: int) -> float:
    """Forward and backward of one sdpa call at its real shapes, mask and flags."""
    q, k, v = (
        torch.randn(size, dtype=dtype, device=device, requires_grad=grad)
        for size, grad in zip((shape.query, shape.key, shape.value), shape.grads)
    )
    mask = masks[shape.mask] if shape.mask >= 0 else None
    kwargs = {"enable_gqa": True} if shape.enable_gqa else {}
    needs_backward = any(shape.grads)
    grad_out = torch.randn(shape.query[:-1] + shape.value[-1:], dtype=dtype, device=device)

    def call():
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=shape.is_causal, **kwargs
        )
        if needs_backward:
            torch.autograd.backward(out, grad_out, inputs=[t for t in (q, k, v) if t.requires_grad])

    return best_seconds(call, device, repeats)


@dataclass
class Limit:
    """Seconds per step of each part of the limit, and its FLOPs."""

    parts: dict[str, float]
    flops: float

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def shape_limit(run, batches, repeats: int) -> Limit:
    device = run.dist.device
    dtype = torch.bfloat16 if uses_bf16(run) else next(run.model.parameters()).dtype
    linears: Counter = Counter()
    attentions: Counter = Counter()
    masks: list = []
    run.model.train()
    for batch in batches:
        found, calls, seen = capture_shapes(run, batch)
        linears.update(found)
        offset = len(masks)
        masks += seen
        for shape, count in calls.items():
            if shape.mask >= 0:
                shape = AttentionShape(**{**shape.__dict__, "mask": shape.mask + offset})
            attentions[shape] += count
    parts: dict[str, float] = defaultdict(float)
    flops = 0.0
    names = {"base": "base linears", "lora": "LoRA A/B", "head": "lm_head"}
    for shape, count in linears.items():
        for part, seconds in linear_seconds(shape, dtype, device, repeats).items():
            parts[f"{names[shape.kind]}: {part}"] += count * seconds
            flops += count * 2 * shape.tokens * shape.n_in * shape.n_out
    for shape, count in attentions.items():
        parts["attention (sdpa): forward + backward"] += count * attention_seconds(
            shape, masks, dtype, device, repeats
        )
    steps = len(batches)
    order = [f"{names[kind]}: {part}" for kind in ("base", "lora", "head")
             for part in ("forward", "grad input", "grad weight")]  # fmt: skip
    order.insert(6, "attention (sdpa): forward + backward")
    return Limit({k: parts[k] / steps for k in order if k in parts}, flops / steps)


def square_matmul_rate(device, dtype, size: int = 1536, repeats: int = 5) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    return 2 * size**3 / best_seconds(lambda: a @ b, device, repeats)


# ---------------------------------------------------------------------------- 3. the step
def step_seconds(loops: dict[str, RunnerLoop], steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each loop over ``repeats`` interleaved rounds (after a
    warm-up round) of steps 1..``steps``."""
    times: dict[str, list[float]] = {name: [] for name in loops}
    for round_ in range(repeats + 1):
        for name, loop in loops.items():
            loop.run.model.train()
            device = loop.run.dist.device
            start = now(device)
            for step in range(1, steps + 1):
                loop.step(step)
            if round_:
                times[name].append((now(device) - start) / steps)
    return {name: statistics.median(samples) for name, samples in times.items()}


# ---------------------------------------------------------------------------- 4. the profile
def _range(name: str):
    return torch.profiler.record_function(LABEL + name)


def module_group(name: str, module, head) -> str | None:
    kind = type(module).__name__
    if module is head:
        return "lm_head"
    if ".lora_A." in f"{name}." or ".lora_B." in f"{name}." or hasattr(module, "lora_A"):
        return "LoRA rank-8 matmuls"  # peft's wrapper too: the LoRA path's scale and add
    if isinstance(module, torch.nn.Linear):
        return "base matmuls"
    if kind.endswith("RMSNorm") or kind.endswith("LayerNorm"):
        return "norms"
    if kind.endswith("RotaryEmbedding"):
        return "rotary"
    if kind.endswith("Attention"):
        return "softmax/attention"
    return None


@contextlib.contextmanager
def labelled(loop: RunnerLoop):
    """Profiler ranges around the step's parts (module hooks, the rotary function, the
    optimizer's and the probe's calls); undone on exit."""
    run = loop.run
    model = run.model
    head = model.get_output_embeddings()
    undo = []
    for name, module in model.named_modules():
        group = module_group(name, module, head)
        if group is None:
            continue
        stack: list = []

        def enter(module, args, group=group, stack=stack):
            context = _range(group)
            context.__enter__()
            stack.append(context)

        def leave(module, args, output, stack=stack):
            stack.pop().__exit__(None, None, None)

        undo.append(module.register_forward_pre_hook(enter).remove)
        undo.append(module.register_forward_hook(leave).remove)
    for module in model.modules():
        rotary = sys.modules.get(type(module).__module__)
        if rotary is not None and hasattr(rotary, "apply_rotary_pos_emb"):
            original = rotary.apply_rotary_pos_emb
            if getattr(original, "_labelled", False):
                continue
            wrapped = _wrap(original, "rotary")
            wrapped._labelled = True
            rotary.apply_rotary_pos_emb = wrapped
            undo.append(functools.partial(setattr, rotary, "apply_rotary_pos_emb", original))
    objects = [
        (run.optimizer, ("step", "zero_grad"), "optimizer"),
        (run.scheduler, ("step",), "optimizer"),
        (run.probe, ("arm", "before_update", "after_update"), "probe"),
    ]
    for obj, methods, group in objects:
        for method in methods:
            undo.append(_patch(obj, method, _wrap(getattr(obj, method), group)))
    for handle in getattr(run.probe, "_hooks", []):
        hooks = handle.hooks_dict_ref()
        if hooks is not None and handle.id in hooks:
            original = hooks[handle.id]
            hooks[handle.id] = _wrap(original, "probe")
            undo.append(functools.partial(hooks.__setitem__, handle.id, original))
    try:
        yield
    finally:
        for action in reversed(undo):
            action()


def _patch(obj, name: str, value):
    """Set ``obj.name`` (an instance attribute); return what puts back what was there (an
    instance attribute, such as the scheduler's wrapper of ``optimizer.step``, or none)."""
    missing = object()
    before = obj.__dict__.get(name, missing)
    setattr(obj, name, value)

    def restore():
        if before is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, before)

    return restore


def _wrap(fn, group: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _range(group):
            return fn(*args, **kwargs)

    return wrapper


def op_group(name: str) -> str | None:
    op = name.split("::")[-1].rstrip("_")
    if op in HEAD_LOSS:
        return "lm_head"
    if op in ELEMENTWISE:
        return "elementwise ops"
    return None


def profile_groups(loop: RunnerLoop, step: int) -> tuple[dict[str, float], float]:
    """Seconds of each group in one profiled step, and the step's seconds."""
    from torch.profiler import ProfilerActivity, profile

    cuda = loop.run.dist.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    loop.run.model.train()
    with labelled(loop), profile(activities=activities) as prof:
        with torch.profiler.record_function(LABEL + "step"):
            loop.step(step)
        if cuda:
            torch.cuda.synchronize()
    events = list(prof.events())
    # forward ops' groups by autograd sequence number: their backward counts with them
    label: dict[int, str | None] = {}
    by_sequence: dict[int, str] = {}

    def group_of(event) -> str | None:
        key = id(event)
        if key in label:
            return label[key]
        if event.name.startswith(LABEL) and event.name != LABEL + "step":
            found = event.name[len(LABEL) :]
        elif event.name.startswith("autograd::engine::evaluate_function"):
            found = by_sequence.get(event.sequence_nr)
        else:
            parent = event.cpu_parent
            found = group_of(parent) if parent is not None else None
            if found is None:
                found = op_group(event.name)
        label[key] = found
        return found

    ordered = sorted(events, key=lambda e: e.time_range.start)
    for event in ordered:  # forward ops come before their backward
        group = group_of(event)
        if group is not None and event.sequence_nr >= 0 and not event.name.startswith("autograd::"):
            by_sequence.setdefault(event.sequence_nr, group)
    label.clear()
    seconds: dict[str, float] = dict.fromkeys(GROUPS, 0.0)
    (step,) = [event for event in ordered if event.name == LABEL + "step"]
    step_total = (step.device_time_total if cuda else step.cpu_time_total) / 1e6
    start, end = step.time_range.start, step.time_range.end
    for event in ordered:
        if not (cuda or start <= event.time_range.start and event.time_range.end <= end):
            continue  # on the host: only what ran within the step
        own = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e6
        seconds[group_of(event) or "other"] += own
    if cuda:  # kernel time only: the rest of the step is the host's
        step_total = max(step_total, sum(seconds.values()))
    else:  # time in the step no op accounts for (the profiler's own, Python's) is "other"
        seconds["other"] += max(0.0, step_total - sum(seconds.values()))
    return seconds, step_total


# ---------------------------------------------------------------------------- main
def bench_task(task_name: str, args) -> dict:
    runs = {
        name: build(
            compose(
                overrides(
                    args.model,
                    task_name,
                    max_steps=args.steps * (args.repeats + 2),
                    batch_size=args.batch_size,
                    device=args.device,
                    data_root=args.data_root,
                    probe=probe,
                )
            )
        )
        for name, probe in (("probe off", False), ("probe default", True))
    }
    run = runs["probe off"]
    device = run.dist.device
    examples = step_examples(run, args.steps)
    batches = [run.task.collate(indices) for indices in examples]
    computed = sum(batch["input_ids"].numel() for batch in batches) / args.steps
    real = sum(int(batch["attention_mask"].sum()) for batch in batches) / args.steps
    labels = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches) / args.steps
    limit = shape_limit(run, batches, args.matmul_repeats)
    loops = {name: RunnerLoop.of(r) for name, r in runs.items()}
    measured = step_seconds(loops, args.steps, args.repeats)
    groups, profiled = profile_groups(loops["probe default"], 1)  # the first batch
    return {
        "task": task_name,
        "device": device,
        "tokens": computed,
        "real": real,
        "labels": labels,
        "limit": limit,
        "measured": measured,
        "groups": groups,
        "profiled": profiled,
        "head": run.cfg.trainer.lm_head,
    }


def print_task(result: dict, args, rate: float) -> None:
    limit: Limit = result["limit"]
    print(
        f"\n{result['task']}: {args.steps} steps x batch {args.batch_size}; per step "
        f"{result['tokens']:.0f} token positions computed ({result['real']:.0f} real), LM head "
        f"at {'label' if result['head'] == 'used' else 'all'} positions ({result['labels']:.0f} "
        f"labels); limit: fastest of {args.matmul_repeats}; step: median of {args.repeats} "
        "interleaved rounds"
    )
    print("| part | s/step | share of the limit |")
    print("|---|---|---|")
    for part, seconds in limit.parts.items():
        print(f"| {part} | {seconds:.4f} | {seconds / limit.total:.0%} |")
    print(f"| limit: matmuls and attention alone | {limit.total:.4f} | 100% |")
    for name, seconds in result["measured"].items():
        print(
            f"| measured step, {name} | {seconds:.4f} | step / limit {seconds / limit.total:.2f} |"
        )
    matmuls = sum(s for part, s in limit.parts.items() if not part.startswith("attention"))
    achieved = limit.flops / matmuls if matmuls else 0.0
    print(
        f"At these shapes the linears' matmuls run at {achieved / 1e9:.1f} GFLOP/s on average, "
        f"against {rate / 1e9:.1f} GFLOP/s for a 1536^3 matmul ({achieved / rate:.0%})."
    )
    groups, total = result["groups"], result["profiled"]
    print(
        f"\nprofile of one step (probe at the runner's default): {total:.4f} s under the "
        "profiler, by its clock (the wall clock; the device's on CUDA)"
    )
    print("| group | ms | % of step |")
    print("|---|---|---|")
    for group in GROUPS:
        print(f"| {group} | {groups[group] * 1e3:.1f} | {groups[group] / total:.1%} |")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m", choices=MODELS)
    parser.add_argument("--tasks", nargs="+", default=["bbc_news"], choices=TASKS)
    parser.add_argument("--data-root", default=None, help="local Hub-schema copies (ARC-Easy)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmul-repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    global CLOCK
    cuda = args.device != "cpu" and torch.cuda.is_available()
    CLOCK = time.perf_counter if args.clock == "wall" or cuda else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    rate = square_matmul_rate(device, torch.bfloat16 if cuda else torch.float32)
    where = torch.cuda.get_device_name() if cuda else f"cpu x {torch.get_num_threads()} threads"
    print(
        f"{args.model}, LoRA r8 q/v, Stable-LoRA, the runner's step; {where}; times: "
        f"{'wall (synchronised)' if cuda else args.clock} seconds"
    )
    results = []
    for task_name in args.tasks:
        if task_name in NEEDS_DATA_ROOT and not args.data_root:
            print(f"{task_name}: skipped (no --data-root with a local copy of its data)")
            continue
        result = bench_task(task_name, args)
        print_task(result, args, rate)
        results.append(result)
    print("\n| task | limit s/step | step s/step, probe off | step / limit |")
    print("|---|---|---|---|")
    for result in results:
        limit, step = result["limit"].total, result["measured"]["probe off"]
        print(f"| {result['task']} | {limit:.4f} | {step:.4f} | {step / limit:.2f} |")
    return results


if __name__ == "__main__":
    main()
