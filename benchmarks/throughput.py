"""Tokens per second of the runner's training loop against a bare PyTorch loop.

Both train the same model (same LoRA layers, optimizer, batches) side by side in one process,
alternating repetitions so that a noisy shared machine hits both alike. The runner is timed
through ``stablelora.runner.train.train`` itself (its ``train_time_s``: the loop only, without model
loading and evaluation), once with the feature probe off and once at its default cadence.

    python benchmarks/throughput.py                          # tiny Llama, quick
    python benchmarks/throughput.py --model smollm2_135m --steps 30 --repeats 2
    python benchmarks/throughput.py --model smollm2_135m --methods lora stable_lora riemann

Target: runner / bare >= 0.95 (probe off).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from stablelora.config.identity import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def count_tokens(cfg) -> int:
    """Tokens (attention mask sum) the run reads in ``max_steps`` steps."""
    from stablelora.models import load_tokenizer
    from stablelora.runner.setup import batch_indices
    from stablelora.tasks import build_task

    tokenizer = load_tokenizer(cfg.model.tokenizer or "smollm2")
    task = build_task(cfg.task, tokenizer, seed=cfg.seed)
    batch, total = cfg.trainer.batch_size, 0
    for step in range(cfg.trainer.max_steps):
        indices = batch_indices(task.num_train_examples, cfg.seed, step * batch, batch)
        total += int(task.collate(indices)["attention_mask"].sum())
    return total


def runner_seconds(cfg) -> float:
    from stablelora.runner.train import train

    with tempfile.TemporaryDirectory() as run_dir:
        return train(cfg, Path(run_dir))["train_time_s"]


def bare_seconds(cfg) -> float:
    """The same training written as the shortest loop: no records, probes or checks."""
    from omegaconf import OmegaConf

    from stablelora.config.check import optimizer_arguments
    from stablelora.lora import adapter_arguments, apply_lora
    from stablelora.models import load_model
    from stablelora.optim import create_optimizer
    from stablelora.runner.setup import batch_indices
    from stablelora.tasks import build_task

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model)
    plain = OmegaConf.to_container(cfg, resolve=True)
    model = apply_lora(model, **adapter_arguments(plain["adapter"], cfg.trainer.max_steps))
    task = build_task(cfg.task, tokenizer, seed=cfg.seed)
    builder, options = optimizer_arguments(plain["optimizer"])
    optimizer = create_optimizer(model, builder, lr=cfg.optim.lr, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch_size = cfg.trainer.batch_size
    model.train()
    start = time.perf_counter()
    for step in range(cfg.trainer.max_steps):
        indices = batch_indices(task.num_train_examples, cfg.seed, step * batch_size, batch_size)
        loss = model(**task.collate(indices)).loss
        loss.backward()
        loss.item()  # the runner reads the loss every step (NaN check): so does this loop
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny_llama")
    parser.add_argument("--task", default="bbc_news")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="instead: the runner's loop per method (probe off), as ratios to the first",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = base_overrides(args.model, args.task, args.steps, args.batch_size, args.device)
    if args.methods:
        compare_methods(args, base)
        return
    configs = {
        "bare loop": compose(base),
        "runner, probe off": compose(base + ["probe=off"]),
        "runner, probe default": compose(base),
    }
    tokens = count_tokens(configs["bare loop"])
    times = {name: [] for name in configs}
    for _ in range(args.repeats):  # interleaved: ABCABC...
        times["bare loop"].append(bare_seconds(configs["bare loop"]))
        for name in ("runner, probe off", "runner, probe default"):
            times[name].append(runner_seconds(configs[name]))
    bare = statistics.median(times["bare loop"])
    device = "cuda" if torch.cuda.is_available() else f"cpu x {torch.get_num_threads()} threads"
    print(
        f"{args.model} on {args.task}, {args.steps} steps x batch {args.batch_size}, "
        f"{tokens} tokens, {device}, median of {args.repeats}"
    )
    print("| loop | seconds | tokens/s | ratio to bare |")
    print("|---|---|---|---|")
    for name, samples in times.items():
        seconds = statistics.median(samples)
        print(f"| {name} | {seconds:.2f} | {tokens / seconds:.0f} | {bare / seconds:.3f} |")
    if torch.cuda.is_available():
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    else:
        import resource

        print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def base_overrides(model: str, task: str, steps: int, batch_size: int, device: str) -> list:
    """Hydra overrides of a timed run: no evaluation, checkpoints, logger or progress bar."""
    return [
        f"model={model}",
        f"task={task}",
        "method=stable_lora",
        "logger.mode=disabled",
        f"trainer.max_steps={steps}",
        f"trainer.batch_size={batch_size}",
        "trainer.eval_before=false",
        "trainer.max_eval_examples=1",
        "trainer.checkpoint_every=0",
        "trainer.progress_bar=false",
        "trainer.resume=false",
        "trainer.log_every=10",
        f"trainer.device={device}",
        # Like for like with the bare loop (the plain stream, the full forward): this measures
        # the runner's overhead; benchmarks/step_speed.py measures the faster paths.
        "trainer.length_grouping=0",
        "trainer.lm_head=all",
    ]


def method_throughput(methods, base, repeats: int) -> dict[str, dict[str, float]]:
    """The runner's loop (probes off) per method, interleaved: median seconds and tokens/s.

    ``base``: Hydra overrides shared by every method (model, task, steps, ...).
    """
    configs = {m: compose(base + [f"method={m}", "probe=off"]) for m in methods}
    tokens = {m: count_tokens(cfg) for m, cfg in configs.items()}
    times = {m: [] for m in methods}
    for _ in range(repeats):
        for method, cfg in configs.items():
            times[method].append(runner_seconds(cfg))
    results = {}
    for method, samples in times.items():
        seconds = statistics.median(samples)
        results[method] = {"seconds": seconds, "tokens_per_s": tokens[method] / seconds}
    return results


def compare_methods(args, base) -> None:
    """End-to-end time of the runner's training loop per method, interleaved."""
    results = method_throughput(args.methods, base, args.repeats)
    reference = results[args.methods[0]]["seconds"]
    print(
        f"{args.model} on {args.task}, {args.steps} steps x batch {args.batch_size}, "
        f"runner loop without probes, median of {args.repeats}"
    )
    print(f"| method | seconds | tokens/s | ratio to {args.methods[0]} |")
    print("|---|---|---|---|")
    for method, result in results.items():
        seconds = result["seconds"]
        print(
            f"| {method} | {seconds:.2f} | {result['tokens_per_s']:.0f} | "
            f"{seconds / reference:.3f} |"
        )


if __name__ == "__main__":
    main()
