"""What the dialogue task families share (``chatterbot``, ``wizardlm``): examples, the chat
encoding, the held-out split by hash, and the evaluation. Not a family itself (no ``KIND``).

An example is a history of turns (alternating user / assistant, starting and ending with a
user turn) and the assistant's reply to it. It is encoded with the model's chat template
(``task.chat_format=template``, the default): the context is the template applied to the
history (the template's default system prompt included), the reply is what the template adds
for the assistant turn up to and including its end-of-turn token (the tokenizer's EOS, e.g.
``<|im_end|>``; what the template writes after it is dropped). Training is on the reply
tokens only (context labels -100). A tokenizer without a chat template is one config error
(before the model loads where its files can be read, else when the task is built); the
documented fallback ``task.chat_format=plain`` writes the history as ``User: ...`` /
``Assistant: ...`` lines, ends the prompt with ``Assistant:`` and trains on ``" " + reply``
plus EOS.

A sequence longer than ``task.max_length`` first drops its oldest exchanges (a user turn and
the reply to it) while a longer history remains; then the context is cut from the left and,
only when the reply is longer than half of ``max_length``, the reply from the right (as
:meth:`~stablelora.tasks.scoring.PairEncoder.train_example`). Generation prompts drop turns
the same way and are cut from the left to ``max_length``.

Evaluation on the held-out examples (a fixed subsample, the same for every seed):

- ``loss``: the token-weighted negative log-likelihood of the reply tokens, i.e. the total
  NLL over every reply token of every example divided by their number (not a mean of
  per-example means); ``ppl = exp(loss)``; ``tokens``: that number;
- ``rougeL``: the mean over examples of the ROUGE-L F1 (``rouge-score``, Porter stemming)
  between the greedy reply (``max_new_tokens``, cut at EOS, special tokens removed) and the
  reference reply; ``rouge-score`` tokenizes ASCII letters and digits only, so it suits
  English text;
- ``n``: the number of examples.

The main metric is ``task.main_metric`` (``loss`` by default: held-out loss is far less noisy
than ROUGE on small models and budgets); ``loss`` and ``ppl`` are lower-is-better.

The split: each example has a ``group`` (the conversation's opening user turn, normalised);
a group is held out when ``md5(group) mod 100 < task.eval_percent``. So the split does not
depend on the seed, the machine or the order of the files, every turn of a conversation is
on the same side, and no opening prompt is seen in training and in evaluation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from stablelora.config.errors import ConfigError
from stablelora.tasks.base import Task
from stablelora.tasks.data import EVAL_SHUFFLE_SEED, TaskConfig, sample_indices
from stablelora.tasks.scoring import (
    IGNORE_INDEX,
    PairEncoder,
    collate_train,
    label_nll,
)

CHAT_FORMATS = ("template", "plain")
MAIN_METRICS = ("loss", "ppl", "rougeL")
LOWER_IS_BETTER = ("loss", "ppl")
#: Options every dialogue family takes, with their defaults.
COMMON_OPTIONS = {"chat_format": "template", "eval_percent": 10, "main_metric": "loss"}
USER, ASSISTANT = "user", "assistant"
PLAIN_ROLES = {USER: "User", ASSISTANT: "Assistant"}


@dataclass(frozen=True)
class DialogueExample:
    """The turns before a reply (user first and last, alternating) and the reply."""

    history: tuple[str, ...]
    reply: str
    group: str  # what the held-out split hashes: the conversation's opening, normalised


def normalise(text: str) -> str:
    """Lower case, whitespace runs as one space: the key of a group."""
    return " ".join(str(text).split()).lower()


def is_held_out(group: str, eval_percent: int) -> bool:
    """Whether a group is in the held-out split (md5 of the normalised group, mod 100)."""
    digest = hashlib.md5(normalise(group).encode("utf-8")).hexdigest()
    return int(digest, 16) % 100 < eval_percent


def conversation_examples(turns: Sequence[str]) -> list[DialogueExample]:
    """One example per assistant turn of a conversation ``[user, assistant, user, ...]``: the
    turns before it and the turn. A trailing user turn has no reply and gives none."""
    group = turns[0]
    return [DialogueExample(tuple(turns[:i]), turns[i], group) for i in range(1, len(turns), 2)]


def split_examples(
    examples: Iterable[DialogueExample], eval_percent: int
) -> tuple[list[DialogueExample], list[DialogueExample]]:
    """(train, held out) by the hash of each example's group."""
    train: list[DialogueExample] = []
    held_out: list[DialogueExample] = []
    for example in examples:
        (held_out if is_held_out(example.group, eval_percent) else train).append(example)
    return train, held_out


# ---------------------------------------------------------------------------- options
def check_options(cfg: TaskConfig, own: dict) -> None:
    """One line for an option the family does not take or a bad value of a common one."""
    known = {**COMMON_OPTIONS, **own}
    unknown = sorted(set(cfg.options) - set(known))
    if unknown:
        raise ValueError(
            f"task {cfg.name}: unknown option(s) {', '.join(unknown)} (a misspelling?): the "
            f"{cfg.family} task takes {', '.join(sorted(known))}"
        )
    chat_format = cfg.options.get("chat_format", COMMON_OPTIONS["chat_format"])
    if chat_format not in CHAT_FORMATS:
        raise ValueError(
            f"task {cfg.name}: chat_format {chat_format!r} is not one of {CHAT_FORMATS}: set "
            "task.chat_format=template (the tokenizer's chat template) or plain"
        )
    metric = cfg.options.get("main_metric", COMMON_OPTIONS["main_metric"])
    if metric not in MAIN_METRICS:
        raise ValueError(
            f"task {cfg.name}: main_metric {metric!r} is not one of {MAIN_METRICS}: set "
            "task.main_metric"
        )
    percent = cfg.options.get("eval_percent", COMMON_OPTIONS["eval_percent"])
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 < percent < 100:
        raise ValueError(
            f"task {cfg.name}: eval_percent={percent!r} must be an integer in 1..99 (the "
            "percentage of conversations held out): set task.eval_percent"
        )
    if cfg.protocol != "generate":
        raise ValueError(
            f"task {cfg.name} is scored by the reply loss and generated replies: set "
            "task.protocol=generate"
        )
    if cfg.prompt_format != "plain":
        raise ValueError(
            f"task {cfg.name} formats its prompts with task.chat_format, not "
            "task.prompt_format: leave task.prompt_format=plain"
        )
    if importlib.util.find_spec("rouge_score") is None:
        raise ValueError(
            f"task {cfg.name} scores generated replies with ROUGE-L from the rouge-score "
            "package: pip install rouge-score"
        )


def option(cfg: TaskConfig, name: str):
    return cfg.options.get(name, COMMON_OPTIONS[name])


def needs_chat_template(cfg: TaskConfig) -> bool:
    return option(cfg, "chat_format") == "template"


def no_template_message(task: str, model: str = "the model") -> str:
    return (
        f"task {task} formats dialogues with the tokenizer's chat template, but {model}'s "
        "tokenizer has none: use a model whose tokenizer has one (e.g. model=smollm2_135m) "
        "or set task.chat_format=plain (User:/Assistant: lines)"
    )


# ---------------------------------------------------------------------------- encoding
def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class ChatEncoder:
    """Token ids of dialogue examples: (context, reply) pairs, training sequences, prompts."""

    def __init__(self, tokenizer, chat_format: str, task: str):
        if chat_format == "template" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(no_template_message(task))
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.pairs = PairEncoder(tokenizer)
        self.eos_id = self.pairs.eos_id
        self.pad_id = self.pairs.pad_id

    # -- the two formats
    def _template(self, turns: Sequence[str], generation_prompt: bool) -> list[int]:
        messages = [
            {"role": USER if i % 2 == 0 else ASSISTANT, "content": text}
            for i, text in enumerate(turns)
        ]
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
        )
        return list(ids)

    @staticmethod
    def plain_prompt(history: Sequence[str]) -> str:
        """``User: ...\\nAssistant: ...\\n`` lines of the history, then ``Assistant:``."""
        lines = [
            f"{PLAIN_ROLES[USER if i % 2 == 0 else ASSISTANT]}: {text}"
            for i, text in enumerate(history)
        ]
        return "\n".join(lines) + f"\n{PLAIN_ROLES[ASSISTANT]}:"

    def pair(self, history: Sequence[str], reply: str) -> tuple[list[int], list[int]]:
        """(context ids, reply ids) of one example, whole; the reply ends with its
        end-of-turn token (EOS)."""
        if self.chat_format == "plain":
            context, answer = self.pairs.pair(self.plain_prompt(history), " " + reply)
            end = [self.eos_id] if self.eos_id is not None else []
            return self.pairs.prefix_ids + context, answer + end
        full = self._template([*history, reply], generation_prompt=False)
        # The context is what the conversation with the reply shares with the generation
        # prompt (the same tokens for the usual templates).
        n = common_prefix(self._template(history, generation_prompt=True), full)
        context, answer = full[:n], full[n:]
        if self.eos_id is not None and self.eos_id in answer:
            answer = answer[: answer.index(self.eos_id) + 1]
        return context, answer

    def prompt_ids(self, history: Sequence[str]) -> list[int]:
        """The generation prompt of a history, whole."""
        if self.chat_format == "plain":
            return self.pairs.prefix_ids + self.pairs.body(self.plain_prompt(history))
        return self._template(history, generation_prompt=True)

    # -- within max_length
    def train_example(
        self, history: Sequence[str], reply: str, max_length: int
    ) -> tuple[list[int], list[int]]:
        """(input ids, labels) of one sequence of at most ``max_length`` tokens; labels are
        the reply's tokens and -100 on the context (see the module docstring for the cut)."""
        history = list(history)
        context, answer = self.pair(history, reply)
        while len(context) + len(answer) > max_length and len(history) > 2:
            history = history[2:]  # the oldest exchange
            context, answer = self.pair(history, reply)
        keep = min(len(context), max(max_length - len(answer), max_length // 2))
        context, answer = context[len(context) - keep :], answer[: max_length - keep]
        return context + answer, [IGNORE_INDEX] * len(context) + answer

    def prompt(self, history: Sequence[str], max_length: int) -> list[int]:
        """Generation prompt ids, oldest exchanges dropped and cut from the left to fit."""
        history = list(history)
        ids = self.prompt_ids(history)
        while len(ids) > max_length and len(history) > 2:
            history = history[2:]
            ids = self.prompt_ids(history)
        return ids[-max_length:]


# ---------------------------------------------------------------------------- metrics
def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (``rouge-score``, Porter stemmer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    # RougeScorer.score takes (target, prediction)
    return [
        scorer.score(reference, prediction)["rougeL"].fmeasure
        for prediction, reference in zip(predictions, references, strict=True)
    ]


def perplexity(loss: float) -> float:
    """exp(loss), ``inf`` where it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


# ---------------------------------------------------------------------------- the task
class DialogueTask(Task):
    """Chat fine-tuning on reply tokens; held-out reply loss, perplexity and ROUGE-L."""

    def __init__(
        self,
        cfg: TaskConfig,
        tokenizer,
        train_examples: list[DialogueExample],
        eval_examples: list[DialogueExample],
    ):
        main_metric = option(cfg, "main_metric")
        super().__init__(cfg, tokenizer, [], main_metric)
        self.greater_is_better = main_metric not in LOWER_IS_BETTER
        self.encoder: ChatEncoder = ChatEncoder(  # type: ignore[assignment]
            tokenizer, option(cfg, "chat_format"), cfg.name
        )
        self.train_examples = train_examples
        self.eval_examples = eval_examples

    @property
    def num_train_examples(self) -> int:
        return len(self.train_examples)

    def encode(self, example: DialogueExample) -> tuple[list[int], list[int]]:
        return self.encoder.train_example(example.history, example.reply, self.cfg.max_length)

    def encode_train(self, index: int) -> tuple[list[int], list[int]]:
        return self.encode(self.train_examples[index])

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (-100 but on replies)."""
        return collate_train([self.encode_train(i) for i in indices], self.encoder.pad_id)

    def generate_replies(self, model, examples: Sequence[DialogueExample], batch_size: int):
        prompts = [self.encoder.prompt(ex.history, self.cfg.max_length) for ex in examples]
        return [text.strip() for text in self._generate_from_ids(model, prompts, batch_size)]

    def _evaluate(self, model, *, batch_size, max_examples):
        examples = self.eval_examples[:max_examples]
        encoded = [self.encode(ex) for ex in examples]
        total, tokens = label_nll(
            model, encoded, batch_size=batch_size, pad_id=self.encoder.pad_id, head=self.lm_head
        )
        loss = total / tokens
        replies = self.generate_replies(model, examples, batch_size)
        scores = rouge_l(replies, [ex.reply for ex in examples])
        return {
            "loss": loss,
            "ppl": perplexity(loss),
            "rougeL": sum(scores) / len(scores),
            "tokens": float(tokens),
            "n": float(len(examples)),
        }


def build_dialogue_task(
    cfg: TaskConfig, tokenizer, examples: Iterable[DialogueExample], *, seed: int
) -> DialogueTask:
    """Split ``examples`` by hash; subsample train with ``seed`` (``max_train_examples``) and
    the held-out examples in a fixed shuffled order (``max_eval_examples``)."""
    train, held_out = split_examples(examples, option(cfg, "eval_percent"))
    if not train or not held_out:
        raise ValueError(
            f"task {cfg.name}: {len(train)} training and {len(held_out)} held-out examples: "
            "both must be non-empty (use more data or another task.eval_percent)"
        )
    train = [
        train[i] for i in sample_indices(len(train), cfg.max_train_examples, seed, shuffle=False)
    ]
    order = sample_indices(len(held_out), cfg.max_eval_examples, EVAL_SHUFFLE_SEED, shuffle=True)
    return DialogueTask(cfg, tokenizer, train, [held_out[i] for i in order])
