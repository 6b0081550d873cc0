"""scripts/gpu_check.sh on a machine without CUDA, and its code paths at tiny sizes on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

no_cuda_only = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")


@no_cuda_only
def test_script_says_there_is_no_gpu_and_exits_0_quickly():
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "no CUDA device visible" in result.stdout
    assert time.perf_counter() - start < 60  # torch's import, nothing else


@no_cuda_only
def test_cuda_device_requested_without_one_fails():
    assert gpu_check.main(["--device", "cuda"]) == 1


def test_tiny_cpu_run_measures_every_method(capsys):
    assert gpu_check.main(["--device", "cpu", "--tiny", "--sections", "steps", "e2e"]) == 0
    table = capsys.readouterr().out
    for method in gpu_check.STEP_METHODS:
        assert f"| optimizer step: {method} | ok | " in table
    assert "| optimizer step: per-layer loop / batched Stable-LoRA | ok |" in table
    for method in ("lora", "stable_lora"):
        assert f"| end to end (tiny_llama): {method} | ok | " in table
    assert "FAIL" not in table


def test_a_failing_section_is_a_failed_row_and_exit_1(capsys, monkeypatch):
    def broken(device, sizes):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_check, "end_to_end", broken)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--sections", "e2e", "ddp"]) == 1
    table = capsys.readouterr().out
    assert "| e2e | FAIL | RuntimeError: CUDA error: an illegal memory access" in table
    assert "| ddp: 2 processes | skip | 0 GPU(s) visible, 2 needed |" in table


@pytest.mark.slow
def test_whole_cpu_smoke_run_skips_the_cuda_tests_and_runs_gloo_ddp():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # Sections steps and e2e: the fast test above.
    argv = ["benchmarks/gpu_check.py", "--device", "cpu", "--tiny", "--ddp", "on",
            "--sections", "tests", "ddp"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in result.stdout.splitlines()}
    assert " | skip | " in rows["tests (pytest -m cuda)"]
    assert " 0 passed" not in rows["tests (pytest -m cuda)"]
    assert "skipped (no CUDA device)" in rows["tests (pytest -m cuda)"]
    assert "| ok | status completed, world size 2 |" in rows["ddp: 2 processes, gloo"]
