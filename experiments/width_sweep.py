"""Width sweep of the feature-update decomposition on the toy teacher task.

For every method (lora, rslora, loraplus, stable_lora), width n, seed and learning-rate mode,
train rank-r LoRA adapters on :class:`stablelora.toy.ToyTeacherTask` with the
:class:`stablelora.gamma.FeatureProbe` attached, write one jsonl record per run with the probe
metrics of every logged step, then fit the width exponents (``analysis/width_fit.py``).

Learning-rate modes: ``fixed`` uses ``--lr`` at every width; ``scaled`` uses
``lr * (base_width / n) ** lr_exponent`` (default exponent 1/2: the paper's self-stability
condition gamma[s] + 2 gamma[eta] + 1 = 0 with a width-independent scale s).

Usage::

    python -m experiments.width_sweep                  # the full sweep (< 15 min on 2 cores)
    python -m experiments.width_sweep --smoke          # 3 widths, 1 seed, 20 steps (seconds)
    python -m experiments.width_sweep --lr-modes fixed --widths 128 512 2048 --seeds 0 1
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from stablelora import apply_lora, create_optimizer, find_lora_pairs
from stablelora.gamma import FeatureProbe
from stablelora.toy import TOY_TARGET_MODULES, ToyTeacherTask, build_toy_model

WIDTHS = (128, 256, 512, 1024, 2048, 4096)
METHODS = ("lora", "rslora", "loraplus", "stable_lora")
LR_MODES = ("fixed", "scaled")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lr-modes", nargs="+", default=list(LR_MODES), choices=LR_MODES)
    p.add_argument("--lr", type=float, default=1e-3, help="lr (at --base-width when scaled)")
    p.add_argument("--lr-exponent", type=float, default=0.5, help="scaled: lr ~ n^-exponent")
    p.add_argument("--base-width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2, help="LoRA layers (n x n) in the toy model")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shrink-ratio", type=float, default=5e-3,
                   help="Stable-LoRA's lambda (the top of the paper's grid)")  # fmt: skip
    p.add_argument("--loraplus-lr-ratio", type=float, default=16.0)
    p.add_argument("--probe-first-steps", type=int, default=20)
    p.add_argument("--probe-every", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--per-layer", action="store_true", help="also keep the per-layer keys")
    p.add_argument("--fit-steps", type=int, nargs="+", default=None,
                   help="steps to fit (default: 2 10 50 100 and the last)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default="outputs/width_sweep")
    p.add_argument("--smoke", action="store_true",
                   help="3 widths, 1 seed, at most 20 steps (all logged), fixed lr")  # fmt: skip
    args = p.parse_args(argv)
    if args.smoke:
        args.widths, args.seeds, args.lr_modes = [128, 256, 512], [0], ["fixed"]
        args.steps = min(args.steps, 20)
        args.probe_first_steps, args.probe_every = args.steps, 0
    return args


def learning_rate(args: argparse.Namespace, width: int, lr_mode: str) -> float:
    if lr_mode == "fixed":
        return args.lr
    return args.lr * (args.base_width / width) ** args.lr_exponent


def train_with_probe(model, task, optimizer, probe, *, steps, batch_size, seed) -> list[dict]:
    """The minimal training loop: ``steps`` optimizer steps with the FeatureProbe contract.

    Returns one dict per logged step: ``{"step", "loss", **probe metrics}``. Kept apart so it
    can be swapped for the runner's ``stablelora.train.train``.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(task.num_train_examples, generator=generator)
    position, logged = 0, []
    model.train()
    for step in range(1, steps + 1):
        if position + batch_size > len(order):  # a new epoch
            order, position = torch.randperm(task.num_train_examples, generator=generator), 0
        batch = task.collate(order[position : position + batch_size])
        position += batch_size
        probe.arm(step)
        loss = model(**batch).loss
        loss.backward()
        probe.before_update()
        optimizer.step()
        metrics = probe.after_update(optimizer)
        optimizer.zero_grad(set_to_none=True)
        if metrics:
            logged.append({"step": step, "loss": loss.item(), **metrics})
    return logged


def run_one(args, base_model, task, method: str, lr_mode: str, seed: int) -> dict:
    """Train one (method, width, lr_mode, seed) from a copy of ``base_model``: its record."""
    torch.manual_seed(seed)  # the same A0 for every method of a seed
    model = apply_lora(
        copy.deepcopy(base_model), rank=args.rank, alpha=args.alpha,
        target_modules=list(TOY_TARGET_MODULES),
        scaling="rslora" if method == "rslora" else "lora",
    )  # fmt: skip
    lr = learning_rate(args, task.width, lr_mode)
    options = {"loraplus_lr_ratio": args.loraplus_lr_ratio} if method == "loraplus" else {}
    optimizer = create_optimizer(model, method, lr=lr, shrink_ratio=args.shrink_ratio, **options)
    pairs = find_lora_pairs(model)
    probe = FeatureProbe(
        model, pairs, first_steps=args.probe_first_steps, every=args.probe_every,
        max_tokens=args.max_tokens, per_layer=args.per_layer,
    )  # fmt: skip
    initial = task.evaluate(model)
    start = time.perf_counter()
    metrics = train_with_probe(
        model, task, optimizer, probe, steps=args.steps, batch_size=args.batch_size, seed=seed
    )
    seconds = time.perf_counter() - start
    probe.close()
    return {
        "method": method, "width": task.width, "seed": seed, "lr_mode": lr_mode, "lr": lr,
        "depth": args.depth, "rank": args.rank, "alpha": args.alpha, "scale": pairs[0].scale,
        "steps": args.steps, "batch_size": args.batch_size, "shrink_ratio": args.shrink_ratio,
        "train_seconds": seconds, "eval_loss_initial": initial["loss"],
        "eval_loss": task.evaluate(model)["loss"], "metrics": metrics,
    }  # fmt: skip


def run_sweep(args: argparse.Namespace) -> Path:
    """Run every configuration, appending to ``<out>/records.jsonl``; return its path."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "records.jsonl"
    path.write_text("")
    for seed in args.seeds:
        for width in args.widths:
            # One frozen model and one task per (width, seed): building them costs O(n^2).
            base_model = build_toy_model(width, args.depth, seed)
            task = ToyTeacherTask(width, args.depth, seed)
            for lr_mode in args.lr_modes:
                for method in args.methods:
                    record = run_one(args, base_model, task, method, lr_mode, seed)
                    with path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    print(
                        f"{method:12s} n={width:5d} seed={seed} lr {lr_mode:6s} "
                        f"eval loss {record['eval_loss_initial']:.3f} -> {record['eval_loss']:.3f} "
                        f"({record['train_seconds']:.1f}s)",
                        flush=True,
                    )
    return path


def main(argv=None) -> dict:
    """Run the sweep and the fit; return :func:`analysis.width_fit.analyze`'s result."""
    from analysis.width_fit import analyze

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    records = run_sweep(args)
    result = analyze(records, args.out, args.fit_steps)
    print(result["markdown"])
    print(f"\nsweep + fit: {time.perf_counter() - start:.0f}s; files: "
          + ", ".join(str(p) for p in result["files"]))  # fmt: skip
    return result


if __name__ == "__main__":
    main()
