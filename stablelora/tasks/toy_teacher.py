"""The toy teacher regression of the width sweep, as a task family (see ``stablelora.toy``).

Config fields beyond the common ones: ``width`` and ``depth`` (those of ``model=toy_width``),
``teacher_seed`` (the seed of the model's frozen weights: the teacher is that network with a
low-rank perturbation), ``num_train``, ``num_eval``, ``teacher_rank``, ``teacher_strength``.
"""

from __future__ import annotations

KIND = "regression"


def sources(cfg) -> list:
    return []  # generated, no dataset to fetch


def check(cfg) -> None:
    for key in ("width", "depth", "teacher_seed"):
        if not isinstance(cfg.options.get(key), int):
            raise ValueError(
                f"task {cfg.name}: set task.{key} to an integer (see toy_teacher.yaml)"
            )


def build(cfg, tokenizer, *, seed: int):
    from stablelora.toy import ToyTeacherTask

    options = dict(cfg.options)
    return ToyTeacherTask(
        options.pop("width"), options.pop("depth"), options.pop("teacher_seed"), **options
    )
