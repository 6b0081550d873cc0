#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): CUDA-marked tests, optimizer step times, end-to-end
# tokens/s per method on SmolLM2-135M and 2-process NCCL DDP, offline, in at most 8 minutes.
# Prints one table; exit status 1 when a check failed. Without a CUDA device it says so and
# exits 0. Options go to the Python helper (e.g. --sections tests steps).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
# The helper starts no section after 450 s; the hard limit leaves it time to print the table.
exec timeout --kill-after=10 480 "$PYTHON" benchmarks/gpu_check.py --budget-s 420 "$@"
