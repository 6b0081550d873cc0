"""What a run can reach without the network, in one place for the models and the tasks: the
Hugging Face offline switches, data files inside installed packages (found without importing
them), and the cache of dequantised models. Imports nothing heavy."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

#: The values of an environment variable that switch it on (as huggingface_hub reads them).
TRUE_VALUES = ("1", "true", "yes", "on")
#: The Hub client's switch: no model, tokenizer or dataset download.
HUB_OFFLINE = "HF_HUB_OFFLINE"
#: The ``datasets`` library's own switch (no dataset download); the Hub's applies to it too.
DATASETS_OFFLINE = "HF_DATASETS_OFFLINE"


def offline_flag(variables: tuple[str, ...] = (DATASETS_OFFLINE, HUB_OFFLINE)) -> str | None:
    """The first of ``variables`` that is switched on (:data:`TRUE_VALUES`), or None. The
    default asks whether datasets may be downloaded."""
    for var in variables:
        if os.environ.get(var, "").strip().lower() in TRUE_VALUES:
            return var
    return None


def hub_offline() -> bool:
    """True when the Hugging Face Hub must not be contacted (``HF_HUB_OFFLINE``): what a
    model or tokenizer download asks."""
    return offline_flag((HUB_OFFLINE,)) is not None


def package_dir(package: str) -> Path | None:
    """The folder of the installed ``package``, found without importing it (some corpus
    packages load everything on import), or None when it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Where dequantised models are cached (``$STABLELORA_CACHE``, else ~/.cache/stablelora)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stablelora"
    return Path(os.environ.get("STABLELORA_CACHE", default))
