"""The dialogue tasks (chatterbot offline, WizardLM from local files): loading and the fixed
held-out split, the reply-only label mask with a chat template (and the plain fallback), the
token-weighted loss and perplexity by hand, ROUGE-L on known strings, the strict checks, and
one tiny run through the runner."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import compose_config
from tiny import byte_llama, byte_tokenizer

from stablelora.config.check import check_config
from stablelora.config.errors import ConfigError
from stablelora.config.groups import group_option
from stablelora.tasks import build_task, check_task_config
from stablelora.tasks.data import TaskConfig
from stablelora.tasks.dialogue import (
    DialogueExample,
    DialogueTask,
    is_held_out,
    normalise,
    rouge_l,
)
from stablelora.tasks.scoring import label_nll

IGNORE = -100
#: A chat template for the byte tokenizer: every byte is a token, so the expected ids are
#: easy to write down.
BYTE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


pytestmark = pytest.mark.usefixtures("hub_offline")  # conftest: no test reaches the Hub


@pytest.fixture(scope="module")
def chat_tok():
    """The byte tokenizer with :data:`BYTE_TEMPLATE` (a copy: the shared one has none)."""
    import copy

    tokenizer = copy.deepcopy(byte_tokenizer())
    tokenizer.chat_template = BYTE_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def smollm2_tok():
    from stablelora.models import load_tokenizer

    return load_tokenizer("smollm2")


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def chatterbot(**overrides) -> dict:
    return {**group_option("task", "chatterbot"), **overrides}


def wizardlm(data_dir: Path | None, **overrides) -> dict:
    cfg = group_option("task", "wizardlm")
    cfg["data_dir"] = None if data_dir is None else str(data_dir)
    return {**cfg, **overrides}


# ----------------------------------------------------------------------------- loading
def test_chatterbot_loads_with_a_split_fixed_by_hash_for_every_seed(tok):
    cfg = chatterbot(chat_format="plain", max_eval_examples=None, max_train_examples=300)
    tasks = [build_task(cfg, tok, seed=seed) for seed in (0, 1, 2)]
    evals = [task.eval_examples for task in tasks]
    assert evals[0] == evals[1] == evals[2] and 50 < len(evals[0]) < 150
    assert all(task.num_train_examples == 300 for task in tasks)
    assert tasks[0].train_examples != tasks[1].train_examples  # the seed picks the subsample
    # Every example of the corpus, train or held out; no conversation or opening on both sides.
    whole = build_task({**cfg, "max_train_examples": None}, tok, seed=0)
    train, held_out = whole.train_examples, whole.eval_examples
    assert 800 < len(train) < 1100 and len(held_out) == len(evals[0])
    train_groups = {normalise(ex.group) for ex in train}
    eval_groups = {normalise(ex.group) for ex in held_out}
    assert not train_groups & eval_groups
    assert 0.05 < len(eval_groups) / (len(eval_groups) + len(train_groups)) < 0.15
    # The split is md5(normalised opening) mod 100 < eval_percent: by hand for one opening.
    import hashlib

    opening = "Hi, How is it going?"
    digest = int(hashlib.md5(b"hi, how is it going?").hexdigest(), 16) % 100
    assert is_held_out(opening, 10) == (digest < 10) == is_held_out("  hi,  HOW is it going? ", 10)
    assert {ex.group for ex in train + held_out if normalise(ex.group) == normalise(opening)}
    # Multi-turn: every assistant turn is an example with the turns before it.
    turns = ("Hello", "Hi", "How are you doing?", "I am doing well.")
    examples = [ex for ex in train + held_out if ex.history[:1] == ("Hello",)]
    assert DialogueExample(turns[:3], turns[3], "Hello") in examples
    # The tech-support file repeats 10 conversations 1,050 times: each is kept once.
    printer = [ex for ex in train + held_out if ex.history == ("My printer is not printing.",)]
    assert len(printer) == 1


def test_chatterbot_languages_and_categories_select_files(tok):
    cfg = chatterbot(chat_format="plain", categories=["greetings"], eval_percent=50)
    task = build_task(cfg, tok, seed=0)
    everything = task.train_examples + task.eval_examples
    assert 10 < len(everything) < 40
    assert all(not is_held_out(ex.group, 50) for ex in task.train_examples)
    assert all(is_held_out(ex.group, 50) for ex in task.eval_examples)


def write_wizardlm(folder: Path) -> Path:
    rows = [
        {"instruction": f"Write a haiku about the number {i}.", "output": f"Number {i} ..."}
        for i in range(40)
    ]
    rows += [
        {"instruction": "Write a haiku about the number 3.", "output": "Another answer."},
        {"instruction": "Empty reply", "output": ""},
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_wizardlm_reads_local_files_in_the_hub_schema(tok, tmp_path):
    cfg = wizardlm(write_wizardlm(tmp_path), chat_format="plain", eval_percent=30)
    check_task_config(cfg)
    task = build_task(cfg, tok, seed=0)
    everything = task.train_examples + task.eval_examples
    assert len(everything) == 41  # the empty reply is skipped
    assert 0 < len(task.eval_examples) < 41
    assert build_task(cfg, tok, seed=5).eval_examples == task.eval_examples
    # the two rows with the same instruction are on the same side
    threes = [ex for ex in everything if ex.history == ("Write a haiku about the number 3.",)]
    assert len(threes) == 2 and len({ex in task.eval_examples for ex in threes}) == 1
    assert task.main_metric == "loss" and task.greater_is_better is False


# ----------------------------------------------------------------------------- encoding
def test_reply_tokens_only_are_trained_on_with_the_chat_template(chat_tok):
    cfg = TaskConfig(name="toy", family="chatterbot", max_length=256)
    history, reply = ("hi", "hello", "how are you?"), "fine"
    task = DialogueTask(cfg, chat_tok, [DialogueExample(history, reply, "hi")], [])
    batch = task.collate([0])
    eos = chat_tok.eos_token_id
    prompt = ids(chat_tok, "user: hi") + [eos] + ids(chat_tok, "assistant: hello") + [eos]
    prompt += ids(chat_tok, "user: how are you?") + [eos] + ids(chat_tok, "assistant: ")
    assert batch["input_ids"].tolist() == [prompt + ids(chat_tok, "fine") + [eos]]
    # the earlier assistant turn ("hello") is context: only the reply and its EOS are labels
    assert batch["labels"].tolist() == [[IGNORE] * len(prompt) + ids(chat_tok, "fine") + [eos]]
    # generation starts from the same prompt
    assert task.encoder.prompt(history, 256) == prompt


def test_long_histories_drop_their_oldest_exchange_first(chat_tok):
    cfg = TaskConfig(name="toy", family="chatterbot", max_length=40)
    history = ("a" * 12, "b" * 12, "question?")
    task = DialogueTask(cfg, chat_tok, [DialogueExample(history, "yes", "a")], [])
    input_ids, labels = task.encode(task.train_examples[0])
    eos = chat_tok.eos_token_id
    kept = ids(chat_tok, "user: question?") + [eos] + ids(chat_tok, "assistant: ")
    assert input_ids == kept + ids(chat_tok, "yes") + [eos] and len(input_ids) <= 40
    assert labels == [IGNORE] * len(kept) + ids(chat_tok, "yes") + [eos]


def test_smollm2_chat_template_masks_everything_but_the_reply(smollm2_tok):
    cfg = TaskConfig(name="toy", family="chatterbot", max_length=128)
    example = DialogueExample(("Hello", "Hi", "How are you doing?"), "I am doing well.", "Hello")
    task = DialogueTask(cfg, smollm2_tok, [example], [])
    input_ids, labels = task.encode(example)
    trained = [t for t, label in zip(input_ids, labels) if label != IGNORE]
    assert trained == input_ids[-len(trained) :]  # one block at the end
    assert smollm2_tok.decode(trained) == "I am doing well.<|im_end|>"
    context = smollm2_tok.decode(input_ids[: -len(trained)])
    assert context.endswith("<|im_start|>assistant\n") and "<|im_start|>system" in context
    assert context.count("<|im_start|>assistant") == 2  # "Hi" is a context turn
    assert task.encoder.prompt(example.history, 128) == input_ids[: -len(trained)]


def test_plain_fallback_without_a_chat_template(tok):
    cfg = TaskConfig(name="toy", family="chatterbot", max_length=256)
    with pytest.raises(ConfigError, match=r"has none: .*task\.chat_format=plain") as error:
        DialogueTask(cfg, tok, [], [])
    assert "\n" not in str(error.value)
    plain = TaskConfig(
        name="toy", family="chatterbot", max_length=256, options={"chat_format": "plain"}
    )
    task = DialogueTask(plain, tok, [DialogueExample(("hi", "yo", "ok?"), "sure", "hi")], [])
    input_ids, labels = task.encode(task.train_examples[0])
    eos = tok.eos_token_id
    prompt = ids(tok, "User: hi\nAssistant: yo\nUser: ok?\nAssistant:")
    assert input_ids == prompt + ids(tok, " sure") + [eos]
    assert labels == [IGNORE] * len(prompt) + ids(tok, " sure") + [eos]


# ----------------------------------------------------------------------------- metrics
class FixedLM(torch.nn.Module):
    """Next-token probabilities independent of the context; ``generate`` writes ``answer``."""

    def __init__(self, tok, probs: dict[int, float], answer: str = ""):
        super().__init__()
        rest = (1 - sum(probs.values())) / (len(tok) - len(probs))
        table = torch.full((len(tok),), rest)
        for token, p in probs.items():
            table[token] = p
        self.log_probs = torch.nn.Parameter(table.log(), requires_grad=False)
        self.answer_ids = ids(tok, answer) + [tok.eos_token_id]

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.log_probs.expand(*input_ids.shape, -1))

    def generate(self, input_ids, attention_mask, generation_config):
        assert not generation_config.do_sample and generation_config.num_beams == 1
        new = torch.tensor(self.answer_ids[: generation_config.max_new_tokens])
        return torch.cat([input_ids, new.expand(input_ids.shape[0], -1)], dim=1)


def test_loss_is_token_weighted_and_perplexity_its_exp(tok):
    a, b, eos = ids(tok, "a")[0], ids(tok, "b")[0], tok.eos_token_id
    model = FixedLM(tok, {a: 1 / 2, b: 1 / 4, eos: 1 / 8})
    encoded = [
        ([7, 8, a], [IGNORE, IGNORE, a]),  # one reply token: -log 1/2 = ln 2
        ([7, b, b, eos], [IGNORE, b, b, eos]),  # three: 2 ln 4 + ln 8 = 7 ln 2
    ]
    for batch_size in (1, 2):
        total, count = label_nll(model, encoded, batch_size=batch_size, pad_id=0)
        assert total == pytest.approx(8 * math.log(2)) and count == 4
    # token-weighted: 8 ln 2 / 4 = 2 ln 2, so ppl = 4 (the mean of the per-example means,
    # (ln 2 + 7/3 ln 2) / 2, would give 2^(5/3) = 3.17)
    plain = TaskConfig(
        name="toy",
        family="chatterbot",
        max_length=64,
        max_new_tokens=16,
        options={"chat_format": "plain"},
    )
    examples = [
        DialogueExample(("q",), "a", "q"),  # reply tokens " ", "a", EOS
        DialogueExample(("r",), "abba", "r"),  # " ", "a", "b", "b", "a", EOS
    ]
    model = FixedLM(tok, {a: 1 / 2, b: 1 / 4, eos: 1 / 8, ids(tok, " ")[0]: 1 / 16}, "the a")
    metrics = DialogueTask(plain, tok, [], examples).evaluate(model, batch_size=2)
    # nats: 2 spaces (ln 16), 3 "a" (ln 2), 2 "b" (ln 4), 2 EOS (ln 8) over 9 tokens
    loss = (2 * 4 + 3 * 1 + 2 * 2 + 2 * 3) * math.log(2) / 9
    assert metrics["loss"] == pytest.approx(loss) and metrics["tokens"] == 9
    assert metrics["ppl"] == pytest.approx(math.exp(loss)) == pytest.approx(2 ** (21 / 9))
    # ROUGE-L F1 of "the a": against "a" P=1/2, R=1 -> 2/3; against "abba" 0
    assert metrics["rougeL"] == pytest.approx((2 / 3 + 0) / 2) and metrics["n"] == 2


def test_rouge_l_on_known_strings():
    scores = rouge_l(
        ["the cat sat", "running dogs", "Hello, World!", "", "a b c d"],
        ["the cat sat on the mat", "run dog", "hello world", "something", "a x c y d"],
    )
    # LCS 3 of 3 and 6 tokens: P 1, R 1/2 -> F1 2/3; stems match; case and punctuation are
    # ignored; nothing generated is 0; LCS (a, c, d) of 4 and 5: 2 * 3/4 * 3/5 / (27/20)
    assert scores == pytest.approx([2 / 3, 1.0, 1.0, 0.0, 2 / 3])


# ----------------------------------------------------------------------------- checks
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_words": 3}, r"unknown option\(s\) max_words .*takes categories, chat_format"),
        ({"chat_format": "chatml"}, "chat_format 'chatml' is not one of"),
        ({"main_metric": "acc"}, "main_metric 'acc' is not one of"),
        ({"eval_percent": 100}, "eval_percent=100 must be an integer in 1..99"),
        ({"protocol": "loglik"}, "set task.protocol=generate"),
        (
            {"languages": ["klingon"]},
            r"no klingon/\*\.yml .*set task.languages to some of .*english",
        ),
        ({"categories": ["gossip", "nope"]}, "english has no categories nope"),
        ({"data_dir": "/nonexistent/corpus"}, "is not a folder: set task.data_dir"),
    ],
)
def test_chatterbot_bad_options_and_missing_data_are_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        check_task_config(chatterbot(**overrides))
    assert "\n" not in str(error.value)


def test_wizardlm_missing_data_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"WizardLM_evol_instruct_70k, but HF_DATASETS_OFFLINE"):
        check_task_config(wizardlm(None))
    with pytest.raises(
        ValueError, match=r"has no train.jsonl.*add the train split of WizardLMTeam"
    ):
        check_task_config(wizardlm(tmp_path))


def saved_tokenizer_without_template(folder: Path) -> Path:
    byte_tokenizer().save_pretrained(folder)
    assert not (folder / "chat_template.jinja").exists()
    return folder


def test_a_model_without_chat_template_stops_before_the_model_loads(tmp_path, monkeypatch):
    import stablelora.models

    folder = saved_tokenizer_without_template(tmp_path / "tokenizer")
    overrides = [
        "experiment=dialogue",
        "scale=smoke",
        "task=chatterbot",  # the smoke sweep's task (its jobs set it)
        f"model.tokenizer={folder}",
        f"output_root={tmp_path / 'out'}",
    ]
    with pytest.raises(ConfigError, match=r"model=tiny_llama's tokenizer has none") as error:
        check_config(compose_config(overrides))
    assert "\n" not in str(error.value) and "task.chat_format=plain" in str(error.value)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(stablelora.models, "load_model", no_loading)
    from stablelora.runner.train import train

    with pytest.raises(ConfigError, match="has no chat template|has none"):
        train(compose_config(overrides), tmp_path / "run")
    check_config(compose_config([*overrides, "task.chat_format=plain"]))  # the fallback
    # the smoke preset's tokenizer (SmolLM2's) has one
    check_config(compose_config(["experiment=dialogue", "scale=smoke", "task=chatterbot"]))


def test_unknown_task_key_is_one_line_before_anything_loads():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) max_words"):
        check_config(compose_config(["task=chatterbot", "+task.max_words=3"]))


# ----------------------------------------------------------------------------- end to end
def test_tiny_run_through_the_runner(tmp_path):
    from stablelora.records.rows import read_jsonl
    from stablelora.runner.train import train

    overrides = ["experiment=dialogue", "scale=smoke", "task=chatterbot", "trainer.eval_every=2"]
    summary = train(compose_config(overrides), tmp_path)
    assert summary["status"] == "completed" and summary["main_metric"] == "eval/loss"
    final = summary["final"]
    assert {"eval/loss", "eval/ppl", "eval/rougeL", "eval/tokens", "eval/n"} <= set(final)
    assert final["eval/n"] == 8 and final["eval/tokens"] > 8
    assert final["eval/ppl"] == pytest.approx(math.exp(final["eval/loss"]))
    assert 0 <= final["eval/rougeL"] <= 1
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    evals = {row["step"]: row for row in rows if "eval/loss" in row}
    assert sorted(evals) == [0, 2, 4] and "eval/rougeL" in evals[0]
    # the best evaluation after step 0 is the lowest loss (lower is better)
    best = min((2, 4), key=lambda step: evals[step]["eval/loss"])
    assert summary["best"]["step"] == best
    assert summary["best"]["eval/loss"] == evals[best]["eval/loss"]


def test_byte_llama_scores_a_held_out_split(chat_tok):
    """The real forward and generate path of a (random) Llama, batched as one would be."""
    cfg = chatterbot(max_eval_examples=5, max_train_examples=8, max_new_tokens=4)
    task = build_task(cfg, chat_tok, seed=0)
    model = byte_llama()
    one = task.evaluate(model, batch_size=1)
    five = task.evaluate(model, batch_size=5)
    assert one["n"] == five["n"] == 5 and one["tokens"] == five["tokens"]
    assert one["loss"] == pytest.approx(five["loss"], rel=1e-4)
    assert one["loss"] == pytest.approx(math.log(one["ppl"]))
