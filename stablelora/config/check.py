"""Check a composed config: every error a user can make in it, found before anything loads.

:func:`check_config` raises :class:`~stablelora.config.errors.ConfigError` with one line saying what
is wrong and how to fix it; the runner reports it and exits with
:data:`~stablelora.config.errors.CONFIG_ERROR_EXIT` (2, a usage error). A config that passes
comes back as its :class:`~stablelora.config.spec.RunSpec`, what the runner builds the run from.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from stablelora.config.errors import ConfigError
from stablelora.config.groups import check_groups
from stablelora.config.keyword_options import check_options
from stablelora.config.schema import check_schema
from stablelora.config.spec import RunSpec, optimizer_arguments, plain_config, run_spec
from stablelora.lora import check_lora_options, check_target_modules, lora_options
from stablelora.models import check_model_config, skeleton
from stablelora.optim import check_optimizer_options
from stablelora.tasks import check_chat_template, check_task_config

__all__ = [  # plain_config, optimizer_arguments: re-exported from stablelora.config.spec
    "DECLARED_GROUPS",
    "RunSpec",
    "check_config",
    "check_output_root",
    "optimizer_arguments",
    "plain_config",
]

#: Groups checked against the keys their yaml files declare (stablelora.config.groups); the
#: adapter and optimizer groups are checked against apply_lora's and the builders' signatures.
DECLARED_GROUPS = ("model", "task", "method", "optim", "trainer", "logger", "probe")


def check_config(cfg, config_dirs=None) -> RunSpec:
    """The run's :class:`~stablelora.config.spec.RunSpec`, or :class:`ConfigError` (one line:
    what is wrong, how to fix it) for a bad config: a key no yaml of its group declares, a value
    of the wrong type or range, an adapter or optimizer option their functions do not take, an
    unusable ``output_root``, a model or task that cannot be loaded. Loads nothing;
    ``config_dirs``: the config search path (default: Hydra's, or the repository's ``conf/``)."""
    if "hydra" in cfg:  # Hydra's own node resolves only inside a running job
        cfg = OmegaConf.masked_copy(cfg, [str(key) for key in cfg if key != "hydra"])
    try:
        plain = plain_config(cfg)
    except Exception as error:  # noqa: BLE001 - any resolution error is a config error
        key = getattr(error, "full_key", None)
        where = f"{key} cannot be resolved: " if key else ""
        raise ConfigError(f"{where}{str(error).splitlines()[0]}") from None
    trainer = plain["trainer"]
    try:
        check_schema(plain)
        check_groups(plain, DECLARED_GROUPS, config_dirs)
        adapter_keys = ["name", "kind", *(k for k in lora_options() if k != "adapter")]
        check_options(plain["adapter"], adapter_keys, f"adapter={plain['adapter'].get('name')}")
        spec = run_spec(plain)
        needs_model = ("init", "target_modules", "modules_to_save", "task_type")
        check_lora_options(**{k: v for k, v in spec.adapter.items() if k not in needs_model})
        builder, name = spec.optimizer, plain["optimizer"].get("name")
        where = f"optimizer={name} (builder {builder!r})"
        check_optimizer_options(builder, spec.optimizer_options, where)
        check_model_config(cfg.model)
        check_task_config(spec.task)
        check_chat_template(spec.task, cfg.model)
    except ValueError as error:
        raise ConfigError(_config_message(str(error))) from None
    try:
        check_output_root(Path(plain["output_root"]))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:
        model_tree = skeleton(cfg.model)
    except Exception as error:  # noqa: BLE001 - transformers' own checks of an architecture
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "Error:" in line), lines[0] if lines else "")
        raise ConfigError(f"model.config cannot build {cfg.model.name}: {reason}") from None
    if model_tree is not None:
        try:
            check_target_modules(model_tree, spec.adapter["target_modules"])
        except ValueError as error:
            message = str(error).replace("target_modules", "adapter.target_modules", 1)
            raise ConfigError(message) from None
    if trainer["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device=cuda, but no CUDA device is visible: use trainer.device=cpu."
        )
    return spec


def _config_message(message: str) -> str:
    """Name the config key of an apply_lora / create_optimizer argument in its message."""
    for group, names in (
        ("adapter", ("rank", "alpha", "scaling", "dropout", "init_scale")),
        (
            "optimizer",
            ("shrink_ratio", "stop_rule", "loraplus_lr_ratio", "large_wd_on", "large_weight_decay"),
        ),
    ):
        for name in names:
            if message.startswith(name):
                return f"{group}.{message}"
    return message


def check_output_root(root: Path) -> None:
    """Raise a one-line ValueError when ``root`` is (inside) a file or cannot be written."""
    existing = Path(root)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"output_root={root}: {existing} is a file, not a directory: set output_root to "
            "a directory."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"output_root={root}: {existing} is not writable: set output_root to a writable "
            "directory."
        )
    try:  # root passes os.access everywhere, yet cannot write in /sys or a read-only mount
        tempfile.TemporaryDirectory(dir=existing, prefix=".stablelora-write-check-").cleanup()
    except OSError as error:
        raise ValueError(
            f"output_root={root}: {existing} cannot be written ({error.strerror}): set "
            "output_root to a writable directory."
        ) from None
