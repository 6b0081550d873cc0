"""What run.py puts around Hydra, so that a user's mistake is one line and exit code 2 (a
usage error) instead of Hydra's traceback: the command line's config group options, checked
before Hydra composes (:func:`check_command_line`); every run's config, checked by a Hydra
callback once composed and before Hydra creates a folder (:class:`ConfigCheck`); and Hydra's
own copy of the config on a full disk (:func:`guard_hydra_save`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from hydra.experimental.callback import Callback

from stablelora.config.errors import CONFIG_ERROR_EXIT
from stablelora.config.groups import group_options, renamed_option
from stablelora.records.atomic import FULL_DISK

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


def _default_groups(conf_dir: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(groups conf/config.yaml's defaults list picks, those of them marked optional)."""
    import yaml

    picked, optional = [], []
    for entry in yaml.safe_load((conf_dir / "config.yaml").read_text()).get("defaults", []):
        if isinstance(entry, dict):
            for key in entry:
                name = str(key).split("@")[0]
                if name.startswith("optional "):
                    name = name.removeprefix("optional ")
                    optional.append(name)
                picked.append(name)
    return tuple(picked), tuple(optional)


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
    default_groups, optional_groups = _default_groups(Path(conf_dir))
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
        options = group_options(Path(conf_dir), key)
        if value == "":
            raise ValueError(
                f"{override} picks no option of conf/{key}/; choose one of {', '.join(options)}"
                + (f" (or {key}=null)." if key in optional_groups else ".")
            )
        if "(" in value or value == "null":
            continue  # a sweep function (range(), glob()) or no option
        for choice in (choice.strip() for choice in value.split(",")):
            renamed = None if choice in options else renamed_option(Path(conf_dir), key, choice)
            if renamed:
                raise ValueError(f"{renamed}.")
            if choice not in options:
                base = any(part.startswith("_") for part in choice.split("/"))
                raise ValueError(
                    f"{key}={choice} is not an option of conf/{key}/"
                    + (" (a shared base)" if base else "")
                    + f"; choose one of {', '.join(options)}"
                    + ("." if base else f" (or add conf/{key}/{choice}.yaml).")
                )
        if override.startswith("+") and key in default_groups:
            raise ValueError(
                f"{override}: conf/config.yaml already picks an option of {key}; override it "
                f"without the '+': {override.lstrip('+')}"
            )
    return warnings


def save_hydra_config_or_exit(cfg, filename: str, output_dir: Path) -> None:
    """Hydra's ``_save_config`` (its copy of the config in ``.hydra/``), with a full disk (a
    quota, the file-size limit) turned into one line instead of a traceback (installed by
    :func:`guard_hydra_save`)."""
    try:
        _hydra_save_config(cfg, filename, output_dir)
    except OSError as error:
        if error.errno not in FULL_DISK:
            raise
        what, fix = FULL_DISK[error.errno]
        sys.exit(
            f"stablelora: {what} ({Path(output_dir) / filename} could not be written): {fix} "
            "and rerun the same command."
        )


def guard_hydra_save() -> None:
    """Route Hydra's ``_save_config`` through :func:`save_hydra_config_or_exit` (idempotent)."""
    global _hydra_save_config
    import hydra.core.utils

    if hydra.core.utils._save_config is not save_hydra_config_or_exit:
        _hydra_save_config = hydra.core.utils._save_config
        hydra.core.utils._save_config = save_hydra_config_or_exit


_hydra_save_config: Callable[..., None]


class ConfigCheck(Callback):
    """Check every run's config (:func:`stablelora.config.check.check_config`) once Hydra has
    composed it and before Hydra creates any folder: a single run in ``on_run_start``; every
    job of a multirun in ``on_multirun_start``, each composed as Hydra's basic sweeper will
    compose it. A bad value stops the command with one line (naming the job in a sweep) and
    exit code 2, leaving nothing behind."""

    def on_run_start(self, config, **kwargs) -> None:
        _check_or_exit(config)

    def on_multirun_start(self, config, **kwargs) -> None:
        from stablelora.config.check import check_output_root

        try:
            check_output_root(Path(str(config.output_root)))
        except ValueError as error:
            _exit(str(error))
        from hydra.core.global_hydra import GlobalHydra

        loader = GlobalHydra.instance().config_loader()
        for overrides in sweep_jobs(config):
            try:
                job = loader.load_sweep_config(config, list(overrides))
            except Exception as error:  # noqa: BLE001 - Hydra's composition errors
                _exit(f"{' '.join(overrides)}: {str(error).splitlines()[0]}")
            _check_or_exit(job, " ".join(overrides))


def sweep_jobs(config) -> list[list[str]]:
    """Each job's overrides, in the order Hydra's basic sweeper runs them (its
    ``hydra.sweeper.params`` then the command line's overrides, expanded); ``[]`` under
    another sweeper, whose jobs are checked as each starts (by the runner)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return []
    params = sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += [str(override) for override in config.hydra.overrides.task]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
    return [list(job) for batch in batches for job in batch]


def _check_or_exit(config, job: str | None = None) -> None:
    from stablelora.config.check import check_config
    from stablelora.config.errors import ConfigError

    sources = config.hydra.runtime.get("config_sources") or []
    dirs = [Path(s.path) for s in sources if s.schema == "file"] or None
    try:
        check_config(config, config_dirs=dirs)
    except ConfigError as error:
        _exit(f"{job}: {error}" if job else str(error))


def _exit(message: str) -> None:
    print(f"stablelora: config error: {message}", file=sys.stderr, flush=True)
    sys.exit(CONFIG_ERROR_EXIT)
