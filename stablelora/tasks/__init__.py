"""Fine-tuning tasks: load a dataset, build prompts, make training batches, score a model.

Usage (``task_cfg`` is the composed ``task`` node of the Hydra config, or a plain dict)::

    from stablelora.tasks import build_task, check_task_config
    check_task_config(cfg.task)                      # cheap: before loading any model
    task = build_task(cfg.task, tokenizer, seed=cfg.seed)
    loss = model(**task.collate(indices)).loss       # indices into range(task.num_train_examples)
    metrics = task.evaluate(model, batch_size=16)    # {"acc": ..., "n": ...}; task.main_metric
    task.last_examples                               # per example: id, gold, pred, correct...

One module per task family, ``stablelora/tasks/<family>.py``, defines ``KIND``
("multiple_choice", "math", "dialogue" or "regression"), ``sources(cfg)`` (the Hub datasets it
reads, for the offline check), ``build(cfg, tokenizer, *, seed)`` and optionally
``check(cfg)``. Any module of this package with ``KIND`` and ``build`` is a family
(:func:`families`): adding one needs no list or import line.

Main metrics: ``acc_norm`` for HellaSwag under loglik, ``acc`` otherwise (multiple choice:
argmax of the summed log-probs, or exact answer label under generation; merged_qa: the mean of
the subtasks' ``acc``; maths: final number within 1e-3; llm_adapters: the mean of its datasets'
``acc``, each by LLM-Adapters' rule for that dataset); dialogue (``chatterbot``,
``wizardlm``): the held-out reply ``loss`` by default (``task.main_metric``: ``loss``, ``ppl``
or ``rougeL``; see :mod:`stablelora.tasks.dialogue`).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from stablelora.contamination import SPLIT_RULES
from stablelora.tasks.base import MathTask, MultipleChoiceTask, Task
from stablelora.tasks.data import PROMPT_FORMATS, PROTOCOLS, TaskConfig, check_source

#: Families whose examples are token sequences (a prompt and an answer).
TOKEN_KINDS = ("multiple_choice", "math", "dialogue")

__all__ = [
    "MathTask",
    "MultipleChoiceTask",
    "Task",
    "TaskConfig",
    "build_task",
    "check_chat_template",
    "check_task_config",
    "families",
    "task_record",
]


def families() -> list[str]:
    """The task families: the modules of this package that define ``KIND`` and ``build``."""
    found = []
    for module in pkgutil.iter_modules(__path__):
        if module.ispkg:
            continue
        imported = importlib.import_module(f"{__name__}.{module.name}")
        if hasattr(imported, "KIND") and hasattr(imported, "build"):
            found.append(module.name)
    return sorted(found)


def family_module(cfg: TaskConfig):
    """The module ``stablelora.tasks.<family>`` of a task."""
    known = families()
    if cfg.family not in known:
        raise ValueError(
            f"task {cfg.name} has unknown family {cfg.family!r}: set task.family to one of "
            f"{', '.join(known)} (or add stablelora/tasks/{cfg.family}.py)"
        )
    return importlib.import_module(f"stablelora.tasks.{cfg.family}")


def task_record(task_cfg: Any) -> dict[str, Any]:
    """What a run's ``summary.json`` records of its task besides the name, so that the
    analysis routes the run to its tables without a list of task names: ``task_family`` (the
    module ``stablelora/tasks/<family>.py``), ``task_kind`` (that module's ``KIND``) and
    ``protocol`` (``loglik`` or ``generate``). None where the config does not say (a run that
    failed on its config: an unknown family has no kind)."""
    try:
        cfg = TaskConfig.from_any(task_cfg)
    except ValueError:  # no task node, or one without a name or family
        return {"task_family": None, "task_kind": None, "protocol": None}
    kind = family_module(cfg).KIND if cfg.family in families() else None
    return {"task_family": cfg.family, "task_kind": kind, "protocol": cfg.protocol}


def task_splits(task_cfg: Any, *, seed: int) -> dict | None:
    """Eval set -> :class:`stablelora.contamination.SplitExamples` of the task, as a run of
    ``seed`` would use them, without a tokenizer (what the overlap check reads); None for a
    family whose data the check does not cover (generation-only, dialogue, toy tasks)."""
    from stablelora.tasks.base import load_train_and_eval
    from stablelora.tasks.data import split_source

    cfg = TaskConfig.from_any(task_cfg)
    module = family_module(cfg)
    if cfg.family == "merged_qa":
        splits = {
            name: module.subtask_examples(sub, seed=seed)
            for name, sub in module.subtask_configs(cfg).items()
        }
        module.across_subtasks(cfg, splits)
        return splits
    if hasattr(module, "load_split_examples"):
        return {cfg.name: module.load_split_examples(cfg, seed=seed)}
    if hasattr(module, "train_source") and hasattr(module, "to_eval_example"):  # maths
        return {
            cfg.name: load_train_and_eval(
                cfg,
                module.train_source(cfg),
                module.eval_source(cfg),
                module.to_example,
                seed=seed,
                to_eval_example=module.to_eval_example,
            )
        }
    if getattr(module, "KIND", None) == "multiple_choice" and hasattr(module, "to_example"):
        train, evals = split_source(cfg, cfg.train_split), split_source(cfg, cfg.eval_split)
        return {cfg.name: load_train_and_eval(cfg, train, evals, module.to_example, seed=seed)}
    return None


def check_task_config(task_cfg: Any) -> None:
    """Validate a task config without loading any data or model.

    Raises ValueError with one line saying what is wrong and how to fix it: unknown family,
    invalid protocol or prompt format (or a combination the task cannot score), bad lengths,
    a Hub dataset needed while ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` is set and no
    ``task.data_dir`` is given, or a ``data_dir`` that lacks a split file.
    """
    cfg = TaskConfig.from_any(task_cfg)
    module = family_module(cfg)
    if cfg.split_rule not in SPLIT_RULES:
        raise ValueError(
            f"task {cfg.name}: split_rule {cfg.split_rule!r} is not one of {SPLIT_RULES}: "
            "set task.split_rule"
        )
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(
            f"task {cfg.name}: protocol {cfg.protocol!r} is not one of {PROTOCOLS}: "
            "set task.protocol"
        )
    if cfg.prompt_format not in PROMPT_FORMATS:
        raise ValueError(
            f"task {cfg.name}: prompt_format {cfg.prompt_format!r} is not one of "
            f"{PROMPT_FORMATS}: set task.prompt_format"
        )
    if module.KIND == "math" and cfg.protocol != "generate":
        raise ValueError(
            f"task {cfg.name} is scored by generating an answer: set task.protocol=generate"
        )
    if (
        module.KIND == "multiple_choice"
        and cfg.protocol == "generate"
        and cfg.prompt_format == "plain"
    ):
        raise ValueError(
            f"task {cfg.name}: protocol=generate extracts an answer label (answer1...), which "
            "plain prompts do not teach: set task.prompt_format=llm_adapters or protocol=loglik"
        )
    for key in ("max_length", "max_new_tokens", "max_train_examples", "max_eval_examples"):
        value = getattr(cfg, key)
        optional = key.startswith("max_") and key.endswith("examples")
        if not (value is None and optional) and (not isinstance(value, int) or value < 1):
            raise ValueError(f"task {cfg.name}: task.{key}={value!r} must be a positive integer")
    if module.KIND in TOKEN_KINDS and cfg.max_length < 2:
        raise ValueError(
            f"task {cfg.name}: task.max_length={cfg.max_length} cannot hold a prompt token and "
            "an answer token, so no token would be trained on: set task.max_length >= 2 (the "
            "task's sequences need far more, e.g. 64)"
        )
    if hasattr(module, "check"):
        module.check(cfg)
    for source in module.sources(cfg):
        check_source(source)


def check_chat_template(task_cfg: Any, model_cfg: Any) -> None:
    """Raise ValueError (one line) when a dialogue task needs the tokenizer's chat template
    and the model's tokenizer files, read without loading anything, have none. Says nothing
    when those files are not at hand yet (the task then checks when it is built)."""
    cfg = TaskConfig.from_any(task_cfg)
    if family_module(cfg).KIND != "dialogue":
        return
    from stablelora.models import has_chat_template
    from stablelora.tasks.dialogue import needs_chat_template, no_template_message

    if needs_chat_template(cfg) and has_chat_template(model_cfg) is False:
        raise ValueError(no_template_message(cfg.name, f"model={model_cfg.get('name')}"))


def build_task(task_cfg: Any, tokenizer, *, seed: int) -> Task:
    """Check ``task_cfg``, load its data and return the Task.

    ``seed`` picks the training subsample (``max_train_examples``); evaluation examples do
    not depend on it, so that runs with different seeds are scored on the same examples.
    """
    check_task_config(task_cfg)
    cfg = TaskConfig.from_any(task_cfg)
    return family_module(cfg).build(cfg, tokenizer, seed=seed)
