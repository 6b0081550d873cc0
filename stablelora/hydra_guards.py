"""What run.py puts around Hydra, so that a user's mistake is one line and exit code 2 (a
usage error) instead of Hydra's traceback: the command line's config group options, checked
before Hydra composes (:func:`check_command_line`); ``output_root``, checked by a Hydra
callback before Hydra creates a folder in it (:class:`OutputRootCheck`); and Hydra's own copy
of the config on a full disk (:func:`guard_hydra_save`)."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.experimental.callback import Callback

from stablelora.config_groups import group_options
from stablelora.errors import CONFIG_ERROR_EXIT

#: Hydra's flags that take the next argument as their value (not an override).
_VALUED_FLAGS = (
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--info",
)


def check_command_line(args: list[str], conf_dir: Path) -> list[str]:
    """Check what Hydra only finds with a long error and exit code 1, before it composes:
    an override picking an option a config group does not have (``model=nope``, or a shared
    base such as ``task=_base``). Returns one warning per key given twice (Hydra silently
    takes the last value).

    Raises:
        ValueError: one line naming the override and the group's options.
    """
    if any(arg.startswith("hydra.searchpath") for arg in args):
        return []  # options may come from other config folders
    overrides, skip = [], False
    for arg in args:
        if skip or arg.startswith("-"):
            skip = not skip and arg in _VALUED_FLAGS
            continue
        if "=" in arg and not arg.startswith("~"):
            overrides.append(arg)
    warnings: list[str] = []
    seen: dict[str, str] = {}
    for override in overrides:
        key, _, value = override.lstrip("+").partition("=")
        if key in seen and seen[key] != value:
            warnings.append(
                f"{key} is given twice on the command line ({key}={seen[key]}, {key}={value}); "
                f"Hydra takes the last: {key}={value}."
            )
        seen[key] = value
        if "." in key or "/" in key or not (Path(conf_dir) / key).is_dir():
            continue  # a value, or a group of Hydra's own (hydra/launcher=joblib)
        if "(" in value or value in ("null", ""):
            continue  # a sweep function (range(), glob()) or no option
        options = group_options(Path(conf_dir), key)
        for choice in (choice.strip() for choice in value.split(",")):
            if choice not in options:
                base = any(part.startswith("_") for part in choice.split("/"))
                raise ValueError(
                    f"{key}={choice} is not an option of conf/{key}/"
                    + (" (a shared base)" if base else "")
                    + f"; choose one of {', '.join(options)}"
                    + ("." if base else f" (or add conf/{key}/{choice}.yaml).")
                )
    return warnings


def save_hydra_config_or_exit(cfg, filename: str, output_dir: Path) -> None:
    """Hydra's ``_save_config`` (its copy of the config in ``.hydra/``), with a full disk
    turned into one line instead of a traceback (installed by :func:`guard_hydra_save`)."""
    try:
        _hydra_save_config(cfg, filename, output_dir)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        sys.exit(
            f"stablelora: no space left on device ({Path(output_dir) / filename}): free some "
            "space and rerun the same command."
        )


def guard_hydra_save() -> None:
    """Route Hydra's ``_save_config`` through :func:`save_hydra_config_or_exit` (idempotent)."""
    global _hydra_save_config
    import hydra.core.utils

    if hydra.core.utils._save_config is not save_hydra_config_or_exit:
        _hydra_save_config = hydra.core.utils._save_config
        hydra.core.utils._save_config = save_hydra_config_or_exit


_hydra_save_config: Callable[..., None]


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


class OutputRootCheck(Callback):
    """Stop with one line (exit code 2) when ``output_root`` is unusable, before Hydra
    creates the run or sweep folder inside it (which would fail with a traceback)."""

    def _check(self, config) -> None:
        try:
            check_output_root(Path(str(config.output_root)))
        except ValueError as error:
            print(f"stablelora: config error: {error}", file=sys.stderr)
            sys.exit(CONFIG_ERROR_EXIT)

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config)
