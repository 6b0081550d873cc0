"""What a protocol costs at the paper's scale, in GPU-hours, from the step FLOPs.

    python -m experiments.cost                         # the table of docs/experiments.md
    python -m experiments.cost --utilisation 0.3 --peak-tflops 989

LoRA trains a frozen base of N parameters: a step runs the forward pass (2 N FLOPs per token)
and the backward pass for the activations only (another 2 N per token; the frozen weights get
no gradient, and the adapters' own FLOPs are below 1% of N at rank 8 on q_proj and v_proj), so

    training FLOPs = 4 N x T_step x steps,   T_step = batch x mean training sequence length

(not 6 N T: that counts the weight gradients of every parameter). Scoring is forward only,
2 N FLOPs per scored token, each eval question's context and choices counted once per choice
(an upper bound: the runner scores a context once for all its choices):

    eval FLOPs = 2 N x questions x choices x mean sequence length

GPU-hours = FLOPs / (utilisation x peak) / 3600, summed over the protocol's runs, each run's
model, task, steps and batch as its preset composes them at the paper's scale
(:func:`experiments.catalog.sweep_jobs`). The probes (every 50 steps) and checkpoints add a
few percent and are not counted.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

#: Parameters of the paper's base models (the models' cards; embeddings included).
MODEL_PARAMS = {
    "qwen2_0.5b": 0.494e9,
    "llama3.2_1b": 1.236e9,
    "qwen2_1.5b": 1.544e9,
    "llama3.2_3b": 3.213e9,
}


@dataclass(frozen=True)
class TaskSize:
    """A QA task's size for the cost: tokens of one training sequence (prompt and gold answer,
    mean, a stated estimate for Llama/Qwen tokenizers: question lengths of the datasets, capped
    by task.max_length 256), answer choices, questions of the eval split each protocol scores."""

    tokens: int
    choices: int
    test: int  # the split the final runs score (HellaSwag and SIQA: the official validation)
    validation: int  # the split the selection scores


#: Estimates (stated, not measured here: no data is downloaded): mean tokens of a training
#: sequence; the eval splits' sizes are the datasets' own.
TASKS = {
    "hellaswag": TaskSize(tokens=110, choices=4, test=10_042, validation=10_042),
    "siqa": TaskSize(tokens=50, choices=3, test=1_954, validation=1_954),
    "obqa": TaskSize(tokens=35, choices=4, test=500, validation=500),
    "arc_easy": TaskSize(tokens=50, choices=4, test=2_376, validation=570),
    "arc_challenge": TaskSize(tokens=55, choices=4, test=1_172, validation=299),
}
PEAK_TFLOPS = 989.0  # an H100 SXM's bf16 dense peak
UTILISATION = 0.40
PROTOCOLS = ("tuned_select", "tuned_final", "lr_range", "lr_range_a0")


def train_flops(params: float, batch: int, tokens: int, steps: int) -> float:
    """4 N T per step (forward + backward for the activations; no weight gradients of the
    frozen base), T = batch x tokens per sequence."""
    return 4.0 * params * batch * tokens * steps


def eval_flops(params: float, questions: int, choices: int, tokens: int) -> float:
    """2 N per scored token, every choice scored with its context."""
    return 2.0 * params * questions * choices * tokens


def gpu_hours(flops: float, utilisation: float = UTILISATION, peak: float = PEAK_TFLOPS) -> float:
    return flops / (utilisation * peak * 1e12) / 3600.0


@dataclass
class Cost:
    name: str
    runs: int
    steps: int
    batch: int
    train_flops: float
    eval_flops: float

    def hours(self, utilisation: float, peak: float) -> float:
        return gpu_hours(self.train_flops + self.eval_flops, utilisation, peak)


def protocol_cost(name: str) -> Cost:
    """Every run of ``name``'s paper-scale sweep, priced (its model, task, steps, batch and
    eval split as composed)."""
    from experiments.catalog import compose, sweep_jobs

    config = compose(name, "paper")
    steps, batch = int(config.trainer.max_steps), int(config.trainer.batch_size)
    train = evals = 0.0
    jobs = sweep_jobs(name, "paper")
    for job in jobs:
        values = dict(part.split("=", 1) for part in job)
        model = values.get("model", str(config.model.name))
        size = TASKS[values.get("task", str(config.task.name))]
        params = MODEL_PARAMS[model]
        train += train_flops(params, batch, size.tokens, steps)
        # the selection scores the validation split; the final runs score the test role's
        questions = size.validation if name == "tuned_select" else size.test
        evals += eval_flops(params, questions, size.choices, size.tokens)
    return Cost(name, len(jobs), steps, batch, train, evals)


def table(utilisation: float = UTILISATION, peak: float = PEAK_TFLOPS) -> str:
    """The Markdown table of docs/experiments.md: each protocol's runs and GPU-hours."""
    rows = [
        "| protocol | runs | steps x batch | training PFLOP | eval PFLOP | GPU-hours |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    total = 0.0
    for name in PROTOCOLS:
        cost = protocol_cost(name)
        hours = cost.hours(utilisation, peak)
        total += hours
        rows.append(
            f"| `{name}` | {cost.runs} | {cost.steps} x {cost.batch} | "
            f"{cost.train_flops / 1e15:,.0f} | {cost.eval_flops / 1e15:,.0f} | {hours:,.1f} |"
        )
    rows.append(f"| all four | | | | | {total:,.1f} |")
    return "\n".join(rows)


def model_table(utilisation: float = UTILISATION, peak: float = PEAK_TFLOPS) -> str:
    """GPU-minutes of one run (training + scoring the test split) per model and task."""
    header = "| model | " + " | ".join(TASKS) + " |"
    rows = [header, "|---|" + "---:|" * len(TASKS)]
    for model, params in MODEL_PARAMS.items():
        cells = []
        for size in TASKS.values():
            flops = train_flops(params, 16, size.tokens, 2000)
            flops += eval_flops(params, size.test, size.choices, size.tokens)
            cells.append(f"{60 * gpu_hours(flops, utilisation, peak):.1f}")
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--utilisation",
        type=float,
        default=UTILISATION,
        help=f"fraction of the peak reached (default {UTILISATION})",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=PEAK_TFLOPS,
        help=f"the GPU's peak TFLOP/s (default {PEAK_TFLOPS:g}: H100 bf16 dense)",
    )
    args = parser.parse_args(argv)
    effective = args.utilisation * args.peak_tflops
    print(
        f"At {args.utilisation:.0%} of {args.peak_tflops:g} TFLOP/s = {effective:g} TFLOP/s; "
        "training 4 N T per step, scoring 2 N per token (experiments/cost.py).\n"
    )
    print(table(args.utilisation, args.peak_tflops))
    print("\nOne run (2000 steps of batch 16, then its test split), GPU-minutes:\n")
    print(model_table(args.utilisation, args.peak_tflops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
