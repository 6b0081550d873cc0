"""Task objects: training batches from (prompt, target) pairs, and evaluation.

``MultipleChoiceTask`` scores by log-likelihood (lm-evaluation-harness: ``acc`` is the argmax
of the summed log-probs of ``" " + choice``, ``acc_norm`` the argmax of that sum divided by the
choice's length in characters) or by greedy generation and LLM-Adapters' answer extraction
(``acc`` only). ``MathTask`` generates greedily and compares the last number of the output
with the gold answer (tolerance 1e-3). LLM-Adapters decodes with 4-beam search; we decode
greedily, which is cheaper and deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from stablelora.contamination import CONTENT, SplitExamples, apply_split_rule
from stablelora.records.examples import example_id, unique_ids
from stablelora.tasks.data import (
    EVAL_SHUFFLE_SEED,
    VALIDATION,
    DataSource,
    TaskConfig,
    load_examples,
    optional_examples,
    split_source,
)
from stablelora.tasks.prompts import (
    MathExample,
    MultipleChoiceExample,
    alpaca_prompt,
    cut_at_stop_strings,
    extract_choice_label,
    extract_last_number,
    math_prompt,
    math_train_pair,
    multiple_choice_requests,
    multiple_choice_train_pair,
    numbers_match,
)
from stablelora.tasks.scoring import (
    PairEncoder,
    collate_packed,
    collate_train,
    generate_greedy,
    loglikelihoods,
)


class Task:
    """A fine-tuning task: ``collate`` makes training batches, ``evaluate`` scores a model.

    Subclasses hold their evaluation examples and implement ``_evaluate``. Those that score
    example by example also leave, after each ``evaluate``, one dict per example in
    ``last_examples`` (:mod:`stablelora.records.examples`: ``eval_set``, ``example_id``,
    ``gold``, ``pred``, ``correct``...); the runner writes them to ``examples.parquet``.
    """

    def __init__(
        self, cfg: TaskConfig, tokenizer, train_pairs: list[tuple[str, str]], main_metric: str
    ):
        self.name = cfg.name
        self.main_metric = main_metric
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.encoder = PairEncoder(tokenizer)
        self.train_pairs = train_pairs
        #: Where the LM head runs when scoring: "used" positions or "all" (trainer.lm_head).
        self.lm_head = "used"
        self.last_examples: list[dict] = []
        #: Eval set -> its overlap record (stablelora.contamination.overlap_entry); empty for
        #: a family the check does not cover. The runner writes it to contamination.json.
        self.overlap: dict[str, dict] = {}

    @property
    def num_train_examples(self) -> int:
        return len(self.train_pairs)

    def encode_train(self, index: int) -> tuple[list[int], list[int]]:
        """(input ids, labels) of train example ``index``."""
        return self.encoder.train_example(*self.train_pairs[index], self.cfg.max_length)

    def train_length(self, index: int) -> int:
        """Tokens of train example ``index`` (what length-grouped batching sorts by)."""
        return len(self.encode_train(index)[0])

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Training batch of the train examples at ``indices``: right-padded ``input_ids``,
        ``attention_mask`` and ``labels`` (-100 on prompt and padding)."""
        return collate_train([self.encode_train(i) for i in indices], self.encoder.pad_id)

    def collate_packed(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The same examples as :meth:`collate`, packed end to end in one row without padding:
        ``input_ids``, ``position_ids`` restarting at 0 per example, ``labels`` (-100 on
        prompts and on each example's first token); see
        :func:`stablelora.tasks.scoring.collate_packed` (``trainer.packing``)."""
        return collate_packed([self.encode_train(i) for i in indices])

    def evaluate(
        self, model: torch.nn.Module, *, batch_size: int, max_examples: int | None = None
    ) -> dict[str, float]:
        """Metrics of ``model`` on the eval split (at most ``max_examples`` per (sub)task).

        Runs in eval mode under ``torch.no_grad()`` on the model's device and restores every
        module's train/eval mode afterwards. ``batch_size`` is the number of sequences per
        forward pass (loglik: (context, choice) pairs; generate: prompts).
        """
        modes = {module: module.training for module in model.modules()}
        self.last_examples = []
        model.eval()
        try:
            with torch.no_grad():
                return self._evaluate(model, batch_size=batch_size, max_examples=max_examples)
        finally:
            for module, training in modes.items():
                module.training = training

    def _evaluate(self, model, *, batch_size: int, max_examples: int | None) -> dict[str, float]:
        raise NotImplementedError

    def _generate_texts(self, model, prompts: list[str], batch_size: int) -> list[str]:
        prompt_ids = [self.encoder.prompt(p, self.cfg.max_length) for p in prompts]
        return self._generate_from_ids(model, prompt_ids, batch_size)

    def _generate_from_ids(self, model, prompt_ids: list[list[int]], batch_size: int) -> list[str]:
        """Greedy continuations (``task.max_new_tokens``) of token-id prompts, decoded."""
        outputs = generate_greedy(
            model,
            prompt_ids,
            batch_size=batch_size,
            max_new_tokens=self.cfg.max_new_tokens,
            pad_id=self.encoder.pad_id,
            eos_id=self.encoder.eos_id,
        )
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]


class MultipleChoiceTask(Task):
    """Multiple-choice QA; ``eval_sets`` maps each (sub)task name to its eval examples.

    With several eval sets the metrics are per set (``acc/<name>``, ``acc_norm/<name>``,
    ``n/<name>``) plus their unweighted mean over the sets (``acc``, ``acc_norm``).
    """

    def __init__(
        self,
        cfg: TaskConfig,
        tokenizer,
        train_examples: list[MultipleChoiceExample],
        eval_sets: dict[str, list[MultipleChoiceExample]],
        main_metric: str = "acc",
        overlap: dict[str, dict] | None = None,
    ):
        train_pairs = [multiple_choice_train_pair(ex, cfg.prompt_format) for ex in train_examples]
        super().__init__(cfg, tokenizer, train_pairs, main_metric)
        self.eval_sets = eval_sets
        self.overlap = dict(overlap or {})

    def _evaluate(self, model, *, batch_size, max_examples):
        score = self._score_loglik if self.cfg.protocol == "loglik" else self._score_generate
        metrics: dict[str, float] = {}
        for name, examples in self.eval_sets.items():
            examples = examples[:max_examples]
            scores, rows = score(model, examples, batch_size)
            scores["n"] = float(len(examples))
            ids = unique_ids([example_id(ex.query, ex.choices, ex.gold) for ex in examples])
            self.last_examples += [
                {"eval_set": name, "example_id": id_, **row} for id_, row in zip(ids, rows)
            ]
            if len(self.eval_sets) == 1:
                return scores
            metrics.update({f"{metric}/{name}": value for metric, value in scores.items()})
        for metric in scores:
            values = [metrics[f"{metric}/{name}"] for name in self.eval_sets]
            metrics[metric] = sum(values) if metric == "n" else sum(values) / len(values)
        return metrics

    def _score_loglik(self, model, examples, batch_size) -> tuple[dict[str, float], list[dict]]:
        """(acc and acc_norm, one row per example: gold, pred, pred_norm, correct, loglik)."""
        requests, choice_lists = [], []
        for example in examples:
            context, choices = multiple_choice_requests(example, self.cfg.prompt_format)
            choice_lists.append(choices)
            requests += [
                self.encoder.loglik_request(context, " " + choice, self.cfg.max_length)
                for choice in choices
            ]
        sums = loglikelihoods(
            model, requests, batch_size=batch_size, pad_id=self.encoder.pad_id, head=self.lm_head
        )
        hits, norm_hits, offset, rows = 0, 0, 0, []
        for example, choices in zip(examples, choice_lists):
            lls = sums[offset : offset + len(choices)]
            offset += len(choices)
            pred = argmax(lls)
            # acc_norm divides by the choice's length in characters, without the delimiter
            pred_norm = argmax([ll / max(len(c), 1) for ll, c in zip(lls, choices)])
            hits += pred == example.gold
            norm_hits += pred_norm == example.gold
            rows.append(
                {
                    "gold": example.gold,
                    "pred": pred,
                    "pred_norm": pred_norm,
                    "correct": pred == example.gold,
                    "loglik": [float(ll) for ll in lls],
                }
            )
        n = len(examples)
        return {"acc": hits / n, "acc_norm": norm_hits / n}, rows

    def _score_generate(self, model, examples, batch_size) -> tuple[dict[str, float], list]:
        """(acc, one row per example: gold, pred = the extracted label's choice, correct)."""
        prompts = [alpaca_prompt(example.instruction) for example in examples]
        texts = self._generate_texts(model, prompts, batch_size)
        rows = []
        for text, example in zip(texts, examples):
            label = extract_choice_label(text, example.label_word)
            correct = label == example.gold_label
            pred = int(label[len(example.label_word) :]) - 1 if label else None
            rows.append({"gold": example.gold, "pred": pred, "correct": correct})
        return {"acc": sum(row["correct"] for row in rows) / len(examples)}, rows


class MathTask(Task):
    """Maths word problems scored by greedy generation and final-number comparison."""

    def __init__(
        self,
        cfg: TaskConfig,
        tokenizer,
        train_examples: list[MathExample],
        eval_examples: list[MathExample],
        overlap: dict | None = None,
    ):
        train_pairs = [math_train_pair(ex, cfg.prompt_format) for ex in train_examples]
        super().__init__(cfg, tokenizer, train_pairs, main_metric="acc")
        self.eval_examples = eval_examples
        self.overlap = {cfg.name: overlap} if overlap else {}

    def _evaluate(self, model, *, batch_size, max_examples):
        examples = self.eval_examples[:max_examples]
        prompts = [math_prompt(example.question, self.cfg.prompt_format) for example in examples]
        texts = self._generate_texts(model, prompts, batch_size)
        correct = [
            numbers_match(extract_last_number(cut_at_stop_strings(text)), example.gold)
            for text, example in zip(texts, examples)
        ]
        ids = unique_ids([example_id(ex.question, ex.gold) for ex in examples])
        self.last_examples = [
            {"eval_set": self.name, "example_id": id_, "correct": hit}
            for id_, hit in zip(ids, correct)
        ]
        return {"acc": sum(correct) / len(examples), "n": float(len(examples))}


def argmax(values: list[float]) -> int:
    """Index of the first largest value (ties go to the earlier choice, like numpy)."""
    return max(range(len(values)), key=values.__getitem__)


def held_out_source(
    cfg: TaskConfig, train_source: DataSource, eval_source: DataSource
) -> tuple[str, DataSource] | None:
    """The held-out split a run does not score but must keep out of training, with its
    source: the test split when scoring validation, the validation slice when scoring test
    while holding it out (``task.holdout_validation``); None when there is no such split."""
    if cfg.eval_split == VALIDATION:
        return "test", replace(eval_source, split="test", holdout_of=None, drop_holdout=False)
    if cfg.excludes_validation:
        validation = replace(
            train_source, split=VALIDATION, holdout_of=train_source.split, drop_holdout=False
        )
        return VALIDATION, validation
    return None


def load_train_and_eval(
    cfg: TaskConfig,
    train_source: DataSource,
    eval_source: DataSource,
    to_example: Callable[[dict], object],
    *,
    seed: int,
    to_eval_example: Callable[[dict], object] | None = None,
) -> SplitExamples:
    """Train examples subsampled with ``seed``, eval examples in a fixed shuffled order, the
    other held-out split, and the overlap record of the eval split
    (:func:`stablelora.contamination.overlap_entry`). Under ``task.split_rule=content`` the
    eval split is scored without repeats and training leaves out what overlaps a held-out item
    (:func:`stablelora.contamination.clean_splits`; after the ``max_train_examples`` draw, so
    a capped train set may hold fewer)."""
    to_eval = to_eval_example or to_example
    content = cfg.split_rule == CONTENT
    train = load_examples(
        train_source, to_example, limit=cfg.max_train_examples, seed=seed, shuffle=False
    )
    evals = load_examples(
        eval_source,
        to_eval,
        limit=None if content else cfg.max_eval_examples,
        seed=EVAL_SHUFFLE_SEED,
        shuffle=True,
    )
    other = held_out_source(cfg, train_source, eval_source)
    held_out = optional_examples(other[1], to_eval) if other else None
    return apply_split_rule(
        train,
        evals,
        held_out,
        split_rule=cfg.split_rule,
        eval_split=cfg.eval_split,
        held_out_split=other[0] if other else None,
        max_eval_examples=cfg.max_eval_examples,
    )


def build_multiple_choice(
    cfg: TaskConfig,
    tokenizer,
    *,
    seed: int,
    to_example: Callable[[dict], MultipleChoiceExample | None],
    main_metric: str = "acc",
) -> MultipleChoiceTask:
    """A single-dataset multiple-choice task read from ``cfg``'s Hub id or ``data_dir``."""
    splits = load_train_and_eval(
        cfg,
        split_source(cfg, cfg.train_split),
        split_source(cfg, cfg.eval_split),
        to_example,
        seed=seed,
    )
    if cfg.protocol == "generate":
        main_metric = "acc"
    return MultipleChoiceTask(
        cfg,
        tokenizer,
        splits.train,
        {cfg.name: splits.evals},
        main_metric,
        overlap={cfg.name: splits.overlap},
    )
