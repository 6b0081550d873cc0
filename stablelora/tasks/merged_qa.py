"""A mixture of multiple-choice QA tasks: trained on together, evaluated one by one.

``task.subtasks`` maps each subtask name to its task config (``conf/task/merged_qa.yaml``
composes them from ``conf/task/<name>.yaml``). A subtask takes only its data fields from there
(``family``, ``hub_id``, ``hub_config``, ``train_split``, ``eval_split``, a family's own
options such as BBC News' ``max_words``); the protocol, prompt format and lengths are the
mixture's. ``data_dir`` holds one folder per subtask, ``<data_dir>/<subtask>/<split>.jsonl``;
when it is null each subtask reads its own ``data_dir`` (``${data_dir:<name>}``: under
``data_root``) or the Hub. ``task.eval_split=validation`` scores every subtask on its
validation split (official, or held out from its train split, which then never trains);
``task.holdout_validation=true`` trains without the held-out slices while scoring the
subtasks' own eval splits. ``max_train_examples`` caps the whole mixture,
``max_eval_examples`` each subtask. A subtask is any single multiple-choice dataset (a family
with ``to_example``) or BBC News (a family with ``load_split_examples``). Metrics:
``acc/<subtask>`` (and ``acc_norm/<subtask>``) and their unweighted mean over the subtasks,
``acc`` (the main metric).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from stablelora.contamination import CONTENT, LEGACY, SplitExamples, overlap_ids, overlapping
from stablelora.tasks.base import MultipleChoiceTask, load_train_and_eval
from stablelora.tasks.data import (
    VALIDATION,
    DataSource,
    TaskConfig,
    sample_indices,
    split_source,
)

KIND = "multiple_choice"
DATA_FIELDS = ("family", "hub_id", "hub_config", "train_split", "eval_split")
SUBTASK_LAYOUT = "one folder per subtask, <data_dir>/<subtask>/<split>.jsonl/.json/.parquet"


def subtask_configs(cfg: TaskConfig) -> dict[str, TaskConfig]:
    """The subtasks' configs: their data fields, the mixture's protocol, format and lengths."""
    subtasks = cfg.options.get("subtasks")
    if not isinstance(subtasks, Mapping) or not subtasks:
        raise ValueError(
            f"task {cfg.name}: task.subtasks must map each subtask name to its task config "
            "(conf/task/merged_qa.yaml composes them from conf/task/<name>.yaml)"
        )
    configs = {}
    for name, sub in subtasks.items():
        missing = [f for f in DATA_FIELDS if f not in sub]
        if missing:
            raise ValueError(f"task {cfg.name}: subtask {name} lacks {missing}: add them")
        # data_dir is read only when the mixture has none (it may be an interpolation).
        own = TaskConfig.from_any({k: sub[k] for k in sub if k != "data_dir"} | {"name": name})
        configs[name] = replace(
            own,
            data_dir=str(Path(cfg.data_dir) / name)
            if cfg.data_dir is not None
            else sub.get("data_dir"),
            eval_split=VALIDATION if cfg.eval_split == VALIDATION else own.eval_split,
            holdout_validation=cfg.excludes_validation,
            protocol=cfg.protocol,
            prompt_format=cfg.prompt_format,
            max_train_examples=None,
            max_eval_examples=cfg.max_eval_examples,
            max_length=cfg.max_length,
            max_new_tokens=cfg.max_new_tokens,
            split_rule=cfg.split_rule,
        )
        if cfg.split_rule != LEGACY:  # records since the split rule state what applies
            _check_recorded(cfg, name, sub, configs[name])
    return configs


#: The subtask fields the mixture decides (conf/task/arc_bbc.yaml states them per subtask).
FROM_MIXTURE = ("protocol", "prompt_format", "max_eval_examples", "max_length", "max_new_tokens")


def _check_recorded(cfg: TaskConfig, name: str, sub: Mapping, effective: TaskConfig) -> None:
    """A subtask value set apart from the mixture's would be recorded but not applied."""
    for key in (*FROM_MIXTURE, "eval_split", "split_rule"):
        if key in sub and sub[key] != getattr(effective, key):
            raise ValueError(
                f"task {cfg.name}: subtask {name} sets {key}={sub[key]!r} but the mixture's "
                f"{getattr(effective, key)!r} applies: set task.{key} (or the subtask's "
                f"value as ${{...{key}}})"
            )


def family_of(sub: TaskConfig):
    """The family module of a subtask, which must be a single multiple-choice dataset."""
    module = importlib.import_module(f"stablelora.tasks.{sub.family}")
    loads = hasattr(module, "to_example") or hasattr(module, "load_split_examples")
    if getattr(module, "KIND", None) != "multiple_choice" or not loads:
        raise ValueError(
            f"subtask {sub.name} has family {sub.family}, which is not a single multiple-choice "
            "dataset: use hellaswag, siqa, obqa, arc or bbc_news"
        )
    return module


def check(cfg: TaskConfig) -> None:
    """Validate the subtasks (names, data fields, families, a family's own check)."""
    for sub in subtask_configs(cfg).values():
        module = family_of(sub)
        if hasattr(module, "check"):
            module.check(sub)


def sources(cfg: TaskConfig) -> list[DataSource]:
    return [
        replace(source, task=f"{cfg.name} (subtask {sub.name})", layout=SUBTASK_LAYOUT)
        for sub in subtask_configs(cfg).values()
        for source in family_of(sub).sources(sub)
    ]


def subtask_examples(sub: TaskConfig, *, seed: int) -> SplitExamples:
    """The examples of one subtask."""
    module = family_of(sub)
    if hasattr(module, "load_split_examples"):
        return module.load_split_examples(sub, seed=seed)
    return load_train_and_eval(
        sub,
        split_source(sub, sub.train_split),
        split_source(sub, sub.eval_split),
        module.to_example,
        seed=seed,
    )


def across_subtasks(cfg: TaskConfig, splits: dict[str, SplitExamples]) -> list:
    """The mixture's training examples, checked against every subtask's held-out items, not
    only its own: under the ``content`` rule those overlapping another subtask's eval or
    held-out items leave training (counted in that subtask's ``train_dropped``); each
    record's ``in_train`` then lists its eval items found anywhere in the mixture's training
    data."""
    train = [ex for split in splits.values() for ex in split.train]
    for split in splits.values():
        if cfg.split_rule == CONTENT:
            leaked = overlapping(train, split.evals + (split.held_out or []))
            train = [ex for i, ex in enumerate(train) if i not in leaked]
            split.overlap["train_dropped"] += len(leaked)
    for split in splits.values():
        split.overlap["in_train"] = overlap_ids(split.evals, train)
    return train


def build(cfg: TaskConfig, tokenizer, *, seed: int) -> MultipleChoiceTask:
    """The mixture: all subtasks' train examples (then capped), one eval set per subtask."""
    splits = {name: subtask_examples(sub, seed=seed) for name, sub in subtask_configs(cfg).items()}
    train = across_subtasks(cfg, splits)
    eval_sets = {name: split.evals for name, split in splits.items()}
    overlap = {name: split.overlap for name, split in splits.items()}
    train = [
        train[i] for i in sample_indices(len(train), cfg.max_train_examples, seed, shuffle=False)
    ]
    return MultipleChoiceTask(cfg, tokenizer, train, eval_sets, "acc", overlap=overlap)
