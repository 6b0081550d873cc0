"""ARC-Easy / ARC-Challenge (``allenai/ai2_arc``, configs ``ARC-Easy`` / ``ARC-Challenge``).

Schema: ``id``, ``question``, ``choices`` ({"text": [...], "label": [...]}), ``answerKey``.
Answer keys are letters or, for some NYSED items, digits ("1".."4"), and questions have 3 to 5
options: the gold is the position of ``answerKey`` in ``choices.label``, never ``ord(key)``.
"""

from __future__ import annotations

from stablelora.tasks.base import build_multiple_choice
from stablelora.tasks.data import choices_as_lists, hub_sources
from stablelora.tasks.prompts import MultipleChoiceExample, question_instruction

KIND = "multiple_choice"
sources = hub_sources


def to_example(row: dict) -> MultipleChoiceExample:
    """Harness prompt ``Question: {question}\\nAnswer:``; choices are ``choices.text``."""
    texts, labels = choices_as_lists(row["choices"])
    return MultipleChoiceExample(
        query=f"Question: {row['question']}\nAnswer:",
        choices=texts,
        gold=labels.index(row["answerKey"].strip()),
        instruction=question_instruction(row["question"], texts),
    )


def build(cfg, tokenizer, *, seed):
    """The ARC task described by ``cfg``."""
    return build_multiple_choice(cfg, tokenizer, seed=seed, to_example=to_example)
