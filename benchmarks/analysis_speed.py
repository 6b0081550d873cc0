"""Speed of the analysis: collect 1,000 run records and build every table (target < 10 s).

Writes synthetic run directories in the runner's format (``config.yaml``, ``summary.json``,
``metrics.jsonl`` with training, evaluation and probe rows, ``layers.parquet`` with the
per-layer probe rows; one run in ten in the earlier layout, per-layer keys in
``metrics.jsonl``), mixing every kind of
sweep the tables read (QA tasks per task and merged, GSM8K by step, stop rules, target
modules, A0 scales, the reviewer controls, several learning rates) and some failed, diverged
and unfinished runs; then times :func:`analysis.collect.collect` and
:func:`analysis.tables.build_tables` (mean and best of seeds) and prints the figures.

Usage::

    python benchmarks/analysis_speed.py                 # 1,000 runs in a temporary folder
    python benchmarks/analysis_speed.py --runs 5000 --keep /tmp/records
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from stablelora.records.layers import LayerRecords, split_per_layer

MODELS = ("qwen2_0.5b", "llama3.2_1b", "qwen2_1.5b", "llama3.2_3b")
QA = ("hellaswag", "siqa", "obqa", "arc_easy", "arc_challenge")
METHODS = ("lora", "loraplus", "riemann", "lora_rite", "stable_lora")
LAYERS = [f"base_model.model.model.layers.{i}.self_attn.{m}_proj" for i in range(2) for m in "qv"]
PROBE_QUANTITIES = ("delta1", "delta2", "delta3", "dY", "gAZ", "AZ", "Z")


def run_specs(count: int, rng: random.Random):
    """``count`` (name, config changes, summary changes) covering every table's sweep."""
    kinds = itertools.cycle(["qa", "qa", "qa", "merged", "gsm8k", "controls"])
    for index in range(count):
        kind = next(kinds)
        model, seed = rng.choice(MODELS), rng.randrange(3)
        method = rng.choice(METHODS)
        change = {
            "model.name": model,
            "seed": seed,
            "method.name": method,
            "optimizer.builder": method,
            "optim.lr": rng.choice([1e-4, 2e-4]),
        }
        if kind == "qa":
            change["task.name"] = rng.choice(QA)
            change["adapter.init_scale"] = rng.choice([0.0, 0.25, 1.0, 4.0])
        elif kind == "merged":
            change["task.name"] = "merged_qa"
            change["adapter.target_modules"] = rng.choice(
                [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]]
            )
            if method == "stable_lora":
                change["optimizer.stop_rule"] = rng.choice(["norm", "never"])
        elif kind == "gsm8k":
            change.update({"task.name": "metamath_gsm8k", "task.protocol": "generate"})
        else:
            change["task.name"] = "merged_qa"
            variant = rng.choice(["lora", "stable_lora", "shrink_fixed_steps", "adamw_large_wd"])
            change.update({"method.name": variant, "optimizer.builder": variant})
            if variant == "shrink_fixed_steps":
                change.update(
                    {"optimizer.builder": "stable_lora", "optimizer.stop_rule": "steps:200"}
                )
        status = rng.choices(["completed", "failed", "diverged", "incomplete"], [94, 2, 2, 2])[0]
        yield f"run{index:05d}", kind, change, status


def set_dotted(config: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[last] = value


def base_config() -> dict:
    """A resolved config with the sections and keys of the runner's ``config.yaml``."""
    return {
        "model": {
            "name": "qwen2_0.5b",
            "source": "hub",
            "path": "Qwen/Qwen2-0.5B",
            "config": {},
            "dtype": "float32",
            "precision": "auto",
        },
        "task": {
            "name": "hellaswag",
            "family": "hellaswag",
            "protocol": "loglik",
            "prompt_format": "plain",
            "max_length": 256,
        },
        "method": {"name": "lora", "preset": "lora", "adapter": "lora", "optimizer": "adamw"},
        "adapter": {
            "name": "lora",
            "kind": "lora",
            "rank": 8,
            "alpha": 16,
            "target_modules": ["q_proj", "v_proj"],
            "dropout": 0.0,
            "scaling": "lora",
            "init": "default",
            "init_scale": 1.0,
            "use_dora": False,
        },
        "optimizer": {"name": "adamw", "builder": "lora"},
        "optim": {
            "lr": 1e-4,
            "weight_decay": 0.01,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "schedule": "linear",
            "warmup_steps": 0,
        },
        "trainer": {"max_steps": 1000, "batch_size": 16, "eval_every": 250, "log_every": 50},
        "logger": {"mode": "offline", "project": "stablelora"},
        "probe": {"enabled": True, "first_steps": 200, "every": 50},
        "seed": 0,
        "output_root": "outputs",
        "sweep_name": "benchmark",
    }


def write_records(root: Path, count: int, seed: int = 0) -> None:
    """``count`` run directories under ``root``."""
    rng = random.Random(seed)
    for name, _kind, change, status in run_specs(count, rng):
        run_dir = root / name
        run_dir.mkdir(parents=True)
        config = base_config()
        for key, value in change.items():
            set_dotted(config, key, value)
        if config["optimizer"]["builder"] == "stable_lora":  # Stable-LoRA's own options
            config["optimizer"] = {"shrink_ratio": 5e-4, "stop_rule": "norm", **config["optimizer"]}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        acc = rng.uniform(0.3, 0.9)
        metrics, steps = [], 1000 if status == "completed" else rng.randrange(1, 1000)
        legacy, layer_records = rng.random() < 0.1, LayerRecords(run_dir)
        for step in range(0, steps + 1, 50):
            row = {"step": step}
            if step:
                row.update(
                    {
                        "train/loss": rng.uniform(0.5, 2.0),
                        "train/lr": 1e-4,
                        "train/steps_per_s": 5.0,
                    }
                )
            if step and (step <= 200 or step % 100 == 0):  # the probe's cadence
                for q in PROBE_QUANTITIES:
                    row[f"feat/{q}"] = rng.uniform(1e-4, 1e-2)
                    row[f"gamma/{q}"] = rng.uniform(-2, 0)
                    for layer in LAYERS:
                        row[f"feat/{layer}/{q}"] = rng.uniform(1e-4, 1e-2)
                        row[f"gamma/{layer}/{q}"] = rng.uniform(-2, 0)
                for layer in LAYERS:
                    row[f"lora/{layer}/norm_A"] = rng.uniform(1, 2)
                    row[f"lora/{layer}/norm_B"] = rng.uniform(0, 1)
                    row[f"lora/{layer}/width"] = 896.0
                row.update({"lora/norm_A": 1.5, "lora/norm_B": 0.5})
                if not legacy:  # what the runner's recorder does
                    row, per_layer = split_per_layer(row)
                    layer_records.append(step, per_layer)
            if step % 250 == 0:
                row["eval/acc"] = acc * step / 1000
            metrics.append(row)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        layer_records.close()
        if status == "incomplete":
            continue
        final = {"eval/acc": acc}
        if config["task"]["name"] == "merged_qa":
            final.update({f"eval/acc/{t}": rng.uniform(0.3, 0.9) for t in QA})
        shrinks = config["optimizer"]["builder"] == "stable_lora"
        summary = {
            "status": status,
            "error": None if status == "completed" else "synthetic",
            "steps": steps,
            "max_steps": 1000,
            "main_metric": "eval/acc",
            "initial": {"eval/acc": 0.25},
            "final": final if status == "completed" else {},
            "best": {"eval/acc": acc, "step": 1000},
            "train_loss_final": 1.0,
            "wall_time_s": rng.uniform(200, 260),
            "train_time_s": rng.uniform(180, 240),
            "peak_memory_mb": 4000.0,
            "method": config["method"]["name"],
            "task": config["task"]["name"],
            "model": config["model"]["name"],
            "seed": config["seed"],
            "shrink": (
                {
                    layer: {"shrinking": False, "stop_step": rng.randrange(50, 400)}
                    for layer in LAYERS
                }
                if shrinks
                else None
            ),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--keep", type=Path, default=None, help="write the records here, keep them")
    parser.add_argument("--write-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_only:
        write_records(args.write_only, args.runs)
        return {}

    from analysis.collect import collect
    from analysis.tables import build_tables

    root = args.keep or Path(tempfile.mkdtemp(prefix="analysis_speed_"))
    try:
        # The records are written by a child process: the timed analysis then starts, like
        # `python -m analysis.report`, in a process that only reads them (the writer's
        # allocations otherwise slow the timed part down by about a third).
        started = time.perf_counter()
        writer = [sys.executable, __file__, "--runs", str(args.runs), "--write-only", str(root)]
        subprocess.run(writer, check=True)
        written = time.perf_counter() - started
        started = time.perf_counter()
        coll = collect(root)
        collected = time.perf_counter() - started
        timings = {}
        for mode in ("mean", "best"):
            started = time.perf_counter()
            tables = build_tables(coll, mode)
            timings[mode] = time.perf_counter() - started
        total = collected + timings["mean"]
        print(
            f"{len(coll.runs)} runs, {len(coll.history):,} history values "
            f"(records written in {written:.1f} s)"
        )
        print(f"collect:               {collected:6.2f} s")
        print(
            f"every table, mean:     {timings['mean']:6.2f} s  ({len(tables)} tables: "
            f"{', '.join(t.name for t in tables)})"
        )
        print(f"every table, best:     {timings['best']:6.2f} s")
        print(f"collect + tables:      {total:6.2f} s  (target < 10 s)")
        return {"collect_s": collected, "tables_s": timings, "total_s": total}
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
