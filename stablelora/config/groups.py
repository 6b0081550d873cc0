"""The config groups' yaml files (``conf/<group>/*.yaml``) read without Hydra: a group's
options (:func:`group_options`), one option as Hydra composes it from its group's files
(:func:`group_option`), and the keys each group declares, so that a composed config sets no
other key and no value of the wrong type (:func:`check_groups`). Loads nothing.

Hydra rejects ``optim.lrr=1e-4`` but accepts ``+optim.lrr=1e-4`` (its own suggestion for an
unknown key) and any key an experiment file adds: both would run silently with the defaults.
A group's declared keys are the union over its options (``conf/<group>/*.yaml``, their
defaults lists followed, and the group's node in ``config.yaml``; ``optim`` is such a node
alone, with no group folder: there is nothing to choose); the ``adapter`` and
``optimizer`` groups are checked against ``apply_lora``'s and the optimizer builders'
signatures instead (see :func:`stablelora.config.check.check_config`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

#: The repository's config directory (Hydra's primary search path for run.py).
CONF = Path(__file__).resolve().parents[2] / "conf"
GLOBAL_PACKAGE = "# @package _global_"
#: Group options renamed, by group (``{"experiment": {"old": "new"}}``): picking the old name on
#: the command line is one line naming the new one (:func:`renamed_option`).
RENAMED_OPTIONS: dict[str, dict[str, str]] = {
    # the single tiny run; ``smoke`` is the scale (any experiment's sweep at CI size)
    "experiment": {"smoke": "tiny_run"},
    # variants were named for the experiment that swept them, five repeating another's
    # content; each is now named for what it sets (no variant name is part of a run's config)
    "variant": {
        "compressed_lora": "lora",
        "control_lora": "lora",
        "width_lora": "lora",
        "width_rslora": "rslora",
        "width_loraplus": "loraplus",
        "control_stable_lora": "stable_lora",
        "compressed_stable_lora": "stable_lora_shrink_5e-3",
        "width_stable_lora": "stable_lora_shrink_5e-3",
        "compressed_stable_lora_never": "stable_lora_shrink_5e-3_never",
        "compressed_stable_lora_init_quarter": "stable_lora_shrink_5e-3_init_quarter",
        "compressed_stable_lora_init_x4": "stable_lora_shrink_5e-3_init_x4",
        "compressed_lora_init_quarter": "lora_init_quarter",
        "compressed_lora_init_x4": "lora_init_x4",
        "compressed_large_wd_a": "large_wd_a",
        "control_large_wd_a": "large_wd_a",
        "compressed_large_wd_ab": "large_wd_ab",
        "control_large_wd_ab": "large_wd_ab",
        "control_shrink_steps_2": "shrink_steps_2",
        "control_shrink_steps_200": "shrink_steps_200",
        "control_shrink_steps_1000": "shrink_steps_1000",
        "compressed_shrink_steps": "shrink_5e-3_steps_50",
    },
}


def config_dirs() -> list[Path]:
    """The file directories of Hydra's config search path inside a Hydra app (including
    ``hydra.searchpath`` entries); the repository's ``conf/`` otherwise."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            sources = HydraConfig.get().runtime.config_sources
            dirs = [Path(s.path) for s in sources if s.schema == "file"]
            if dirs:
                return dirs
    except ImportError:  # pragma: no cover - hydra is a dependency
        pass
    return [CONF]


def group_options(conf_dir: Path, group: str) -> list[str]:
    """The options of a config group (``conf/<group>/**.yaml``) a user may pick: files and
    folders starting with ``_`` are shared bases, not options, and so are the files of a
    folder named like an option (``experiment/table1/cpu.yaml``: Table 1's settings at CPU
    scale, composed by ``experiment=table1 scale=cpu``)."""
    folder = Path(conf_dir) / group

    def is_option(relative: Path) -> bool:
        if any(part.startswith("_") for part in relative.parts):
            return False
        return not any(
            (folder / parent).with_suffix(".yaml").exists()
            for parent in relative.parents
            if parent != Path(".")
        )

    return sorted(
        path.relative_to(folder).with_suffix("").as_posix()
        for path in folder.rglob("*.yaml")
        if is_option(path.relative_to(folder))
    )


def renamed_option(conf_dir: Path, group: str, option: str) -> str | None:
    """What ``<group>=<option>`` is called now when ``option`` is a renamed option of
    ``group`` (:data:`RENAMED_OPTIONS`), as one sentence; None otherwise. Where the old name
    is an option of another group, the sentence says so (``scale=smoke``)."""
    new = RENAMED_OPTIONS.get(group, {}).get(option)
    if new is None:
        return None
    elsewhere = [
        other.name
        for other in sorted(Path(conf_dir).iterdir())
        if other.is_dir() and other.name != group and option in group_options(conf_dir, other.name)
    ]
    also = "".join(f" ({option} is an option of conf/{g}/: {g}={option})" for g in elsewhere)
    return f"{group}={option} is now {group}={new}{also}"


def _read(path: Path) -> tuple[dict, bool]:
    text = path.read_text()
    return (yaml.safe_load(text) or {}), text.lstrip().startswith(GLOBAL_PACKAGE)


def _merge(into: dict, other: Mapping) -> dict:
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = _copy(value)
    return into


def _copy(value):
    return _merge({}, value) if isinstance(value, Mapping) else value


@functools.cache
def _option(dirs: tuple[Path, ...], group: str, name: str) -> dict:
    """One option of a group with its (same-group) defaults merged in."""
    for root in dirs:
        path = root / group / f"{name}.yaml"
        if path.exists():
            break
    else:
        return {}
    content, is_global = _read(path)
    node: dict = {}
    for entry in content.get("defaults", []) or []:
        if not isinstance(entry, str) or entry == "_self_" or entry.startswith("/"):
            continue  # overrides of other groups (``override /x: y``) declare no keys here
        option, _, package = entry.partition("@")
        target = node
        for part in filter(None, package.split(".")):
            target = target.setdefault(part, {})
        _merge(target, _option(dirs, group, option))
    own = content.get(group, {}) if is_global else content
    own = {k: v for k, v in (own or {}).items() if k != "defaults"}
    return _merge(node, own)


def group_option(group: str, name: str, dirs: Iterable[Path] | None = None) -> dict:
    """``conf/<group>/<name>.yaml`` as Hydra composes it from the group's own files (its
    same-group defaults merged in, interpolations left as they are)."""
    return _copy(_option(tuple(dirs) if dirs is not None else tuple(config_dirs()), group, name))


@functools.cache
def declared(group: str, dirs: tuple[Path, ...]) -> dict:
    """The union of the keys every option of ``group`` declares, nested as in the config;
    a leaf holds the list of its declared values."""
    union: dict = {}
    for root in dirs:
        primary = root / "config.yaml"
        if primary.exists():
            _add(union, (_read(primary)[0] or {}).get(group) or {})
        for path in sorted((root / group).glob("*.yaml")):
            _add(union, _option(dirs, group, path.stem))
    return union


def _add(union: dict, node: Mapping) -> None:
    for key, value in node.items():
        if isinstance(value, Mapping):
            child = union.get(key)
            if not isinstance(child, dict):
                child = union[key] = {}
            if not value:
                child["*"] = True  # declared as an open mapping: any key is allowed
            _add(child, value)
        elif not isinstance(union.get(key), dict):
            union.setdefault(key, []).append(value)


def _kind(values: list) -> type | None:
    """bool, int or float when every declared non-null value is of that kind."""
    values = [v for v in values if v is not None and not (isinstance(v, str) and "${" in v)]
    if not values:
        return None
    if all(isinstance(v, bool) for v in values):
        return bool
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return int
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return float
    return None


def check_keys(node: Mapping, schema: dict, path: str, declared_in: str | None = None) -> None:
    """Raise a one-line ValueError for a key ``schema`` does not declare, or a value whose
    type differs from every declared one (``optim.lr=abc``). ``declared_in`` says where a new
    key is declared (default: ``a conf/<group>/ yaml``)."""
    if schema.get("*"):
        return
    declared_in = declared_in or f"a conf/{path.split('.')[0]}/ yaml"
    for key, value in node.items():
        where = f"{path}.{key}"
        if key not in schema:
            known = ", ".join(sorted(k for k in schema if k != "*"))
            raise ValueError(
                f"{where} is not a key of {path} (a misspelling?): its keys are {known}; a "
                f"new key must first be declared in {declared_in}."
            )
        expected = schema[key]
        if isinstance(expected, dict):
            if isinstance(value, Mapping):
                check_keys(value, expected, where, declared_in)
            continue
        kind = _kind(expected)
        if value is None or kind is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        fits = {
            bool: isinstance(value, bool),
            int: number and float(value).is_integer(),
            float: number,
        }[kind]
        if not fits:
            word = {bool: "true or false", int: "an integer", float: "a number"}[kind]
            raise ValueError(f"{where} must be {word}, got {value!r}.")


def check_groups(cfg: Mapping, groups: Iterable[str], dirs: Iterable[Path] | None = None) -> None:
    """:func:`check_keys` for each of ``groups`` in a resolved config (a plain dict)."""
    dirs = tuple(dirs) if dirs is not None else tuple(config_dirs())
    for group in groups:
        if isinstance(cfg.get(group), Mapping):
            # a node of config.yaml that is no group (optim: nothing to choose) is declared there
            is_group = any((root / group).is_dir() for root in dirs)
            where = None if is_group else "conf/config.yaml"
            check_keys(cfg[group], declared(group, dirs), group, where)
