"""LLM-Adapters' benchmark folders as tasks (stablelora/tasks/llm_adapters.py).

The fixture ``tests/fixtures/llm_adapters`` is a copy of their repository's layout with a few
invented rows per file in their exact format: ``dataset/<NAME>/test.json`` for all fifteen
datasets and two mixtures in ``ft-training_set/``, quirks included (questions with leading and
trailing spaces, empty and ``"\\nA: "`` outputs, answers as ``"576.0"``, JSON numbers and the
one-element lists of their older commits). The answer-extraction cases are what their
``commonsense_evaluate.py`` / ``evaluate.py`` return on the same text.
"""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from helpers import ROOT, compose_config, run_cli

from analysis.tables.llm_adapters import BENCHMARKS
from stablelora.config.groups import group_option
from stablelora.tasks import build_task, check_task_config
from stablelora.tasks.llm_adapters import (
    COMMONSENSE8,
    DATASETS,
    MATHS7,
    extract_answer,
    gold_answer,
    is_correct,
    response_text,
)
from stablelora.tasks.prompts import alpaca_prompt

FIXTURE = ROOT / "tests" / "fixtures" / "llm_adapters"
SPACES = " " * 16


def config(name: str = "commonsense8", **overrides) -> dict:
    """conf/task/<name>.yaml as a dict, reading the fixture folder (``max_length`` raised for
    the byte tokenizer: one token per character)."""
    cfg = {**group_option("task", name), "data_dir": str(FIXTURE), "max_length": 1024}
    return {**cfg, **overrides}


def rows(dataset: str) -> list[dict]:
    return json.loads((FIXTURE / "dataset" / dataset / "test.json").read_text())


# ----------------------------------------------------------------------------- answers
@pytest.mark.parametrize(
    ("dataset", "response", "prediction"),
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "false, not true", "false"),  # the first label in the text
        ("boolq", "it is untrue", "true"),  # substrings count, as in their regex
        ("boolq", "True", ""),  # case-sensitive
        ("piqa", "the correct answer is solution2", "solution2"),
        ("social_i_qa", "answer3, or maybe answer1", "answer3"),
        ("social_i_qa", "Answer2", ""),
        ("ARC-Challenge", "the correct answer is answer5", "answer5"),
        ("ARC-Easy", "answer6", ""),  # only answer1..answer5
        ("openbookqa", "answer4", "answer4"),
        ("hellaswag", "the correct answer is ending4", "ending4"),
        ("hellaswag", "ending5 or answer1", ""),
        ("winogrande", "the correct answer is option2", "option2"),
        ("winogrande", "Option1", ""),
        ("AQuA", "20 gms.The answer is (C).", "C"),  # T, h, e... are not A-E
        ("AQuA", "Answer: (C)", "A"),  # the A of "Answer", as their findall reads it
        ("AQuA", "(b)", ""),
        ("gsm8k", "So 4 * 600 = $2,400 in 4 days. The answer is $2,400.", 2400.0),
        ("SVAMP", "It fell to -3.5 degrees", -3.5),
        ("AddSub", "5 + 3 = 8.", 8.0),  # "8." is a number
        ("MultiArith", "no number here", None),
        ("mawps", "1,000,000 people", 1000000.0),
    ],
)
def test_answer_extraction_follows_their_scripts(dataset, response, prediction):
    assert extract_answer(dataset, response) == prediction


@pytest.mark.parametrize(
    ("dataset", "prediction", "gold", "correct"),
    [
        ("gsm8k", 2400.0, 2400.0, True),
        ("gsm8k", 2400.0009, 2400.0, True),  # |gold - pred| <= 1e-3
        ("gsm8k", 2400.002, 2400.0, False),
        ("AddSub", None, 3.75, False),  # no number is wrong (their float("inf"))
        ("boolq", "true", "true", True),
        ("boolq", "", "false", False),
        ("AQuA", "A", "C", False),
    ],
)
def test_correctness_per_kind(dataset, prediction, gold, correct):
    assert is_correct(dataset, prediction, gold) is correct


def test_the_response_ends_at_a_response_marker_the_model_writes():
    # theirs: decode(prompt + new).split("### Response:")[1].strip()
    assert response_text("\n the correct answer is ending2\n### Response: ending3") == (
        "the correct answer is ending2"
    )
    assert extract_answer("hellaswag", response_text("x ### Response: ending3")) == ""
    assert response_text("  The answer is 7.  ") == "The answer is 7."


def test_gold_answers_in_their_formats():
    assert gold_answer("AddSub", "576.0", "row") == 576.0
    assert gold_answer("gsm8k", 2304.0, "row") == 2304.0  # a JSON number
    assert gold_answer("SingleEq", ["22"], "row") == 22.0  # older commits: answer[-1]
    assert gold_answer("AQuA", ["C"], "row") == "C"
    assert gold_answer("winogrande", "option2", "row") == "option2"
    with pytest.raises(ValueError, match=r"row: answer 'yes' is not one of true/false"):
        gold_answer("boolq", "yes", "row")
    with pytest.raises(ValueError, match="answer '' is not a number"):
        gold_answer("gsm8k", "", "row")


def test_the_benchmarks_and_the_analysis_agree():
    assert tuple(COMMONSENSE8) == BENCHMARKS["commonsense8"][1]
    assert tuple(MATHS7) == BENCHMARKS["maths7"][1]
    assert len(COMMONSENSE8) == 8 and len(MATHS7) == 7 and len(DATASETS) == 15
    for name in ("commonsense8", "maths7"):
        assert group_option("task", name)["eval_datasets"] == list(BENCHMARKS[name][1])


# ----------------------------------------------------------------------------- loading
def test_alpaca_prompt_is_their_evaluation_template():
    assert alpaca_prompt("Add 2 and 2.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        f"completes the request. \n\n{SPACES}### Instruction:\n{SPACES}Add 2 and 2.\n\n"
        f"{SPACES}### Response:\n{SPACES}"
    )
    assert alpaca_prompt("Sum them.", "2 and 2") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        f"{SPACES}### Instruction:\n{SPACES}Sum them.\n\n{SPACES}### Input:\n{SPACES}2 and 2\n\n"
        f"{SPACES}### Response:\n{SPACES}"
    )


def test_commonsense8_reads_the_folder_as_it_is(tok):
    task = build_task(config("commonsense8"), tok, seed=0)
    assert list(task.eval_sets) == list(COMMONSENSE8) and task.main_metric == "acc"
    assert task.num_train_examples == 5  # the row with an empty output is not trained on
    mixture = json.loads((FIXTURE / "ft-training_set" / "commonsense_15k.json").read_text())
    prompt, target = task.train_pairs[0]
    assert prompt == alpaca_prompt(mixture[0]["instruction"])
    assert target == "the correct answer is true"
    boolq = task.eval_sets["boolq"]
    assert sorted(ex.gold for ex in boolq) == ["false", "true", "true"]
    assert {ex.instruction for ex in boolq} == {row["instruction"] for row in rows("boolq")}
    assert sorted(ex.gold for ex in task.eval_sets["ARC-Challenge"]) == ["answer2", "answer2"]
    # What the model trains on: the template's trailing whitespace leads the answer.
    _, labels = task.encoder.train_example(prompt, target, 512)
    trained = tok.decode([t for t in labels if t != -100], skip_special_tokens=True)
    assert trained == "\n" + SPACES + "the correct answer is true"


def test_maths7_keeps_their_quirks(tok):
    task = build_task(config("maths7"), tok, seed=0)
    assert list(task.eval_sets) == list(MATHS7)
    assert task.num_train_examples == 3  # of 4: one output is empty
    targets = [target for _, target in task.train_pairs]
    assert targets[2] == "\nA: 6 * 4 = 24 eggs. The answer is 24."  # kept as it is
    assert task.train_pairs[2][0] == alpaca_prompt(
        " A box has 6 rows of 4 eggs. How many eggs are in the box? "
    )
    golds = {name: sorted(ex.gold for ex in examples) for name, examples in task.eval_sets.items()}
    assert golds["AddSub"] == [3.75, 13.0] and golds["gsm8k"] == [28.0, 2400.0]
    assert golds["SingleEq"] == [22.0, 26.0] and golds["AQuA"] == ["B", "C"]
    multiarith = {ex.instruction for ex in task.eval_sets["MultiArith"]}
    assert " A shelf holds 8 books. How many shelves are needed for 40 books? " in multiarith
    addsub = [ex for ex in task.eval_sets["AddSub"] if ex.gold == 13.0][0]
    assert alpaca_prompt(addsub.instruction).count(" ? \n\n") == 1  # trailing space kept


def test_subsamples_eval_fixed_train_by_seed(tok):
    first, again, other = (
        build_task(config("commonsense8", max_train_examples=3, max_eval_examples=2), tok, seed=s)
        for s in (0, 0, 1)
    )
    assert first.train_pairs == again.train_pairs != other.train_pairs
    assert len(first.train_pairs) == 3
    assert first.eval_sets == other.eval_sets  # the same examples for every seed
    assert all(len(examples) <= 2 for examples in first.eval_sets.values())
    assert len(first.eval_sets["boolq"]) == 2


# ----------------------------------------------------------------------------- scoring
class ByPrompt(torch.nn.Module):
    """Answers each prompt with ``answer(prompt)``, EOS-padded to one length per batch."""

    def __init__(self, tok, answer):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answer = tok, answer

    def generate(self, input_ids, attention_mask, generation_config):
        assert attention_mask[:, -1].all(), "prompts must be left-padded"
        assert not generation_config.do_sample and generation_config.num_beams == 1
        eos = self.tok.eos_token_id
        new = []
        for row, mask in zip(input_ids, attention_mask):
            prompt = self.tok.decode(row[mask.bool()])
            new.append(self.tok(self.answer(prompt), add_special_tokens=False).input_ids)
        width = max(len(ids) for ids in new) + 1
        new = [(ids + [eos] * width)[: min(width, generation_config.max_new_tokens)] for ids in new]
        return torch.cat([input_ids, torch.tensor(new)], dim=1)


def scripted_answer(prompt: str) -> str:
    if "true or false" in prompt:
        return "the correct answer is true"  # 2 of 3 boolq golds
    if "ending" in prompt:  # the cut at a second marker: ending2 counts, ending3 does not
        return "\nthe correct answer is ending2\n### Response: ending3"
    if "Answer Choices" in prompt:
        return "Answer: (B)"  # reads as "A": both AQuA rows wrong
    return "36 - 8 = 28.\nThe answer is 28"  # right for one gsm8k row of two


def test_each_dataset_is_scored_by_its_rule(tok):
    cfg = config(eval_datasets=["boolq", "hellaswag", "AQuA", "gsm8k"], max_new_tokens=64)
    task = build_task(cfg, tok, seed=0)
    metrics = task.evaluate(ByPrompt(tok, scripted_answer), batch_size=2)
    expected = {"boolq": 2 / 3, "hellaswag": 1 / 2, "AQuA": 0.0, "gsm8k": 1 / 2}
    for name, acc in expected.items():
        assert metrics[f"acc/{name}"] == pytest.approx(acc), name
    assert metrics["acc"] == pytest.approx(sum(expected.values()) / 4)
    assert metrics["n"] == 9.0 and metrics["n/boolq"] == 3.0
    one = build_task(config(eval_datasets=["AQuA"]), tok, seed=0)
    assert set(one.evaluate(ByPrompt(tok, scripted_answer), batch_size=2)) == {
        "acc",
        "n",
        "acc/AQuA",
        "n/AQuA",
    }  # per-dataset keys even for one dataset, so the analysis reads every run alike


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"level": "easy"}, "task commonsense8 has no option 'level': its options are train_file"),
        ({"eval_datasets": ["BoolQ"]}, "unknown eval dataset 'BoolQ'.*boolq, piqa"),
        ({"eval_datasets": []}, "task.eval_datasets must be a non-empty list"),
        ({"eval_datasets": ["boolq", "piqa", "boolq"]}, "lists boolq twice"),
        ({"data_dir": None}, "reads LLM-Adapters' files: set task.data_dir"),
        ({"data_dir": "/nonexistent/dir"}, "data_dir /nonexistent/dir does not exist"),
        ({"train_file": "commonsense_170k.json"}, "no training file .*commonsense_170k.json"),
        ({"train_file": ""}, "set task.train_file"),
        ({"prompt_format": "plain"}, "set task.prompt_format=llm_adapters"),
        ({"protocol": "loglik"}, "scored by generating an answer: set task.protocol=generate"),
        ({"eval_split": "validation"}, r"no .*dataset/boolq/validation.json: copy"),
    ],
)
def test_bad_options_and_missing_files_are_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        check_task_config(config(**overrides))
    assert "\n" not in str(error.value)


def test_a_missing_dataset_folder_names_it(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "LLM-Adapters")
    shutil.rmtree(tmp_path / "LLM-Adapters" / "dataset" / "mawps")
    with pytest.raises(ValueError, match=r"no .*/dataset/mawps/test.json: copy .* drop mawps"):
        check_task_config(config("maths7", data_dir=str(tmp_path / "LLM-Adapters")))
    # the mixture may also be a path inside data_dir
    cfg = config("maths7", data_dir=str(tmp_path / "LLM-Adapters"))
    check_task_config({**cfg, "eval_datasets": ["gsm8k"], "train_file": "dataset/gsm8k/test.json"})


@pytest.mark.parametrize(
    ("task", "file", "row", "value", "message"),
    [
        ("commonsense8", "dataset/boolq/test.json", 1, {"instruction": None},
         r"\(boolq\): row 1 of .*boolq/test.json: 'instruction' is null, not text"),
        ("maths7", "ft-training_set/math_10k.json", 0, {"output": 5},
         r"row 0 of .*math_10k.json: 'output' is a number \(5\), not text"),
        ("maths7", "ft-training_set/math_10k.json", 1, {"input": ["x"]},
         r"row 1 of .*math_10k.json: 'input' is a list, not text"),
        ("maths7", "dataset/gsm8k/test.json", 0, {"answer": float("nan")},
         r"\(gsm8k\): row 0 of .*gsm8k/test.json: answer nan is not a finite number"),
        ("maths7", "dataset/SVAMP/test.json", 0, {"answer": True},
         r"\(SVAMP\): row 0 of .*SVAMP/test.json: answer True is not a number"),
        ("maths7", "dataset/AddSub/test.json", 0, {"answer": None},
         r"\(AddSub\): row 0 of .*AddSub/test.json: answer None is not a number"),
    ],
)  # fmt: skip
def test_a_row_of_the_wrong_type_is_refused_naming_the_file_and_row(
    tmp_path, task, file, row, value, message
):
    """Rows that used to be trained and scored silently: a null instruction read as the text
    "None", an output 5 as "5", a NaN answer that no prediction matches."""
    data = tmp_path / "LLM-Adapters"
    shutil.copytree(FIXTURE, data)
    path = data / file
    rows_ = json.loads(path.read_text())
    rows_[row].update(value)
    path.write_text(json.dumps(rows_))  # NaN as JSON's NaN, as json.dumps writes it
    with pytest.raises(ValueError, match=message) as error:
        check_task_config(config(task, data_dir=str(data)))
    assert "\n" not in str(error.value)


def test_configs_compose_and_pass_the_runner_checks(monkeypatch):
    from stablelora.config.check import check_config
    from stablelora.config.errors import ConfigError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("commonsense8", "maths7"):
        check_config(
            compose_config(["model=tiny_llama", f"task={name}", f"task.data_dir={FIXTURE}"])
        )
    cfg = compose_config(["task=maths7", "data_root=/data"])
    assert cfg.task.data_dir == "/data/LLM-Adapters"
    bad = ["model=tiny_llama", "task=commonsense8", f"task.data_dir={FIXTURE}", "+task.level=easy"]
    with pytest.raises(ConfigError, match="has no option 'level'") as error:
        check_config(compose_config(bad))
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_runner_trains_both_benchmarks_and_the_report_has_their_tables(tmp_path):
    result = run_cli(
        "run.py",
        "-m",
        "experiment=tiny_run",
        "logger.mode=disabled",
        "task=commonsense8,maths7",
        f"task.data_dir={FIXTURE}",
        "model=tiny_llama",
        "trainer.max_steps=2",
        "trainer.eval_before=false",
        "trainer.num_threads=1",
        "task.max_new_tokens=8",
        "probe=off",
        f"output_root={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in tmp_path.rglob("summary.json")]
    assert sorted(s["task"] for s in summaries) == ["commonsense8", "maths7"]
    for summary in summaries:
        assert summary["status"] == "completed" and summary["main_metric"] == "eval/acc"
        names = COMMONSENSE8 if summary["task"] == "commonsense8" else MATHS7
        final = summary["final"]
        assert {f"eval/acc/{name}" for name in names} <= set(final)
        mean = sum(final[f"eval/acc/{name}"] for name in names) / len(names)
        assert final["eval/acc"] == pytest.approx(mean)

    from analysis.report import main as report

    built = report([str(tmp_path), "--out", str(tmp_path / "report"), "--no-plots"])
    tables = {table.name: table for table in built["tables"]}
    for name, titles in (
        ("commonsense8", ["BoolQ", "PIQA", "SIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c"]),
        ("maths7", ["MultiArith", "GSM8K", "AddSub", "AQuA", "SingleEq", "SVAMP", "MAWPS"]),
    ):
        table = tables[name]
        assert set(titles) | {"Avg"} <= set(table.display.columns)
        # the one run's accuracies in %, per dataset and on average, as its summary has them
        final = next(s["final"] for s in summaries if s["task"] == name)
        names = COMMONSENSE8 if name == "commonsense8" else MATHS7
        (row,) = table.data.to_dict("records")
        assert {d: row[d] for d in names} == {
            d: pytest.approx(100 * final[f"eval/acc/{d}"]) for d in names
        }
        assert row["avg"] == pytest.approx(100 * final["eval/acc"])
        # the CSV written is that table
        written = pd.read_csv(tmp_path / "report" / "tables" / f"{name}.csv")
        assert list(written.columns) == list(table.data.columns) and len(written) == 1
        assert written.loc[0, ["avg", *names]].tolist() == pytest.approx(
            [row["avg"], *(row[d] for d in names)]
        )
