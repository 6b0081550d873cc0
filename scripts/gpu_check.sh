#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): CUDA-marked tests, optimizer step times, end-to-end
# tokens/s per method on SmolLM2-135M and 2-process NCCL DDP, offline; then, on a CUDA machine,
# the side-by-side table against the peers (benchmarks/peers.py: training tokens/s against
# transformers' Trainer and TRL's SFTTrainer, scoring s/question against lm-evaluation-harness,
# on the GPU), all in at most 9.5 minutes. Prints the tables; exit status 1 when a check
# failed. Without a CUDA device it says so and exits 0. Options go to the Python helper
# (e.g. --sections tests steps). ARC-Easy joins the peers' table when a local copy of its data
# is found: $STABLELORA_DATA_ROOT, or shared/data beside or above the repository
# (<root>/arc_easy/*.jsonl); otherwise that task is skipped with one line.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
status=0
# The helper starts no section after 360 s; the hard limit leaves it time to print the table.
timeout --kill-after=10 420 "$PYTHON" benchmarks/gpu_check.py --budget-s 360 "$@" || status=$?

# The peers' table, on a machine with a visible NVIDIA GPU only (no second Python start
# elsewhere: without CUDA the check above has said so).
if [ "${CUDA_VISIBLE_DEVICES-unset}" != "" ] && command -v nvidia-smi >/dev/null 2>&1 \
    && nvidia-smi -L >/dev/null 2>&1; then
    data_root=()
    for root in "${STABLELORA_DATA_ROOT:-}" shared/data ../shared/data; do
        if [ -n "$root" ] && [ -d "$root/arc_easy" ]; then
            data_root=(--data-root "$root")
            break
        fi
    done
    echo
    echo "Side by side with the peers on the GPU (benchmarks/peers.py):"
    timeout --kill-after=10 150 "$PYTHON" benchmarks/peers.py --device cuda \
        "${data_root[@]}" || status=1
fi
exit "$status"
