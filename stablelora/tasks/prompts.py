"""Prompt formats and answer extraction.

Two prompt formats:

- ``plain``: the lm-evaluation-harness prompts (zero-shot). A multiple-choice example is a
  context plus one continuation ``" " + choice`` per choice; the training target is
  ``" " + gold choice``. Maths: ``"Question: {q}\\nAnswer:"`` with target ``" " + solution``.
- ``llm_adapters``: LLM-Adapters' instruction templates inside their Alpaca wrapper. The
  training target is their ``output`` field, ``"the correct answer is answer3"``; maths
  targets are the solution text.

Whitespace quirks. The wrapper is LLM-Adapters' *evaluation* template verbatim: one trailing
space after the header sentence, every later line indented by 16 spaces (an artefact of their
indented f-string) and the prompt ending with 16 spaces after ``### Response:\\n``. We use it for
training too (their training template differs only by a second trailing space and a line of
16 spaces before ``### Response:``), so that train and eval prompts are the same text.
Trailing whitespace of a prompt is moved to the start of the answer before tokenizing, as the
harness does for loglik requests; generation starts from the prompt without it. With a BPE
tokenizer ``"\\n" + 16 spaces + "the"`` tokenizes as ``"\\n" + 15 spaces`` then ``" the"``, so
this keeps the tokens the model is trained on, scored on and generates from identical.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. \n\n"
    "                ### Instruction:\n"
    "                {instruction}\n\n"
    "                ### Response:\n"
    "                "
)
# The variant for a row with a non-empty ``input`` (their evaluation template's, whitespace
# included: no space after the header sentence here).
ALPACA_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "                ### Instruction:\n"
    "                {instruction}\n\n"
    "                ### Input:\n"
    "                {input}\n\n"
    "                ### Response:\n"
    "                "
)
LLM_ADAPTERS_ANSWER = "the correct answer is"
# LLM-Adapters extracts the first match of a fixed alternation per dataset: answer1..answer5
# for ARC/OBQA/SIQA, ending1..ending4 for HellaSwag.
LABEL_MAX = {"answer": 5, "ending": 4}
MATH_STOP_STRINGS = ("Question:", "### Instruction:", "### Response:")


@dataclass(frozen=True)
class MultipleChoiceExample:
    """One multiple-choice question in both formats.

    ``query`` is the harness context (plain format); ``instruction`` is LLM-Adapters' text
    for the same question; ``label_word`` names the options in it ("answer" or "ending").
    """

    query: str
    choices: list[str]
    gold: int
    instruction: str
    label_word: str = "answer"
    #: The text the train/eval overlap check compares (stablelora.contamination.overlap_text)
    #: when the query is not the whole item: BBC News' article body. Empty: query and answer.
    content: str = ""

    @property
    def gold_label(self) -> str:
        """LLM-Adapters' answer token, e.g. ``answer3`` (1-based)."""
        return f"{self.label_word}{self.gold + 1}"


@dataclass(frozen=True)
class MathExample:
    """A maths word problem: ``solution`` is the training target, ``gold`` the final number."""

    question: str
    solution: str
    gold: float | None


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """LLM-Adapters' Alpaca wrapper, whitespace quirks included: the no-input variant, or the
    one with an ``### Input:`` section when ``input_text`` (a row's ``input``) is not empty,
    as their ``generate_prompt`` chooses."""
    if input_text:
        return ALPACA_INPUT_TEMPLATE.format(instruction=instruction, input=input_text)
    return ALPACA_TEMPLATE.format(instruction=instruction)


def choice_instruction(lead: str, choices: list[str], label_word: str = "answer") -> str:
    """LLM-Adapters' multiple-choice instruction: ``lead``, the numbered options, the format.

    >>> choice_instruction("Q?", ["a", "b"])
    'Q?\\n\\nAnswer1: a Answer2: b\\n\\nAnswer format: answer1/answer2'
    """
    options = " ".join(f"{label_word.capitalize()}{k}: {c}" for k, c in enumerate(choices, 1))
    answer_format = "/".join(f"{label_word}{k}" for k in range(1, len(choices) + 1))
    return f"{lead}\n\n{options}\n\nAnswer format: {answer_format}"


def question_instruction(question: str, choices: list[str]) -> str:
    """The ARC / OBQA / SIQA instruction of LLM-Adapters."""
    return choice_instruction(
        f"Please choose the correct answer to the question: {question}", choices
    )


def multiple_choice_train_pair(
    example: MultipleChoiceExample, prompt_format: str
) -> tuple[str, str]:
    """(prompt, target) for training on ``example``."""
    if prompt_format == "plain":
        return example.query, " " + example.choices[example.gold]
    return alpaca_prompt(example.instruction), f"{LLM_ADAPTERS_ANSWER} {example.gold_label}"


def multiple_choice_requests(
    example: MultipleChoiceExample, prompt_format: str
) -> tuple[str, list[str]]:
    """(context, choices) for loglik scoring; each choice is scored as ``" " + choice``.

    In the llm_adapters format the choices are the answer tokens (``answer1``...) after the
    prompt and ``"the correct answer is"``, i.e. the training target's last word.
    """
    if prompt_format == "plain":
        return example.query, list(example.choices)
    labels = [f"{example.label_word}{k}" for k in range(1, len(example.choices) + 1)]
    return alpaca_prompt(example.instruction) + LLM_ADAPTERS_ANSWER, labels


def math_train_pair(example: MathExample, prompt_format: str) -> tuple[str, str]:
    """(prompt, target) for training on a maths problem."""
    return math_prompt(example.question, prompt_format), math_target(example, prompt_format)


def math_prompt(question: str, prompt_format: str) -> str:
    """The generation prompt of a maths problem (lm-eval's GSM8K prompt, or Alpaca)."""
    if prompt_format == "plain":
        return f"Question: {question}\nAnswer:"
    return alpaca_prompt(question)


def math_target(example: MathExample, prompt_format: str) -> str:
    return (" " if prompt_format == "plain" else "") + example.solution


def extract_choice_label(text: str, label_word: str) -> str:
    """LLM-Adapters' extraction: the first ``answerK``/``endingK`` in ``text``, or ``""``.

    Case-sensitive, like theirs: ``Answer2`` does not count.
    """
    return first_label(text, [f"{label_word}{k}" for k in range(1, LABEL_MAX[label_word] + 1)])


def first_label(text: str, labels: Sequence[str]) -> str:
    """The first of ``labels`` occurring in ``text`` (stripped; substrings count, case
    matters), or ``""``: the regex alternation LLM-Adapters' evaluation scripts search with."""
    found = re.findall("|".join(map(re.escape, labels)), text.strip())
    return found[0] if found else ""


def extract_last_number(text: str) -> float | None:
    """LLM-Adapters' maths extraction: drop commas, take the last ``-?\\d+\\.?\\d*`` match."""
    found = re.findall(r"-?\d+\.?\d*", text.replace(",", ""))
    return float(found[-1]) if found else None


def numbers_match(prediction: float | None, gold: float | None, tolerance: float = 1e-3) -> bool:
    """LLM-Adapters' maths criterion ``|gold - pred| <= 1e-3``; no number is wrong."""
    return prediction is not None and gold is not None and abs(gold - prediction) <= tolerance


def parse_number(text: str) -> float | None:
    """``text`` as a number after removing commas, ``$`` and a trailing period, else None."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def gsm8k_gold(answer: str) -> float | None:
    """GSM8K's final answer: the number after the last ``#### `` of the ``answer`` field."""
    return parse_number(answer.split("#### ")[-1]) if "#### " in answer else None


def metamath_gold(response: str) -> float | None:
    """MetaMathQA's final answer: after the last ``The answer is: ``; None if not a number
    (MATH-type rows may end in LaTeX such as ``\\frac{1}{2}``)."""
    marker = "The answer is: "
    return parse_number(response.rsplit(marker, 1)[-1]) if marker in response else None


def cut_at_stop_strings(text: str, stops: tuple[str, ...] = MATH_STOP_STRINGS) -> str:
    """``text`` up to the first stop string: the model starting a new question is not part of
    its answer (lm-eval's ``until``)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]
