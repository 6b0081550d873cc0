"""The GPU check: every CUDA-specific test and measurement in one run, offline, one table.

Sections, in order (each one's failure is a row of the table, never the end of the run):

1. ``tests``: the CUDA-marked tests (``pytest -m cuda``): bf16 autocast training step,
   Stable-LoRA's fused AdamW path against foreach, its step without any host-device sync,
   the stacked Riemann/LoRA-RITE layouts on CUDA against the per-layer path on CPU;
2. ``optimizer step``: ``optimizer_overhead.py`` on the Llama-2-7B LoRA layout: the batched
   Stable-LoRA against a per-layer loop with one Python comparison per layer (the authors'
   structure, one sync per layer on a GPU) and torch AdamW foreach / fused, plus Riemann and
   LoRA-RITE in both layouts;
3. ``end to end``: the runner's tokens/s per method on SmolLM2-135M (offline GGUF model);
4. ``ddp``: a 2-process NCCL run of the smoke experiment, when 2+ GPUs are visible.

Without a CUDA device it says so and exits 0. ``--device cpu --tiny`` runs every section's
code on CPU at tiny sizes (tiny Llama, one decoder layer's LoRA layout): a smoke test of this
script, not a measurement. Exit status 1 when any row failed.

    bash scripts/gpu_check.sh                            # a CUDA machine, under 8 minutes
    python benchmarks/gpu_check.py --device cpu --tiny   # the CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
os.environ.update({key: os.environ.get(key, value) for key, value in OFFLINE_ENV.items()})

STEP_METHODS = [
    "adamw",
    "adamw fused",
    "stable_lora shrinking",
    "stable_lora stopped",
    "loop shrinking",
    "loop stopped",
    "riemann",
    "riemann per_layer",
    "riemann stacked",
    "lora_rite",
    "lora_rite per_layer",
    "lora_rite stacked",
]
END_TO_END_METHODS = ["lora", "loraplus", "stable_lora", "riemann", "lora_rite"]


@dataclass
class Row:
    check: str
    result: str  # "ok", "FAIL" or "skip"
    detail: str
    seconds: float | None = None  # set on each section's last row: the section's time


@dataclass
class Sizes:
    """What each section runs: full sizes on CUDA, tiny ones for the CPU smoke run."""

    step_layers: int
    step_steps: int
    step_warmup: int
    model: str
    e2e_methods: list[str]
    e2e_steps: int
    e2e_batch_size: int

    @classmethod
    def for_run(cls, tiny: bool) -> Sizes:
        if tiny:
            return cls(1, 3, 1, "tiny_llama", ["lora", "stable_lora"], 2, 2)
        return cls(32, 20, 3, "smollm2_135m", END_TO_END_METHODS, 30, 8)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:200]


def cuda_tests(device: str, timeout: float) -> list[Row]:
    """``pytest -m cuda`` in a subprocess: on CPU every one of them must be skipped."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs",
               "-p", "no:cacheprovider", "tests"]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", last)}
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no summary"
    if result.returncode != 0:
        failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        return [Row("tests (pytest -m cuda)", "FAIL", "; ".join(failed[:3]) or summary)]
    if device == "cpu":
        only_skipped = counts.get("skipped", 0) > 0 and not counts.get("passed")
        return [
            Row(
                "tests (pytest -m cuda)",
                "skip" if only_skipped else "FAIL",
                f"{summary} (no CUDA device)",
            )
        ]
    return [Row("tests (pytest -m cuda)", "ok" if counts.get("passed") else "FAIL", summary)]


def optimizer_steps(device: str, sizes: Sizes) -> list[Row]:
    """Median optimizer-step time of every method, against torch AdamW (foreach)."""
    import optimizer_overhead

    argv = ["--device", device, "--layers", str(sizes.step_layers), "--steps",
            str(sizes.step_steps), "--warmup", str(sizes.step_warmup),
            "--methods", *STEP_METHODS]  # fmt: skip
    if device == "cpu":
        argv.append("--no-malloc-cache")  # a smoke run: leave the process's allocator alone
    with contextlib.redirect_stdout(io.StringIO()):
        results = optimizer_overhead.main(argv)
    rows = []
    for name, result in results.items():
        target = optimizer_overhead.TARGETS.get(name)
        note = ""
        if target is not None and not result["ratio"] <= target:
            note = f" (target <= {target:g} missed)"
        detail = f"{result['median_s'] * 1e3:.2f} ms, {result['ratio']:.3f}x AdamW foreach{note}"
        rows.append(Row(f"optimizer step: {name}", "ok", detail))
    loop, batched = results["loop shrinking"], results["stable_lora shrinking"]
    rows.append(
        Row(
            "optimizer step: per-layer loop / batched Stable-LoRA",
            "ok",
            f"{loop['median_s'] / batched['median_s']:.2f}x while shrinking",
        )
    )
    return rows


def end_to_end(device: str, sizes: Sizes) -> list[Row]:
    """The runner's training loop (probes off) per method: tokens/s, against the first."""
    import throughput

    base = throughput.base_overrides(
        sizes.model, "bbc_news", sizes.e2e_steps, sizes.e2e_batch_size, device
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        results = throughput.method_throughput(sizes.e2e_methods, base, repeats=1)
    reference = results[sizes.e2e_methods[0]]["tokens_per_s"]
    return [
        Row(
            f"end to end ({sizes.model}): {method}",
            "ok",
            f"{result['tokens_per_s']:.0f} tokens/s, {result['tokens_per_s'] / reference:.3f}x "
            f"{sizes.e2e_methods[0]}",
        )
        for method, result in results.items()
    ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ddp(device: str, timeout: float) -> list[Row]:
    """Two processes (NCCL on CUDA, gloo on CPU) train the smoke experiment through torchrun."""
    torchrun = Path(sys.executable).with_name("torchrun")
    backend = "NCCL" if device == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as output:
        command = [
            str(torchrun),
            "--nproc_per_node=2",
            f"--master_port={_free_port()}",
            "run.py",
            "experiment=tiny_run",
            "logger.mode=disabled",
            f"trainer.device={device}",
            f"output_root={output}",
        ]
        env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        summaries = list(Path(output).glob("runs/*/summary.json"))
        if result.returncode != 0 or len(summaries) != 1:
            tail = (result.stderr.strip().splitlines() or ["no output"])[-1][:200]
            return [Row(f"ddp: 2 processes, {backend}", "FAIL", tail)]
        summary = json.loads(summaries[0].read_text())
    ok = summary.get("status") == "completed" and summary.get("world_size") == 2
    detail = f"status {summary.get('status')}, world size {summary.get('world_size')}"
    return [Row(f"ddp: 2 processes, {backend}", "ok" if ok else "FAIL", detail)]


def print_table(rows: list[Row]) -> None:
    print("| check | result | detail | s |")
    print("|---|---|---|---|")
    for row in rows:
        seconds = "" if row.seconds is None else f"{row.seconds:.1f}"
        print(f"| {row.check} | {row.result} | {row.detail} | {seconds} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="auto: cuda if visible, else report that and exit 0",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU smoke run)")
    parser.add_argument(
        "--ddp",
        choices=["auto", "on", "off"],
        default="auto",
        help="auto: only with 2+ GPUs; on: also on CPU (gloo)",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["tests", "steps", "e2e", "ddp"],
        choices=["tests", "steps", "e2e", "ddp"],
    )
    parser.add_argument(
        "--budget-s", type=float, default=450.0, help="no section starts after this many seconds"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    device = args.device
    if device == "auto":
        if not torch.cuda.is_available():
            print(
                "GPU check: no CUDA device visible (torch.cuda.is_available() is False): "
                "nothing to check on this machine. A CPU smoke run of the same code: "
                "python benchmarks/gpu_check.py --device cpu --tiny"
            )
            return 0
        device = "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("GPU check: --device cuda, but no CUDA device is visible.", file=sys.stderr)
        return 1
    sizes = Sizes.for_run(args.tiny)
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    run_ddp = args.ddp == "on" or (args.ddp == "auto" and gpus >= 2)
    sections = {
        "tests": lambda: cuda_tests(device, timeout=240),
        "steps": lambda: optimizer_steps(device, sizes),
        "e2e": lambda: end_to_end(device, sizes),
        "ddp": lambda: (
            ddp(device, timeout=180)
            if run_ddp
            else [Row("ddp: 2 processes", "skip", f"{gpus} GPU(s) visible, 2 needed")]
        ),
    }
    rows: list[Row] = []
    for name in args.sections:
        began = time.perf_counter()
        if began - start > args.budget_s:
            rows.append(Row(name, "FAIL", f"not started: past the {args.budget_s:g} s budget"))
            continue
        try:
            section_rows = sections[name]()
        except Exception as error:  # one failed section must not hide the others
            section_rows = [Row(name, "FAIL", _one_line(error))]
        section_rows[-1].seconds = time.perf_counter() - began
        rows.extend(section_rows)

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU smoke run"
    failed = sum(row.result == "FAIL" for row in rows)
    print(
        f"GPU check on {device} ({name}), torch {torch.__version__}, {gpus} GPU(s), "
        f"{'tiny sizes, ' if args.tiny else ''}{time.perf_counter() - start:.0f} s: "
        f"{'all passed' if not failed else f'{failed} FAILED'}"
    )
    print_table(rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
