"""LLM-Adapters' benchmark folders (Hu et al. 2023, github.com/AGI-Edgerunners/LLM-Adapters),
read as they are distributed: Commonsense-8 and Maths-7.

Layout: ``task.data_dir`` is a copy of their repository (``<data_root>/LLM-Adapters`` when the
top-level ``data_root`` is set) holding

- ``dataset/<NAME>/test.json`` for each eval dataset (``<task.eval_split>.json``: ``test``);
- ``ft-training_set/<train_file>``, the training mixture (``commonsense_170k.json``,
  ``commonsense_15k.json``, ``math_10k.json``, ...). A ``train_file`` with a ``/`` is a path
  relative to ``data_dir`` instead (``dataset/gsm8k/train.json``), or an absolute path.

Every file is a JSON list of ``{"instruction", "input", "output", "answer"}`` rows, read as
they are (questions keep their leading and trailing spaces). A row of another type stops the
run before the model loads, naming the file and the row: an ``instruction`` that is not text,
an ``input`` (or a training ``output``) that is neither text nor null, an ``answer`` that is
not a finite number (``NaN``) for a numeric dataset or not one of its labels.

Options: ``train_file`` and ``eval_datasets`` (a list of folder names); ``max_train_examples``
subsamples the training rows with the run's seed, ``max_eval_examples`` each eval dataset with
a fixed seed (the same examples for every seed). Metrics: ``acc/<dataset>`` and
``n/<dataset>`` for each dataset (even when there is one), ``acc`` (the main metric) their
unweighted mean and ``n`` their sum.

The dataset's name picks its answer rule, exactly as LLM-Adapters' ``commonsense_evaluate.py``
(``extract_answer``) and ``evaluate.py`` (``extract_answer_number``/``extract_answer_letter``):

===================================== ============== =========================================
dataset                               gold answer    prediction: in the model's response
===================================== ============== =========================================
boolq                                 true/false     the first ``true`` or ``false``
piqa                                  solution1/2    the first ``solution1``/``solution2``
social_i_qa, ARC-Easy, ARC-Challenge, answer1..5     the first of ``answer1`` .. ``answer5``
openbookqa
hellaswag                             ending1..4     the first of ``ending1`` .. ``ending4``
winogrande                            option1/2      the first ``option1``/``option2``
AQuA                                  A..E           the first character among ``A`` .. ``E``
gsm8k, SVAMP, AddSub, MultiArith,     a number       the last ``-?\\d+\\.?\\d*`` after removing
SingleEq, mawps                       (``"576.0"``)  commas; right iff within 1e-3 of the gold
===================================== ============== =========================================

Matches are case-sensitive and substrings count, as in their regular expressions (``untrue``
reads as ``true``; for AQuA ``Answer: C`` reads as ``A``, the ``A`` of ``Answer``). No match
(no number) is wrong. The response is what they take, ``output.split("### Response:")[1]``
stripped: the generated text up to a ``### Response:`` the model writes itself. A label answer
must equal the gold string; an ``answer`` given as a list (their files at older commits) is its
last element, as their older scripts read ``answer[-1]``.

Prompt: their Alpaca template (:func:`stablelora.tasks.prompts.alpaca_prompt`, whitespace
quirks included); the training target is the row's ``output``.

Where we differ from LLM-Adapters, and why:

- greedy decoding instead of their 4-beam search (their temperature/top-p/top-k do nothing
  without sampling): the project's protocol for every generation task, deterministic and
  several times cheaper;
- training loss on the ``output`` tokens (and EOS) only; their ``finetune.py`` defaults to
  ``train_on_inputs=True`` (loss on the prompt too): the project trains every task on answer
  tokens only. Training prompts use their evaluation template, which differs from their
  training template by whitespace only (see :mod:`stablelora.tasks.prompts`);
- rows whose ``output`` is empty are not trained on (they would have no target token); their
  script would train on the prompt alone. Eval rows need no ``output``;
- the whole training file is trained on (or ``max_train_examples`` of it); their
  ``finetune.py`` holds out ``val_set_size`` rows for a validation loss that picks the best
  checkpoint;
- a non-empty ``input`` goes into the prompt at evaluation too (their evaluation scripts pass
  the instruction alone); the rows of their files that we read all have an empty ``input``,
  where the two agree;
- prompts longer than ``task.max_length`` tokens are cut from the left (they cut training
  sequences at ``cutoff_len`` = 256, our default, but never evaluation prompts): a longer
  evaluation prompt loses the start of the template; raise ``max_length`` for such data;
- ``max_eval_examples`` scores a fixed random subsample of each dataset; with
  ``max_eval_examples: null`` every row is scored, as they do (in another order, which does not
  change the accuracy).

Their README warns that ``math_10k.json`` contains MAWPS training problems, which overlap
AddSub, MultiArith and SingleEq; their 7K variant has them removed (or read those three
columns with care).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stablelora.config.keyword_options import check_options
from stablelora.tasks.base import Task
from stablelora.tasks.data import EVAL_SHUFFLE_SEED, DataSource, TaskConfig, sample_indices
from stablelora.tasks.prompts import (
    alpaca_prompt,
    extract_last_number,
    first_label,
    numbers_match,
)

KIND = "math"  # scored by generating an answer (protocol=generate)
OPTIONS = ("train_file", "eval_datasets")
DATASET_DIR = "dataset"
TRAINING_SET_DIR = "ft-training_set"
RESPONSE_MARKER = "### Response:"
LAYOUT = (
    f"a copy of the LLM-Adapters repository: {DATASET_DIR}/<NAME>/test.json per eval dataset "
    f"and {TRAINING_SET_DIR}/<train_file>"
)

#: The labels LLM-Adapters' scripts look for, per answer kind (``number``: none, the last
#: number of the response).
LABELS: dict[str, tuple[str, ...]] = {
    "boolean": ("true", "false"),
    "solution": ("solution1", "solution2"),
    "answer": tuple(f"answer{k}" for k in range(1, 6)),
    "ending": tuple(f"ending{k}" for k in range(1, 5)),
    "option": ("option1", "option2"),
    "letter": ("A", "B", "C", "D", "E"),
    "number": (),
}
#: Commonsense-8, in the column order of LLM-Adapters' and DoRA's tables: folder -> kind.
COMMONSENSE8: dict[str, str] = {
    "boolq": "boolean",
    "piqa": "solution",
    "social_i_qa": "answer",
    "hellaswag": "ending",
    "winogrande": "option",
    "ARC-Easy": "answer",
    "ARC-Challenge": "answer",
    "openbookqa": "answer",
}
#: Maths-7, in the column order of LLM-Adapters' paper (MAWPS, added later, last).
MATHS7: dict[str, str] = {
    "MultiArith": "number",
    "gsm8k": "number",
    "AddSub": "number",
    "AQuA": "letter",
    "SingleEq": "number",
    "SVAMP": "number",
    "mawps": "number",
}
DATASETS: dict[str, str] = {**COMMONSENSE8, **MATHS7}


@dataclass(frozen=True)
class AdapterExample:
    """One eval row: the prompt's ``instruction`` and ``input``, the gold ``answer`` (a label
    string, or a float for the numeric datasets)."""

    instruction: str
    input: str
    gold: str | float


# ----------------------------------------------------------------------------- answers
def response_text(generated: str) -> str:
    """What LLM-Adapters scores: the text after the prompt's ``### Response:`` up to the next
    one (``output.split("### Response:")[1]``), stripped; ``generated`` is the new text."""
    return generated.split(RESPONSE_MARKER, 1)[0].strip()


def extract_answer(dataset: str, response: str) -> str | float | None:
    """The prediction in ``response`` by ``dataset``'s rule: the first of its labels (``""``
    when none occurs), or the last number (None when there is none)."""
    kind = DATASETS[dataset]
    if kind == "number":
        return extract_last_number(response)
    return first_label(response, LABELS[kind])


def is_correct(dataset: str, prediction: str | float | None, gold: str | float) -> bool:
    """Numbers: within 1e-3 of the gold (no number is wrong); labels: equal to the gold."""
    if DATASETS[dataset] == "number":
        return numbers_match(prediction if isinstance(prediction, float) else None, float(gold))
    return prediction == gold


def gold_answer(dataset: str, answer, where: str) -> str | float:
    """A row's ``answer`` as the gold: a finite float for numeric datasets (a JSON number or
    a numeric string), else one of the labels."""
    if isinstance(answer, list):
        if not answer:
            raise ValueError(f"{where}: its answer is an empty list")
        answer = answer[-1]
    kind = DATASETS[dataset]
    if kind == "number":
        not_a_number = ValueError(f"{where}: answer {answer!r} is not a number")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise not_a_number  # bool is an int to Python; null, lists, objects are no number
        try:
            gold = float(answer)
        except ValueError:
            raise not_a_number from None
        # NaN (JSON allows it) or inf matches no prediction: every answer would be scored wrong
        if not math.isfinite(gold):
            raise ValueError(f"{where}: answer {answer!r} is not a finite number")
        return gold
    if answer not in LABELS[kind]:
        raise ValueError(
            f"{where}: answer {answer!r} is not one of {'/'.join(LABELS[kind])}, the labels of "
            f"{dataset}: is this folder {dataset}'s?"
        )
    return answer


# ----------------------------------------------------------------------------- files
def eval_datasets(cfg: TaskConfig) -> list[str]:
    datasets = cfg.options.get("eval_datasets")
    if isinstance(datasets, str) or not isinstance(datasets, Sequence) or not datasets:
        raise ValueError(
            f"task {cfg.name}: task.eval_datasets must be a non-empty list of LLM-Adapters' "
            f"dataset folders, e.g. [{', '.join(COMMONSENSE8)}]"
        )
    datasets = [str(name) for name in datasets]
    unknown = [name for name in datasets if name not in DATASETS]
    if unknown:
        raise ValueError(
            f"task {cfg.name}: unknown eval dataset {unknown[0]!r}: task.eval_datasets takes "
            f"LLM-Adapters' folder names {', '.join(DATASETS)}"
        )
    repeated = sorted({name for name in datasets if datasets.count(name) > 1})
    if repeated:
        raise ValueError(f"task {cfg.name}: task.eval_datasets lists {repeated[0]} twice")
    return datasets


def data_root(cfg: TaskConfig) -> Path:
    if cfg.data_dir is None:
        raise ValueError(
            f"task {cfg.name} reads LLM-Adapters' files: set task.data_dir to {LAYOUT} (or "
            "data_root=/dir holding LLM-Adapters/)"
        )
    root = Path(cfg.data_dir)
    if not root.is_dir():
        raise ValueError(
            f"task {cfg.name}: data_dir {root} does not exist: set task.data_dir to {LAYOUT}"
        )
    return root


def train_path(cfg: TaskConfig) -> Path:
    """``<data_dir>/ft-training_set/<train_file>``, or ``<data_dir>/<train_file>`` when it has
    a ``/`` (an absolute path stays as it is)."""
    name = cfg.options.get("train_file")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            f"task {cfg.name}: set task.train_file to a training mixture of "
            f"{TRAINING_SET_DIR}/, e.g. commonsense_15k.json or math_10k.json"
        )
    path = Path(name)
    if path.is_absolute():
        return path
    root = data_root(cfg)
    return root / TRAINING_SET_DIR / path if len(path.parts) == 1 else root / path


def eval_path(cfg: TaskConfig, dataset: str) -> Path:
    return data_root(cfg) / DATASET_DIR / dataset / f"{cfg.eval_split}.json"


@functools.lru_cache(maxsize=4)
def _load_json(path: Path, mtime_ns: int, size: int):
    # Keyed on the file's time and size: check() reads each file before the model loads, and
    # build() reads the same parsed rows again without a second parse of a large mixture.
    return json.loads(path.read_text(encoding="utf-8"))


#: The text fields a row is read for: ``instruction`` must be text; ``input`` and ``output``
#: may be null or absent (no input; an output that is not trained on). An eval row's
#: ``output`` is never read, so it is not checked.
TEXT_FIELDS = {"instruction": False, "input": True, "output": True}


def json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages (``null``, ``a number``...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def read_rows(path: Path, what: str, required: tuple[str, ...]) -> list[dict]:
    """The rows of one of their JSON files: a list of objects, each with ``required`` keys and
    text where :data:`TEXT_FIELDS` expects it (a null instruction or a numeric output would
    otherwise be trained on as the text ``None`` or ``5``)."""
    try:
        stat = path.stat()
        rows = _load_json(path, stat.st_mtime_ns, stat.st_size)
    except (OSError, ValueError) as error:
        raise ValueError(f"{what}: cannot read {path}: {error}") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{what}: {path} must be a non-empty JSON list of rows")
    texts = {k: v for k, v in TEXT_FIELDS.items() if k != "output" or k in required}
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{what}: row {index} of {path} is {json_type(row)}, not an object")
        missing = [key for key in required if key not in row]
        if missing:
            raise ValueError(f"{what}: row {index} of {path} has no {missing[0]!r}")
        for key, nullable in texts.items():
            value = row.get(key)
            if not isinstance(value, str) and not (nullable and value is None):
                raise ValueError(
                    f"{what}: row {index} of {path}: {key!r} is {json_type(value)}, not text: "
                    "fix the row or remove it"
                )
    return rows


# ----------------------------------------------------------------------------- family
def check(cfg: TaskConfig) -> None:
    """Options, dataset names and every file, before any model loads."""
    check_options(cfg.options, OPTIONS, f"task {cfg.name}")
    if cfg.prompt_format != "llm_adapters":
        raise ValueError(
            f"task {cfg.name} is scored on LLM-Adapters' own instructions: set "
            "task.prompt_format=llm_adapters"
        )
    datasets = eval_datasets(cfg)
    train = train_path(cfg)
    if not train.is_file():
        raise ValueError(
            f"task {cfg.name}: no training file {train}: put the mixture there or set "
            f"task.train_file (task.data_dir is {LAYOUT})"
        )
    for dataset in datasets:
        path = eval_path(cfg, dataset)
        if not path.is_file():
            raise ValueError(
                f"task {cfg.name}: no {path}: copy LLM-Adapters' {DATASET_DIR}/{dataset}/ "
                f"there or drop {dataset} from task.eval_datasets"
            )
    # Every row of every file, so that a malformed one stops the run before the model loads.
    train_pairs(cfg, seed=0)
    for dataset in datasets:
        eval_examples(cfg, dataset)


def sources(cfg: TaskConfig) -> list[DataSource]:
    return []  # local files only, checked by check()


class AdaptersTask(Task):
    """Trains on (prompt, output) pairs; evaluates each dataset by generation and its rule."""

    def __init__(
        self,
        cfg: TaskConfig,
        tokenizer,
        train_pairs: list[tuple[str, str]],
        eval_sets: dict[str, list[AdapterExample]],
    ):
        super().__init__(cfg, tokenizer, train_pairs, main_metric="acc")
        self.eval_sets = eval_sets

    def _evaluate(self, model, *, batch_size, max_examples):
        metrics: dict[str, float] = {}
        for name, examples in self.eval_sets.items():
            examples = examples[:max_examples]
            prompts = [alpaca_prompt(ex.instruction, ex.input) for ex in examples]
            texts = self._generate_texts(model, prompts, batch_size)
            hits = sum(
                is_correct(name, extract_answer(name, response_text(text)), ex.gold)
                for text, ex in zip(texts, examples)
            )
            metrics[f"acc/{name}"] = hits / len(examples)
            metrics[f"n/{name}"] = float(len(examples))
        metrics["acc"] = sum(metrics[f"acc/{n}"] for n in self.eval_sets) / len(self.eval_sets)
        metrics["n"] = sum(metrics[f"n/{n}"] for n in self.eval_sets)
        return metrics


def train_pairs(cfg: TaskConfig, *, seed: int) -> list[tuple[str, str]]:
    """(prompt, output) of the training rows with an ``output``, ``max_train_examples`` of
    them drawn with ``seed`` (in file order)."""
    path = train_path(cfg)
    rows = read_rows(path, f"task {cfg.name}", ("instruction", "output"))
    pairs = [
        (alpaca_prompt(str(row["instruction"]), str(row.get("input") or "")), str(row["output"]))
        for row in rows
        if str(row["output"] or "").strip()
    ]
    if not pairs:
        raise ValueError(f"task {cfg.name}: every row of {path} has an empty output")
    return [
        pairs[i] for i in sample_indices(len(pairs), cfg.max_train_examples, seed, shuffle=False)
    ]


def eval_examples(cfg: TaskConfig, dataset: str) -> list[AdapterExample]:
    """A dataset's rows as examples, in a fixed shuffled order, ``max_eval_examples`` of them."""
    path = eval_path(cfg, dataset)
    what = f"task {cfg.name} ({dataset})"
    rows = read_rows(path, what, ("instruction", "answer"))
    examples = [
        AdapterExample(
            instruction=str(row["instruction"]),
            input=str(row.get("input") or ""),
            gold=gold_answer(dataset, row["answer"], f"{what}: row {index} of {path}"),
        )
        for index, row in enumerate(rows)
    ]
    order = sample_indices(len(examples), cfg.max_eval_examples, EVAL_SHUFFLE_SEED, shuffle=True)
    return [examples[i] for i in order]


def build(cfg: TaskConfig, tokenizer, *, seed: int) -> AdaptersTask:
    """The training mixture (subsampled with ``seed``) and one eval set per dataset."""
    eval_sets = {name: eval_examples(cfg, name) for name in eval_datasets(cfg)}
    return AdaptersTask(cfg, tokenizer, train_pairs(cfg, seed=seed), eval_sets)
