"""Maths word problems: train on MetaMathQA (or GSM8K), evaluate GSM8K by greedy generation.

Rows are read in either schema: GSM8K (``question``, ``answer`` ending in ``#### <number>``) or
MetaMathQA (``query``, ``response`` ending in ``The answer is: <answer>``). Training prompt =
the question, target = the full solution text (GSM8K's ``<<...>>`` calculator annotations are
kept as they are). The training set comes from ``train_hub_id``/``train_hub_config`` (default:
the eval dataset's). With ``data_dir``, ``<data_dir>/<train_split>.jsonl`` holds the training
rows and ``<data_dir>/<eval_split>.jsonl`` the eval rows, each in its own dataset's schema.
Metric: ``acc``, the last number of the output within 1e-3 of the gold (LLM-Adapters' rule).
"""

from __future__ import annotations

from dataclasses import replace

from stablelora.tasks.base import MathTask, load_train_and_eval
from stablelora.tasks.data import DataSource, TaskConfig, split_source
from stablelora.tasks.prompts import MathExample, gsm8k_gold, metamath_gold

KIND = "math"
LAYOUT = "<train_split>.jsonl in the training set's schema, <eval_split>.jsonl in GSM8K's"


def to_example(row: dict) -> MathExample:
    """A GSM8K or MetaMathQA row as a MathExample (``gold`` None if not a number)."""
    if "query" in row and "response" in row:
        return MathExample(row["query"], row["response"], metamath_gold(row["response"]))
    if "question" in row and "answer" in row:
        return MathExample(row["question"], row["answer"], gsm8k_gold(row["answer"]))
    raise ValueError(
        f"maths row has columns {sorted(row)}: expected question/answer (GSM8K) or "
        "query/response (MetaMathQA)"
    )


def to_eval_example(row: dict) -> MathExample | None:
    """Eval rows need a numeric gold; others (MetaMathQA's LaTeX answers) are dropped."""
    example = to_example(row)
    return example if example.gold is not None else None


def train_source(cfg: TaskConfig) -> DataSource:
    if cfg.options.get("train_hub_id"):
        hub_id, hub_config = cfg.options["train_hub_id"], cfg.options.get("train_hub_config")
    else:
        hub_id, hub_config = cfg.hub_id, cfg.hub_config
    return DataSource(cfg.name, hub_id, hub_config, cfg.train_split, cfg.data_dir, LAYOUT)


def eval_source(cfg: TaskConfig) -> DataSource:
    return replace(split_source(cfg, cfg.eval_split), layout=LAYOUT)


def sources(cfg: TaskConfig) -> list[DataSource]:
    return [train_source(cfg), eval_source(cfg)]


def build(cfg: TaskConfig, tokenizer, *, seed: int) -> MathTask:
    """The maths task described by ``cfg``."""
    splits = load_train_and_eval(
        cfg,
        train_source(cfg),
        eval_source(cfg),
        to_example,
        seed=seed,
        to_eval_example=to_eval_example,
    )
    return MathTask(cfg, tokenizer, splits.train, splits.evals, splits.overlap)
