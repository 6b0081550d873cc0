"""Training-step time with the FeatureProbe at its default cadence versus off.

Two copies of a tiny random-init Llama with LoRA on q_proj and v_proj train on the same
batches; every step runs on both, in alternating order, so that machine noise (a shared CPU)
falls on both alike. A step is ``arm, forward, backward, before_update, optimizer.step,
after_update, zero_grad``. Reports the mean step time of each, the overhead of the probe
averaged over the run, and the extra cost of a logging step and of a non-logging step.

Usage::

    python benchmarks/gamma_overhead.py                # 1000 steps (about a minute on CPU)
    python benchmarks/gamma_overhead.py --steps 300    # quicker
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    from stablelora import apply_lora

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq_len,
    )
    return apply_lora(
        LlamaForCausalLM(config), rank=8, alpha=16, target_modules=["q_proj", "v_proj"]
    )


def timed_step(model, optimizer, probe, step, batch) -> float:
    start = time.perf_counter()
    probe.arm(step)
    model(input_ids=batch, labels=batch).loss.backward()
    probe.before_update()
    optimizer.step()
    probe.after_update(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    from stablelora import create_optimizer, find_lora_pairs
    from stablelora.probes.gamma import FeatureProbe

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--method", default="stable_lora")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--first-steps", type=int, default=200)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    off_model = build(args)
    on_model = copy.deepcopy(off_model)
    runs = {}
    for label, model, enabled in (("off", off_model, False), ("on", on_model, True)):
        optimizer = create_optimizer(model, args.method, lr=1e-4)
        probe = FeatureProbe(
            model,
            find_lora_pairs(model),
            first_steps=args.first_steps,
            every=args.every,
            max_tokens=args.max_tokens,
            enabled=enabled,
        )
        runs[label] = {"model": model, "optimizer": optimizer, "probe": probe, "times": []}

    generator = torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=generator)
        order = ("off", "on") if step % 2 else ("on", "off")
        for label in order:
            run = runs[label]
            run["times"].append(
                timed_step(run["model"], run["optimizer"], run["probe"], step, batch)
            )

    off, on = runs["off"]["times"], runs["on"]["times"]
    logging = [runs["on"]["probe"].is_logging_step(t) for t in range(1, args.steps + 1)]
    extra_logging = [b - a for a, b, log in zip(off, on, logging) if log]
    extra_other = [b - a for a, b, log in zip(off, on, logging) if not log]
    result = {
        "steps": args.steps,
        "logging_steps": sum(logging),
        "mean_step_ms_off": 1e3 * statistics.fmean(off),
        "mean_step_ms_on": 1e3 * statistics.fmean(on),
        "overhead_pct": 100 * (sum(on) - sum(off)) / sum(off),
        "logging_step_extra_ms_median": 1e3 * statistics.median(extra_logging),
        "logging_step_extra_ms_mean": 1e3 * statistics.fmean(extra_logging),
        "other_step_extra_ms_median": 1e3 * statistics.median(extra_other) if extra_other else 0,
    }
    print(
        f"tiny Llama (hidden {args.hidden}, {args.layers} layers, LoRA r=8 on q,v: "
        f"{len(find_lora_pairs(on_model))} layers), batch {args.batch_size}x{args.seq_len}, "
        f"{args.method}, {args.threads} thread(s), {args.steps} steps interleaved\n"
        f"probe cadence: every step <= {args.first_steps}, then every {args.every}: "
        f"{result['logging_steps']} logging steps\n"
        f"mean step  off {result['mean_step_ms_off']:.2f} ms"
        f"   on {result['mean_step_ms_on']:.2f} ms"
        f"   overhead {result['overhead_pct']:+.2f}% (averaged over the run)\n"
        f"extra per logging step: median {result['logging_step_extra_ms_median']:.2f} ms, "
        f"mean {result['logging_step_extra_ms_mean']:.2f} ms; "
        f"per other step: median {result['other_step_extra_ms_median']:.3f} ms"
    )
    return result


if __name__ == "__main__":
    main()
