"""HellaSwag (``Rowan/hellaswag``, no config).

Schema: ``ind``, ``activity_label``, ``ctx_a``, ``ctx_b``, ``ctx``, ``endings`` (4), ``source_id``,
``split``, ``split_type``, ``label`` ("0".."3", a string; ``""`` on every test row, so evaluate on
``validation``: unlabelled rows are dropped). The plain format cleans WikiHow markup as lm-eval
does; LLM-Adapters' prompts keep ``[header]``/``[title]``/``[step]`` verbatim, and so do we.
"""

from __future__ import annotations

import re

from stablelora.tasks.base import build_multiple_choice
from stablelora.tasks.data import hub_sources
from stablelora.tasks.prompts import MultipleChoiceExample, choice_instruction

KIND = "multiple_choice"
LOGLIK_MAIN_METRIC = "acc_norm"  # the usual HellaSwag headline
sources = hub_sources


def preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning: ``" [title]"`` -> ``". "``, drop ``[...]``, fix spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def to_example(row: dict) -> MultipleChoiceExample | None:
    """Harness query ``activity_label: ctx_a Ctx_b`` (Python ``capitalize``, which also
    lower-cases the rest of ``ctx_b``); None for an unlabelled row."""
    label = str(row["label"]).strip()
    if not label:
        return None
    query = preprocess(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    lead = (
        "Please choose the correct ending to complete the given sentence: "
        f"{row['activity_label']}: {row['ctx']}"
    )
    return MultipleChoiceExample(
        query=query,
        choices=[preprocess(ending) for ending in row["endings"]],
        gold=int(label),
        instruction=choice_instruction(lead, list(row["endings"]), label_word="ending"),
        label_word="ending",
    )


def build(cfg, tokenizer, *, seed):
    """The HellaSwag task described by ``cfg``; headline metric ``acc_norm`` under loglik."""
    return build_multiple_choice(
        cfg, tokenizer, seed=seed, to_example=to_example, main_metric=LOGLIK_MAIN_METRIC
    )
