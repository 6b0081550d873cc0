"""Arithmetic word problems in the GSM8K format, generated offline by ``mathematics-dataset``.

DeepMind's generator (``pip install --no-deps mathematics-dataset six absl-py``) samples
questions such as ``"Calculate 1419 + 2."`` with exact answers. We keep the modules whose
answers are integers or decimals (options ``modules``, default add/sub, mixed add/sub, mul,
div; answers that are fractions are skipped) at difficulty ``level`` easy / medium / hard (the
generator's train-easy/-medium/-hard thirds of its entropy range). Rows are GSM8K-shaped:
``question`` and ``answer = "#### <number>"``; scoring is GSM8K's (greedy generation, last
number, tolerance 1e-3). ``max_train_examples`` problems (required: the number generated) come
from ``seed``; ``max_eval_examples`` from a fixed seed, so every run is evaluated on the same
problems; no training problem repeats an eval question.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
import re
import sys
import zlib
from collections.abc import Set

from stablelora.tasks.base import MathTask
from stablelora.tasks.data import DataSource, TaskConfig
from stablelora.tasks.prompts import MathExample

KIND = "math"
DEFAULT_MODULES = ("add_or_sub", "add_sub_multiple", "mul", "div")
LEVELS = ("easy", "medium", "hard")
EVAL_SEED = zlib.crc32(b"stablelora arithmetic eval")
NUMBER = re.compile(r"-?\d+(\.\d+)?")


def sources(cfg: TaskConfig) -> list[DataSource]:
    return []  # generated, no Hub dataset


def check(cfg: TaskConfig) -> None:
    """The generator and its pure-Python dependencies are installed; options are valid."""
    missing = [
        m for m in ("mathematics_dataset", "six", "absl") if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise ValueError(
            f"task {cfg.name} needs {missing}: pip install --no-deps mathematics-dataset six "
            "absl-py"
        )
    if cfg.options.get("level", "easy") not in LEVELS:
        raise ValueError(f"task {cfg.name}: task.level must be one of {LEVELS}")
    if cfg.max_train_examples is None or cfg.max_eval_examples is None:
        raise ValueError(
            f"task {cfg.name} generates its problems: set task.max_train_examples and "
            "task.max_eval_examples to how many"
        )


def import_generator():
    """Import ``mathematics_dataset.modules.arithmetic`` under current sympy (1.14).

    Compatibility shim: the package (2019) imports ``base_solution_linear`` from
    ``sympy.solvers.diophantine``, which is now a package whose function lives in its
    submodule ``sympy.solvers.diophantine.diophantine``; we re-export it where the old import
    looks. Nothing else of the generator needs changing.
    (``import a.b.c as x`` would bind the ``diophantine`` *function* that ``sympy.solvers``
    exports under the same name, hence ``sys.modules``.)
    """
    diophantine = importlib.import_module("sympy.solvers.diophantine.diophantine")
    package = sys.modules["sympy.solvers.diophantine"]
    if not hasattr(package, "base_solution_linear"):
        # The shim adds the attribute that the type checker rightly finds missing.
        package.base_solution_linear = diophantine.base_solution_linear  # type: ignore[attr-defined]
    return importlib.import_module("mathematics_dataset.modules.arithmetic")


def generate_problems(
    count: int, seed: int, module_names, level: str, exclude: Set[str] = frozenset()
) -> list[dict]:
    """``count`` distinct GSM8K-format rows, cycling through ``module_names``.

    The generator draws from Python's and numpy's global RNGs: we seed both and restore
    their states afterwards so that the caller's randomness is untouched.
    """
    import numpy as np

    arithmetic = import_generator()
    lower, upper = LEVELS.index(level) / 3, (LEVELS.index(level) + 1) / 3

    def entropy_range(full):  # the generator's train-easy/-medium/-hard thirds
        return (full[0] + lower * (full[1] - full[0]), full[0] + upper * (full[1] - full[0]))

    generators = arithmetic.train(entropy_range)
    unknown = [name for name in module_names if name not in generators]
    if unknown:
        raise ValueError(f"unknown arithmetic modules {unknown}: choose from {sorted(generators)}")
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        rows: list[dict] = []
        seen, attempts = set(exclude), 0
        while len(rows) < count:
            attempts += 1
            if attempts > 20 * count:
                raise ValueError(
                    f"could not generate {count} distinct problems from {module_names}"
                )
            problem = generators[module_names[len(rows) % len(module_names)]]()
            question, answer = str(problem.question), str(problem.answer)
            if NUMBER.fullmatch(answer) and question not in seen:
                seen.add(question)
                rows.append({"question": question, "answer": f"#### {answer}"})
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return rows


def to_example(row: dict) -> MathExample:
    return MathExample(row["question"], row["answer"], float(row["answer"].split("#### ")[-1]))


def build(cfg: TaskConfig, tokenizer, *, seed: int) -> MathTask:
    """Generated eval problems (fixed) and training problems (from ``seed``)."""
    modules = list(cfg.options.get("modules") or DEFAULT_MODULES)
    level = cfg.options.get("level", "easy")
    # check() has made sure that both counts are set.
    assert cfg.max_eval_examples is not None and cfg.max_train_examples is not None
    evals = generate_problems(cfg.max_eval_examples, EVAL_SEED, modules, level)
    exclude = {row["question"] for row in evals}
    train = generate_problems(cfg.max_train_examples, seed, modules, level, exclude)
    return MathTask(cfg, tokenizer, list(map(to_example, train)), list(map(to_example, evals)))
