"""A run folder read back: :class:`RunFolder`, the one reader of a run's records for the runner
(is this folder this configuration's? :func:`stablelora.runner.folder.check_run_folder`) and the
analysis (:mod:`analysis.collect`). Each record is read when first asked for, by its module's
checked reader: ``config.yaml`` here (:func:`load_yaml`, the one YAML loader of records),
``summary.json`` (:mod:`~stablelora.records.summary`), ``metrics.jsonl``
(:mod:`~stablelora.records.rows`), ``layers.parquet`` (:mod:`~stablelora.records.layers`) and
``examples.parquet`` (:mod:`~stablelora.records.examples`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from stablelora.records.examples import read_examples
from stablelora.records.layers import RecordsError, read_layer_table
from stablelora.records.rows import read_jsonl
from stablelora.records.summary import read_summary

#: The run's resolved config, written by the runner before the run loads anything.
CONFIG_FILE = "config.yaml"
#: Hydra's copy of the config (unresolved), written before the job starts: what a job that
#: failed before writing :data:`CONFIG_FILE` still has.
HYDRA_CONFIG_FILE = ".hydra/config.yaml"
METRICS_FILE = "metrics.jsonl"


def load_yaml(path: Path) -> Any:
    """The YAML document of ``path``, read as every record's YAML is read: safe YAML 1.1
    (libyaml's loader where PyYAML has it: the same values, faster). Raises OSError,
    UnicodeDecodeError (not UTF-8) or ``yaml.YAMLError``."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=loader)


def read_mapping(path: Path) -> dict | None:
    """:func:`load_yaml` of ``path`` when it is a YAML mapping; None when it cannot be read or
    holds anything else (empty, a list, torn or foreign bytes)."""
    import yaml

    try:
        tree = load_yaml(path)
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        return None
    return tree if isinstance(tree, dict) else None


class RunFolder:
    """The records of the run in ``path``, each read once, when first asked for.

    ``stored_config`` (the run's own ``config.yaml``, strict) and ``config`` (the analysis's:
    else Hydra's copy, else ``{}``) are read by one loader (:func:`load_yaml`); ``summary`` by
    :func:`~stablelora.records.summary.read_summary` (``{}`` when there is none,
    :class:`RecordsError` when it is damaged); ``metrics`` are the rows of ``metrics.jsonl``.
    The two tables can be large and are read on every call, by the columns asked for:
    :meth:`layers` and :meth:`examples`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @cached_property
    def stored_config(self) -> dict | None:
        """The run's ``config.yaml``; None when it has none yet.

        Raises:
            RecordsError: the file cannot be read, or is not a YAML mapping (one line naming it).
        """
        path = self.path / CONFIG_FILE
        if not path.exists():
            return None
        tree = read_mapping(path)
        if tree is None:
            raise RecordsError(f"{path} cannot be read (not a YAML mapping)")
        return tree

    @cached_property
    def config(self) -> dict:
        """The run's resolved ``config.yaml``, else Hydra's ``.hydra/config.yaml`` (a job that
        failed before writing its own still has it), else ``{}``: a file that cannot be read
        as a YAML mapping counts as missing."""
        for name in (CONFIG_FILE, HYDRA_CONFIG_FILE):
            path = self.path / name
            if path.exists() and (tree := read_mapping(path)) is not None:
                return tree
        return {}

    @cached_property
    def summary(self) -> dict:
        """``summary.json`` checked and parsed (:func:`~stablelora.records.summary.read_summary`):
        ``{}`` when there is none; :class:`RecordsError` when it is damaged."""
        return read_summary(self.path)

    @cached_property
    def metrics(self) -> list[dict]:
        """The rows of ``metrics.jsonl`` (:func:`~stablelora.records.rows.read_jsonl`: a torn
        last line skipped, any other unreadable line warned about); ``[]`` when there is none."""
        return read_jsonl(self.path / METRICS_FILE)

    def layers(self, select: Callable[[str], bool] | None = None):
        """The per-layer rows as a pyarrow table, or None
        (:func:`~stablelora.records.layers.read_layer_table`; ``select``: the value columns to
        read). Raises :class:`RecordsError` for a damaged file."""
        return read_layer_table(self.path, select)

    def examples(self):
        """The per-example rows as a pandas frame, empty when there are none
        (:func:`~stablelora.records.examples.read_examples`). Raises :class:`RecordsError` for
        a damaged file."""
        return read_examples(self.path)
