"""WizardLM evol-instruct (``WizardLMTeam/WizardLM_evol_instruct_70k``): a dialogue task.

Schema: ``instruction`` (the user turn) and ``output`` (the assistant's reply), one split
``train`` of about 70k rows. Each row is one single-turn example trained on with the model's
chat template, on the reply tokens only (:mod:`stablelora.tasks.dialogue`). The Hub dataset
has no test split: the held-out examples are the rows whose normalised instruction hashes
into ``eval_percent`` (``conf/task/wizardlm.yaml``: 2%, about 1,400 rows), fixed for every
seed and machine; rows with the same instruction are on the same side. Rows with an empty
instruction or output are skipped. Offline, ``task.data_dir`` holds ``<train_split>.jsonl``
(or .json / .parquet) in the Hub schema. Sized for GPU machines (long replies:
``max_length`` 1024 by default).
"""

from __future__ import annotations

from dataclasses import replace

from stablelora.tasks.data import DataSource, TaskConfig, load_rows, split_source
from stablelora.tasks.dialogue import (
    DialogueExample,
    DialogueTask,
    build_dialogue_task,
    check_options,
)

KIND = "dialogue"
OPTIONS: dict = {}
LAYOUT = "<train_split>.jsonl/.json/.parquet in the Hub schema (instruction, output)"


def source(cfg: TaskConfig) -> DataSource:
    """The one split both the training and the held-out examples come from."""
    return replace(split_source(cfg, cfg.train_split), layout=LAYOUT)


def sources(cfg: TaskConfig) -> list[DataSource]:
    return [source(cfg)]


def check(cfg: TaskConfig) -> None:
    check_options(cfg, OPTIONS)


def to_example(row: dict) -> DialogueExample | None:
    instruction, output = (str(row.get(key) or "").strip() for key in ("instruction", "output"))
    if not instruction or not output:
        return None
    return DialogueExample((instruction,), output, instruction)


def load_examples(cfg: TaskConfig) -> list[DialogueExample]:
    rows = load_rows(source(cfg))
    if not len(rows):
        raise ValueError(f"task {cfg.name}: split {cfg.train_split} has no rows")
    missing = {"instruction", "output"} - set(getattr(rows, "column_names", None) or rows[0])
    if missing:
        raise ValueError(
            f"task {cfg.name}: rows have no {', '.join(sorted(missing))}: expected the "
            "WizardLM schema (instruction, output)"
        )
    return [ex for ex in map(to_example, rows) if ex is not None]


def build(cfg: TaskConfig, tokenizer, *, seed: int) -> DialogueTask:
    """The WizardLM dialogue task: one split, held out by the hash of the instruction."""
    return build_dialogue_task(cfg, tokenizer, load_examples(cfg), seed=seed)
