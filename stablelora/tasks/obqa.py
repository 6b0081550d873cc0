"""OpenBookQA (``allenai/openbookqa``, config ``main``).

Schema: ``id``, ``question_stem``, ``choices`` ({"text": [...], "label": ["A".."D"]}),
``answerKey`` (may carry leading whitespace: stripped, as lm-eval's ``lstrip``).
"""

from __future__ import annotations

from stablelora.tasks.base import build_multiple_choice
from stablelora.tasks.data import choices_as_lists, hub_sources
from stablelora.tasks.prompts import MultipleChoiceExample, question_instruction

KIND = "multiple_choice"
sources = hub_sources


def to_example(row: dict) -> MultipleChoiceExample:
    """Harness prompt: the raw ``question_stem``; choices are ``choices.text``."""
    texts, labels = choices_as_lists(row["choices"])
    return MultipleChoiceExample(
        query=row["question_stem"],
        choices=texts,
        gold=labels.index(row["answerKey"].strip()),
        instruction=question_instruction(row["question_stem"], texts),
    )


def build(cfg, tokenizer, *, seed):
    """The OpenBookQA task described by ``cfg``."""
    return build_multiple_choice(cfg, tokenizer, seed=seed, to_example=to_example)
