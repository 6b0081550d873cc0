"""Social IQa (``lighteval/siqa``; ``allenai/social_i_qa`` is script-only and fails to load).

Schema: ``context``, ``question``, ``answerA``/``answerB``/``answerC``, ``label`` ("1".."3",
1-based, a string). There is no labelled test split: evaluate on ``validation``.
"""

from __future__ import annotations

from stablelora.tasks.base import build_multiple_choice
from stablelora.tasks.data import hub_sources
from stablelora.tasks.prompts import MultipleChoiceExample, question_instruction

KIND = "multiple_choice"
sources = hub_sources


def to_example(row: dict) -> MultipleChoiceExample:
    """Harness prompt ``Q: {context} {question}\\nA:``; LLM-Adapters' question is
    ``context + " " + question``."""
    choices = [row["answerA"], row["answerB"], row["answerC"]]
    question = f"{row['context']} {row['question']}"
    return MultipleChoiceExample(
        query=f"Q: {question}\nA:",
        choices=choices,
        gold=int(str(row["label"]).strip()) - 1,
        instruction=question_instruction(question, choices),
    )


def build(cfg, tokenizer, *, seed):
    """The Social IQa task described by ``cfg``."""
    return build_multiple_choice(cfg, tokenizer, seed=seed, to_example=to_example)
