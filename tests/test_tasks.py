"""Tests of stablelora.tasks: loaders, prompts, answer extraction, scoring, batches, configs.

Offline and CPU only: fixtures in tests/fixtures/tasks/<task>/<split>.jsonl (invented text in
the exact Hub schemas), a byte-level tokenizer and a one-layer random Llama built in memory.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from helpers import QA_TASKS, ROOT, TASK_FIXTURES, ScriptedGenerator, ids, task_config
from tiny import byte_llama, byte_tokenizer

from stablelora.config.groups import group_option
from stablelora.tasks import build_task, check_task_config
from stablelora.tasks.base import MathTask, MultipleChoiceTask, Task
from stablelora.tasks.data import TaskConfig
from stablelora.tasks.prompts import (
    MathExample,
    MultipleChoiceExample,
    alpaca_prompt,
    cut_at_stop_strings,
    extract_choice_label,
    extract_last_number,
    gsm8k_gold,
    metamath_gold,
    multiple_choice_train_pair,
    numbers_match,
)
from stablelora.tasks.scoring import generate_greedy, loglikelihoods

TASK_CONF = ROOT / "conf" / "task"
CONTRACT_FIELDS = {
    "name",
    "family",
    "hub_id",
    "hub_config",
    "train_split",
    "eval_split",
    "data_dir",
    "protocol",
    "prompt_format",
    "max_train_examples",
    "max_eval_examples",
    "max_length",
    "max_new_tokens",
}


pytestmark = pytest.mark.usefixtures("hub_offline")  # conftest: no test reaches the Hub


def by_query(task: MultipleChoiceTask) -> dict[str, MultipleChoiceExample]:
    (examples,) = task.eval_sets.values()
    return {ex.query: ex for ex in examples}


# ----------------------------------------------------------------------------- loaders


def test_arc_loader_handles_digit_keys_and_option_counts(tok):
    task = build_task(task_config("arc_easy"), tok, seed=0)
    assert task.num_train_examples == 3 and task.main_metric == "acc"
    examples = by_query(task)
    digits = examples["Question: Different carnivorous species that share a habitat may\nAnswer:"]
    assert digits.choices == ["become decomposers", "compete for food", "produce their own food"]
    assert digits.gold == 1
    five = examples["Question: Which form of energy does a battery store?\nAnswer:"]
    assert len(five.choices) == 5 and five.gold == 1


def test_obqa_siqa_hellaswag_loaders(tok):
    obqa = by_query(build_task(task_config("obqa"), tok, seed=0))
    assert obqa["An animal that lives in water most of its life is a"].gold == 1  # key " B"
    siqa = by_query(build_task(task_config("siqa"), tok, seed=0))
    tracy = siqa[
        "Q: Tracy stayed out late and avoided Riley's questions. What does Tracy need to do before this?\nA:"
    ]
    assert tracy.gold == 2 and tracy.choices[2] == "find somewhere to go"
    hellaswag = build_task(task_config("hellaswag"), tok, seed=0)
    assert hellaswag.main_metric == "acc_norm" and hellaswag.num_train_examples == 3
    examples = by_query(hellaswag)
    piano = examples["Playing piano: A girl sits down at a piano. She places her hands"]
    assert piano.gold == 0 and piano.label_word == "ending"
    kettle = examples[
        "Home and Garden: How to clean a kettle. Fill the kettle with vinegar. Use plain white vinegar."
    ]
    assert kettle.choices[0] == " Boil the vinegar. Let it sit for an hour."  # lm-eval's quirk


def test_hellaswag_test_split_without_labels_is_an_error(tok):
    with pytest.raises(ValueError, match="no labelled rows"):
        build_task(task_config("hellaswag", eval_split="test"), tok, seed=0)


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_local_json_and_parquet_files_load_like_jsonl(tok, tmp_path, suffix):
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (TASK_FIXTURES / "arc_easy" / f"{split}.jsonl").open()]
        if suffix == ".json":
            (tmp_path / f"{split}.json").write_text(json.dumps(rows))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{split}.parquet")
    reference = build_task(task_config("arc_easy"), tok, seed=0)
    task = build_task(task_config("arc_easy", data_dir=str(tmp_path)), tok, seed=0)
    assert task.train_pairs == reference.train_pairs
    assert task.eval_sets == reference.eval_sets


def test_hub_dataset_rows_convert_like_local_rows():
    """A ``datasets.Dataset`` (what the Hub path returns) gives the same examples."""
    from datasets import Dataset

    from stablelora.tasks import arc
    from stablelora.tasks.data import read_local_rows, select_rows

    rows = read_local_rows(TASK_FIXTURES / "arc_easy" / "test.jsonl")
    hub_rows = select_rows(Dataset.from_list(rows), [2, 0])
    assert hub_rows == [rows[2], rows[0]]
    assert [arc.to_example(r) for r in hub_rows] == [
        arc.to_example(rows[2]),
        arc.to_example(rows[0]),
    ]


def test_train_subsample_depends_on_seed_and_eval_order_does_not(tok):
    cfg = task_config("siqa", max_train_examples=2, max_eval_examples=2)
    tasks = [build_task(cfg, tok, seed=seed) for seed in (0, 0, 1, 2, 3)]
    assert tasks[0].train_pairs == tasks[1].train_pairs
    assert len({tuple(t.train_pairs) for t in tasks}) > 1
    assert all(t.eval_sets == tasks[0].eval_sets for t in tasks)
    assert tasks[0].num_train_examples == 2 and len(tasks[0].eval_sets["siqa"]) == 2


# ----------------------------------------------------------------------------- prompts

ARC_INSTRUCTION = (
    "Please choose the correct answer to the question: Which tool measures temperature?\n\n"
    "Answer1: a ruler Answer2: a thermometer Answer3: a balance Answer4: a clock\n\n"
    "Answer format: answer1/answer2/answer3/answer4"
)
ALPACA_ARC = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. \n\n                ### Instruction:\n                "
    + ARC_INSTRUCTION
    + "\n\n                ### Response:\n                "
)


def test_plain_and_llm_adapters_prompts(tok):
    task = build_task(task_config("arc_easy"), tok, seed=0)
    assert task.train_pairs[1] == (
        "Question: Which tool measures temperature?\nAnswer:",
        " a thermometer",
    )
    (arc_row,) = [ex for ex in task.eval_sets["arc_easy"] if ex.gold == 2]
    assert arc_row.gold_label == "answer3"
    adapters = build_task(task_config("arc_easy", prompt_format="llm_adapters"), tok, seed=0)
    assert adapters.train_pairs[1] == (ALPACA_ARC, "the correct answer is answer2")
    assert alpaca_prompt(ARC_INSTRUCTION) == ALPACA_ARC

    siqa = build_task(task_config("siqa", prompt_format="llm_adapters"), tok, seed=0)
    (tracy,) = [ex for ex in siqa.eval_sets["siqa"] if ex.instruction.count("Tracy") == 2]
    assert tracy.instruction == (
        "Please choose the correct answer to the question: Tracy stayed out late and avoided "
        "Riley's questions. What does Tracy need to do before this?\n\nAnswer1: make a new plan "
        "Answer2: go home and see Riley Answer3: find somewhere to go\n\n"
        "Answer format: answer1/answer2/answer3"
    )
    assert multiple_choice_train_pair(tracy, "llm_adapters") == (
        alpaca_prompt(tracy.instruction),
        "the correct answer is answer3",
    )
    assert multiple_choice_train_pair(tracy, "plain") == (tracy.query, " find somewhere to go")

    hellaswag = build_task(task_config("hellaswag", prompt_format="llm_adapters"), tok, seed=0)
    prompt, target = hellaswag.train_pairs[0]
    assert target == "the correct answer is ending1"
    assert (
        "Please choose the correct ending to complete the given sentence: Washing dishes: A woman "
        "fills a sink with soapy water. she\n\nEnding1: scrubs a plate with a sponge. Ending2: "
        "throws the plates out of the window. Ending3: paints the sink bright green. Ending4: "
        "plays a guitar under the tap.\n\nAnswer format: ending1/ending2/ending3/ending4"
    ) in prompt


def test_math_prompts():
    cfg = TaskConfig(name="m", family="gsm8k", protocol="generate")
    example = MathExample("What is 2+3?", "2+3=5\n#### 5", 5.0)
    plain = MathTask(cfg, byte_tokenizer(), [example], [example])
    assert plain.train_pairs == [("Question: What is 2+3?\nAnswer:", " 2+3=5\n#### 5")]
    adapters_cfg = TaskConfig(
        name="m", family="gsm8k", protocol="generate", prompt_format="llm_adapters"
    )
    adapters = MathTask(adapters_cfg, byte_tokenizer(), [example], [example])
    assert adapters.train_pairs == [(alpaca_prompt("What is 2+3?"), "2+3=5\n#### 5")]


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "word", "expected"),
    [
        ("the correct answer is answer2", "answer", "answer2"),
        ("  answer3 or maybe answer1", "answer", "answer3"),  # first match wins
        ("the correct answer is Answer2", "answer", ""),  # case-sensitive
        ("answer5", "answer", "answer5"),
        ("ending5 ending2", "ending", "ending2"),  # endings stop at 4
        ("no idea", "ending", ""),
    ],
)
def test_extract_choice_label(text, word, expected):
    assert extract_choice_label(text, word) == expected


def test_math_extraction_and_golds():
    assert extract_last_number("She sold 20 cups, then 1,500.") == 1500.0
    assert extract_last_number("3.5 and then -7.") == -7.0
    assert extract_last_number("no number here") is None
    assert numbers_match(72.0004, 72.0) and not numbers_match(72.01, 72.0)
    assert not numbers_match(None, 72.0)
    assert gsm8k_gold("It sold 1,500 cups.\n#### 1,500") == 1500.0
    assert gsm8k_gold("no marker") is None
    assert metamath_gold("so 72 apples.\n#### 72\nThe answer is: 72") == 72.0
    assert metamath_gold("The answer is: \\frac{1}{2}") is None
    assert cut_at_stop_strings(" #### 5\n\nQuestion: What is 1+1?") == " #### 5\n\n"


# ----------------------------------------------------------------------------- loglik


class FixedDistributionLM(torch.nn.Module):
    """Next-token log-probs independent of the context; counts the sequences it reads."""

    def __init__(self, log_probs: torch.Tensor):
        super().__init__()
        self.log_probs = torch.nn.Parameter(log_probs, requires_grad=False)
        self.rows_read = 0

    def forward(self, input_ids, attention_mask):
        self.rows_read += input_ids.shape[0]
        batch, length = input_ids.shape
        return SimpleNamespace(logits=self.log_probs.expand(batch, length, -1))


def fixed_lm(tok) -> FixedDistributionLM:
    """p(" ") = 0.3, p("a") = 0.5, p("b") = 0.1, the rest share 0.1."""
    probs = torch.full((len(tok),), 0.1 / (len(tok) - 3))
    for char, p in ((" ", 0.3), ("a", 0.5), ("b", 0.1)):
        probs[ids(tok, char)[0]] = p
    return FixedDistributionLM(probs.log())


def test_loglik_hand_computed_acc_vs_acc_norm(tok):
    model = fixed_lm(tok)
    # " aaaa": log .3 + 4 log .5 = -3.977 (per char -0.994); " b": log .3 + log .1 = -3.507
    requests = [([7, 8] + ids(tok, " aaaa"), 5), ([7, 8] + ids(tok, " b"), 2)]
    sums = loglikelihoods(model, requests, batch_size=4, pad_id=0)
    assert sums == pytest.approx([math.log(0.3) + 4 * math.log(0.5), math.log(0.3) + math.log(0.1)])
    cfg = TaskConfig(name="toy", family="arc")
    toy = MultipleChoiceExample("Q", ["aaaa", "b"], gold=0, instruction="")
    task = MultipleChoiceTask(cfg, tok, [], {"toy": [toy]})
    assert task.evaluate(model, batch_size=4) == {"acc": 0.0, "acc_norm": 1.0, "n": 1.0}
    flipped = MultipleChoiceTask(
        cfg, tok, [], {"toy": [MultipleChoiceExample("Q", ["aaaa", "b"], 1, "")]}
    )
    assert flipped.evaluate(model, batch_size=4) == {"acc": 1.0, "acc_norm": 0.0, "n": 1.0}


def test_acc_norm_divides_by_characters_not_tokens(tok):
    # "é" is one character but two byte tokens, so the two normalisations rank differently:
    # " é": log .2 + 2 log .25 = -4.38 (per character -4.38, per token -2.19 or -1.46 with
    # the space); " aa": log .2 + 2 log .2 = -4.83 (per character or token -2.41, -1.61).
    accented = ids(tok, "é")
    assert len(accented) == 2
    probs = torch.full((len(tok),), 0.1 / (len(tok) - 4))
    for token, p in (
        (ids(tok, " ")[0], 0.2),
        (ids(tok, "a")[0], 0.2),
        (accented[0], 0.25),
        (accented[1], 0.25),
    ):
        probs[token] = p
    model = FixedDistributionLM(probs.log())
    cfg = TaskConfig(name="toy", family="arc")
    for gold, expected in ((0, {"acc": 1.0, "acc_norm": 0.0}), (1, {"acc": 0.0, "acc_norm": 1.0})):
        example = MultipleChoiceExample("Q", ["é", "aa"], gold=gold, instruction="")
        task = MultipleChoiceTask(cfg, tok, [], {"toy": [example]})
        assert task.evaluate(model, batch_size=4) == {**expected, "n": 1.0}


def test_single_token_choices_share_one_forward(tok):
    model = fixed_lm(tok)
    example = MultipleChoiceExample("Topic:", ["a", "b", "c", "d", "e"], gold=0, instruction="")
    task = MultipleChoiceTask(TaskConfig(name="toy", family="arc"), tok, [], {"toy": [example]})
    assert task.evaluate(model, batch_size=8)["acc"] == 1.0
    assert model.rows_read == 1  # " a" ... " e" differ in their last byte only


def test_batched_loglik_matches_one_at_a_time_on_llama(tok):
    model = byte_llama()
    requests = [
        (ids(tok, context + cont), len(ids(tok, cont)))
        for context, cont in [
            ("Question: why?\nAnswer:", " because"),
            ("Hi", " there you go"),
            ("A much longer context sentence here.", " ok"),
        ]
    ]
    batched = loglikelihoods(model, requests, batch_size=3, pad_id=0)
    single = loglikelihoods(model, requests, batch_size=1, pad_id=0)
    assert batched == pytest.approx(single, abs=1e-4)
    # and against a direct computation for the second request
    seq, n = requests[1]
    with torch.no_grad():
        log_probs = model(torch.tensor([seq])).logits[0].log_softmax(-1)
    direct = sum(log_probs[t - 1, seq[t]].item() for t in range(len(seq) - n, len(seq)))
    assert batched[1] == pytest.approx(direct, abs=1e-4)


# ----------------------------------------------------------------------------- collate


def test_collate_masks_prompt_and_padding(tok):
    cfg = TaskConfig(name="toy", family="arc", max_length=64)
    task = Task(cfg, tok, [("Q: hi\nA:", " yes"), ("Question: x?\nAnswer:", " no")], "acc")
    batch = task.collate([0, 1])
    eos = tok.eos_token_id
    first = ids(tok, "Q: hi\nA: yes") + [eos]
    second = ids(tok, "Question: x?\nAnswer: no") + [eos]
    width = len(second)
    assert batch["input_ids"].tolist() == [first + [0] * (width - len(first)), second]
    assert batch["attention_mask"].tolist() == [
        [1] * len(first) + [0] * (width - len(first)),
        [1] * width,
    ]
    assert batch["labels"].tolist() == [
        [-100] * 8 + ids(tok, " yes") + [eos] + [-100] * (width - len(first)),
        [-100] * 20 + ids(tok, " no") + [eos],
    ]


def test_collate_truncates_prompt_from_the_left_and_moves_trailing_space(tok):
    eos = tok.eos_token_id
    pairs = [("0123456789:  ", "yes")]
    fits = Task(TaskConfig(name="toy", family="arc", max_length=12), tok, pairs, "acc").collate([0])
    # the answer "  yes" + EOS (the prompt's trailing spaces belong to it) is kept whole
    assert fits["input_ids"].tolist() == [ids(tok, "56789:  yes") + [eos]]
    assert fits["labels"].tolist() == [[-100] * 6 + ids(tok, "  yes") + [eos]]
    # an answer longer than half of max_length is cut from the right, the prompt keeps half
    cut = Task(TaskConfig(name="toy", family="arc", max_length=8), tok, pairs, "acc").collate([0])
    assert cut["input_ids"].tolist() == [ids(tok, "789:  ye")]
    assert cut["labels"].tolist() == [[-100] * 4 + ids(tok, "  ye")]


# ----------------------------------------------------------------------------- generation


def test_generate_protocol_extracts_answer_labels(tok):
    cfg = task_config(
        "arc_easy", protocol="generate", prompt_format="llm_adapters", max_new_tokens=64
    )
    task = build_task(cfg, tok, seed=0)
    golds = sorted(ex.gold_label for ex in task.eval_sets["arc_easy"])
    assert golds == ["answer2", "answer2", "answer3"]
    model = ScriptedGenerator(tok, "\n                the correct answer is answer2.")
    assert task.evaluate(model, batch_size=2) == {"acc": pytest.approx(2 / 3), "n": 3.0}


def test_generate_end_to_end_on_tiny_llama(tok):
    model = byte_llama()
    prompts = [
        ids(tok, "Question: 1+1?\nAnswer:"),
        ids(tok, "Hi"),
        ids(tok, "A longer prompt here"),
    ]
    batched = generate_greedy(model, prompts, batch_size=3, max_new_tokens=5, pad_id=0, eos_id=1)
    single = generate_greedy(model, prompts, batch_size=1, max_new_tokens=5, pad_id=0, eos_id=1)
    assert batched == single and all(0 < len(out) <= 5 for out in batched)

    cfg = task_config("obqa", protocol="generate", prompt_format="llm_adapters", max_new_tokens=4)
    task = build_task(cfg, tok, seed=0)
    model.train()
    model.model.layers[0].eval()
    metrics = task.evaluate(model, batch_size=2)
    assert metrics == {"acc": 0.0, "n": 3.0}  # a random model writes no "answerK"
    assert model.training and not model.model.layers[0].training  # modes restored


def test_metamath_gsm8k_from_local_files(tok, tmp_path):
    shutil.copy(TASK_FIXTURES / "metamathqa" / "train.jsonl", tmp_path / "train.jsonl")
    shutil.copy(TASK_FIXTURES / "gsm8k" / "test.jsonl", tmp_path / "test.jsonl")
    task = build_task(task_config("metamath_gsm8k", data_dir=str(tmp_path)), tok, seed=0)
    assert task.num_train_examples == 3 and task.main_metric == "acc"
    assert sorted(ex.gold for ex in task.eval_examples) == [6.5, 36.0, 72.0]
    prompt, target = task.train_pairs[0]
    assert prompt == alpaca_prompt(
        "If Mia picked 48 apples on Monday and half that number on Tuesday, how many apples did "
        "she pick altogether?"
    )
    assert target.endswith("The answer is: 72")
    model = ScriptedGenerator(tok, "\n                48 + 24 = 72 apples.\n#### 72")
    assert task.evaluate(model, batch_size=2) == {"acc": pytest.approx(1 / 3), "n": 3.0}


# ----------------------------------------------------------------------------- configs


def test_offline_without_data_dir_is_a_clear_error():
    with pytest.raises(
        ValueError,
        match=r"needs the Hub dataset allenai/ai2_arc \(ARC-Easy\), but HF_DATASETS_OFFLINE=1.*task.data_dir=",
    ):
        check_task_config(task_config("arc_easy", data_dir=None))
    with pytest.raises(ValueError, match="meta-math/MetaMathQA"):
        check_task_config(task_config("metamath_gsm8k"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"family": "nope"}, "unknown family 'nope'"),
        ({"protocol": "beam"}, "protocol 'beam' is not one of"),
        ({"prompt_format": "chat"}, "prompt_format 'chat'"),
        ({"protocol": "generate"}, "set task.prompt_format=llm_adapters"),
        ({"data_dir": "/nonexistent/dir"}, "does not exist"),
        ({"eval_split": "dev"}, "has no dev.jsonl"),
        ({"max_length": 0}, "max_length=0 must be a positive integer"),
    ],
)
def test_invalid_configs_raise_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        check_task_config(task_config("arc_easy", **overrides))
    assert "\n" not in str(error.value)


def test_every_config_has_the_contract_fields_and_checks():
    names = sorted(p.stem for p in TASK_CONF.glob("[!_]*.yaml"))  # _base.yaml: the shared fields
    assert set(QA_TASKS) | {"merged_qa", "metamath_gsm8k", "bbc_news", "arithmetic"} <= set(names)
    for name in names:
        cfg = group_option("task", name)
        assert set(cfg) >= CONTRACT_FIELDS, name
        if name in QA_TASKS or name in ("bbc_news", "arithmetic"):
            check_task_config(task_config(name))
    with pytest.raises(ValueError, match="scored by generating an answer"):
        check_task_config(task_config("arithmetic", protocol="loglik"))


def test_merged_qa_composes_trains_on_all_and_reports_each(tok):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(TASK_CONF.parent), version_base=None):
        cfg = compose(overrides=["+task=merged_qa", f"task.data_dir={TASK_FIXTURES}"]).task
    check_task_config(cfg)
    task = build_task(cfg, tok, seed=0)
    assert task.num_train_examples == 3 + 3 + 3 + 3 + 2 and task.main_metric == "acc"
    metrics = task.evaluate(byte_llama(), batch_size=16, max_examples=2)
    assert metrics["n"] == 10.0 and metrics["n/arc_challenge"] == 2.0
    per_task = [metrics[f"acc/{name}"] for name in QA_TASKS]
    assert metrics["acc"] == pytest.approx(sum(per_task) / 5)
    assert {f"acc_norm/{name}" for name in QA_TASKS} <= set(metrics)


# ----------------------------------------------------------------------------- offline tasks


def test_bbc_news_builds_and_evaluates(tok):
    task = build_task(task_config("bbc_news", max_eval_examples=None), tok, seed=0)
    (evals,) = task.eval_sets.values()
    dropped = (
        task.overlap["bbc_news"]["train_dropped"] + task.overlap["bbc_news"]["repeats_dropped"]
    )
    assert task.num_train_examples + len(evals) + dropped == 2225 and 150 < len(evals) < 300
    assert 0 < dropped < 30  # copies of eval articles kept out of training, repeats scored once
    assert evals[0].choices == ["business", "entertainment", "politics", "sports", "tech"]
    prompt, target = task.train_pairs[0]
    assert prompt == (  # business/001.txt trains under the content rule (by its body's hash)
        "Headline: Ad sales boost Time Warner profit\nArticle: Quarterly profits at US media giant "
        "TimeWarner jumped 76% to $1.13bn (£600m) for the three months\nTopic:"
    )
    assert target == " business"
    metrics = task.evaluate(byte_llama(), batch_size=16, max_examples=8)
    assert set(metrics) == {"acc", "acc_norm", "n"} and metrics["n"] == 8.0


def test_arithmetic_is_generated_deterministically(tok):
    cfg = task_config("arithmetic", max_train_examples=20, max_eval_examples=6)
    first, again, other = (build_task(cfg, tok, seed=s) for s in (0, 0, 1))
    assert first.train_pairs == again.train_pairs != other.train_pairs
    assert first.eval_examples == other.eval_examples and len(first.eval_examples) == 6
    eval_questions = {ex.question for ex in first.eval_examples}
    assert not eval_questions & {
        p.removeprefix("Question: ").removesuffix("\nAnswer:") for p, _ in first.train_pairs
    }
    prompt, target = first.train_pairs[0]
    assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:")
    assert re.fullmatch(r" #### -?\d+(\.\d+)?", target)
    assert all(ex.gold == float(ex.solution.removeprefix("#### ")) for ex in first.eval_examples)
    assert first.evaluate(byte_llama(), batch_size=4) == {"acc": 0.0, "n": 6.0}
