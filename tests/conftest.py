"""Test-wide settings and the helpers several test modules share.

Settings: offline (an accidental Hub call fails at once), W&B offline, at most 2 threads.
Shared helpers: :func:`compose_config` (Hydra's compose API on ``conf/``) and the fixtures
below; the tiny models and tokenizer are in ``tests/tiny.py``.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
#: The in-process smoke run: tiny random Llama, offline BBC News, 6 steps, no W&B.
SMOKE = ["experiment=smoke", "logger.mode=disabled"]


def compose_config(overrides=()):
    """``conf/config.yaml`` composed with ``overrides``, as ``python run.py`` would."""
    from hydra import compose, initialize_config_dir

    from stablelora.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=False)


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (bit-reproducible CPU sums), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
