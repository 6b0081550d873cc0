"""Multi-turn chit-chat from the ``chatterbot-corpus`` package, offline (a dialogue task).

The corpus is ``chatterbot_corpus/data/<language>/<category>.yml``, each with a list
``conversations`` of conversations, a conversation being a list of turns that alternate
between the user (first) and the assistant. Every assistant turn is an example: the turns
before it are its history, and it is trained on with the model's chat template, on its own
tokens only (:mod:`stablelora.tasks.dialogue`). Conversations that repeat one already read
(the same turns up to case and whitespace; the English tech-support file repeats 10
conversations 1,050 times) are kept once; entries that are not a list of at least two turns
(one malformed entry of ``trivia.yml``) are skipped.

The held-out split is fixed by a hash of each conversation's opening user turn
(``eval_percent``, default 10%): all turns of a conversation, and all conversations that open
with the same words, are on the same side, for every seed and machine. English (the default)
has about 900 distinct conversations, 1,000 examples.

Options: ``languages`` (folders, default ``[english]``), ``categories`` (file names without
``.yml``, default null: all of them), and the dialogue options ``chat_format``,
``eval_percent``, ``main_metric``. ``task.data_dir`` may point to another copy of the corpus
in the same layout (``<data_dir>/<language>/<category>.yml``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stablelora.tasks.data import DataSource, TaskConfig, package_data_dir
from stablelora.tasks.dialogue import (
    DialogueExample,
    DialogueTask,
    build_dialogue_task,
    check_options,
    conversation_examples,
    normalise,
)

KIND = "dialogue"
OPTIONS = {"languages": ["english"], "categories": None}


def sources(cfg: TaskConfig) -> list[DataSource]:
    return []  # packaged data, no Hub dataset


def corpus_dir(cfg: TaskConfig) -> Path:
    """``task.data_dir`` or the data folder of the installed ``chatterbot_corpus`` package."""
    return package_data_dir(cfg, "chatterbot_corpus", "<language>/<category>.yml", "data")


def as_list(value, key: str, cfg: TaskConfig) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if isinstance(values, Sequence):  # a list, or an OmegaConf ListConfig
        values = list(values)
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"task {cfg.name}: task.{key}={value!r} must be a name or a list of names")
    return values


def corpus_files(cfg: TaskConfig) -> list[Path]:
    """The ``.yml`` files of the chosen languages and categories, sorted; one line naming
    what exists for a language or category that does not."""
    root = corpus_dir(cfg)
    if not root.is_dir():
        raise ValueError(
            f"task {cfg.name}: {root} is not a folder: set task.data_dir to a copy of the "
            "chatterbot corpus (<language>/<category>.yml), or reinstall chatterbot-corpus"
        )
    languages = as_list(cfg.options.get("languages", OPTIONS["languages"]), "languages", cfg)
    categories = cfg.options.get("categories", OPTIONS["categories"])
    wanted = None if categories is None else as_list(categories, "categories", cfg)
    files: list[Path] = []
    for language in languages:
        folder = root / language
        found = sorted(folder.glob("*.yml")) if folder.is_dir() else []
        if not found:
            known = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.yml")))
            raise ValueError(
                f"task {cfg.name}: no {language}/*.yml in {root}: set task.languages to some "
                f"of {', '.join(known)}"
            )
        if wanted is not None:
            missing = sorted(set(wanted) - {p.stem for p in found})
            if missing:
                raise ValueError(
                    f"task {cfg.name}: {language} has no categories {', '.join(missing)}: set "
                    f"task.categories to some of {', '.join(p.stem for p in found)} (or null)"
                )
            found = [p for p in found if p.stem in wanted]
        files += found
    return files


def check(cfg: TaskConfig) -> None:
    """Options, and the corpus files they select, exist."""
    check_options(cfg, OPTIONS)
    corpus_files(cfg)


def read_conversations(path: Path) -> list[list[str]]:
    """The well-formed conversations of one corpus file: lists of at least two turns, each a
    string (numbers the YAML parser read as numbers are turned back into text)."""
    import yaml

    content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    conversations = []
    for entry in content.get("conversations") or []:
        if not isinstance(entry, list) or len(entry) < 2:
            continue
        if not all(isinstance(turn, (str, int, float)) for turn in entry):
            continue
        conversations.append([" ".join(str(turn).split()) for turn in entry])
    return conversations


def load_examples(cfg: TaskConfig) -> list[DialogueExample]:
    """Every example of the selected files, each distinct conversation once, in file order."""
    seen: set[tuple[str, ...]] = set()
    examples: list[DialogueExample] = []
    for path in corpus_files(cfg):
        for turns in read_conversations(path):
            key = tuple(normalise(turn) for turn in turns)
            if key in seen:
                continue
            seen.add(key)
            examples += conversation_examples(turns)
    return examples


def build(cfg: TaskConfig, tokenizer, *, seed: int) -> DialogueTask:
    """The chatterbot dialogue task: held out by the hash of the opening turn."""
    return build_dialogue_task(cfg, tokenizer, load_examples(cfg), seed=seed)
