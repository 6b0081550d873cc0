"""A mixture of multiple-choice QA tasks: trained on together, evaluated one by one.

``task.subtasks`` maps each subtask name to its task config (``conf/task/merged_qa.yaml``
composes them from ``conf/task/<name>.yaml``). A subtask takes only its data fields from there
(``family``, ``hub_id``, ``hub_config``, ``train_split``, ``eval_split``); the protocol, prompt
format and lengths are the mixture's. ``data_dir`` holds one folder per subtask,
``<data_dir>/<subtask>/<split>.jsonl``. ``max_train_examples`` caps the whole mixture,
``max_eval_examples`` each subtask. Metrics: ``acc/<subtask>`` (and ``acc_norm/<subtask>``)
and their unweighted mean over the subtasks, ``acc`` (the main metric).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from stablelora.tasks.base import MultipleChoiceTask, load_train_and_eval
from stablelora.tasks.data import (
    DataSource,
    TaskConfig,
    hub_sources,
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
        configs[name] = TaskConfig(
            name=name,
            **{f: sub[f] for f in DATA_FIELDS},
            data_dir=str(Path(cfg.data_dir) / name) if cfg.data_dir is not None else None,
            protocol=cfg.protocol,
            prompt_format=cfg.prompt_format,
            max_eval_examples=cfg.max_eval_examples,
            max_length=cfg.max_length,
            max_new_tokens=cfg.max_new_tokens,
        )
    return configs


def family_of(sub: TaskConfig):
    """The family module of a subtask, which must be a single multiple-choice dataset."""
    module = importlib.import_module(f"stablelora.tasks.{sub.family}")
    if getattr(module, "KIND", None) != "multiple_choice" or not hasattr(module, "to_example"):
        raise ValueError(
            f"subtask {sub.name} has family {sub.family}, which is not a single multiple-choice "
            "dataset: use hellaswag, siqa, obqa or arc"
        )
    return module


def check(cfg: TaskConfig) -> None:
    """Validate the subtasks (names, data fields, families)."""
    for sub in subtask_configs(cfg).values():
        family_of(sub)


def sources(cfg: TaskConfig) -> list[DataSource]:
    return [
        replace(source, task=f"{cfg.name} (subtask {sub.name})", layout=SUBTASK_LAYOUT)
        for sub in subtask_configs(cfg).values()
        for source in hub_sources(sub)
    ]


def build(cfg: TaskConfig, tokenizer, *, seed: int) -> MultipleChoiceTask:
    """The mixture: all subtasks' train examples (then capped), one eval set per subtask."""
    train, eval_sets = [], {}
    for name, sub in subtask_configs(cfg).items():
        sub_train, eval_sets[name] = load_train_and_eval(
            sub,
            split_source(sub, sub.train_split),
            split_source(sub, sub.eval_split),
            family_of(sub).to_example,
            seed=seed,
        )
        train += sub_train
    train = [
        train[i] for i in sample_indices(len(train), cfg.max_train_examples, seed, shuffle=False)
    ]
    return MultipleChoiceTask(cfg, tokenizer, train, eval_sets, main_metric="acc")
