"""Train/eval overlap: the detector, the ``content`` split rule, the record a run writes and
the check users run (``python -m stablelora.contamination``), on small corpora made here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ROOT, SMOKE, compose_config, run_cli

from stablelora.config.groups import group_option
from stablelora.contamination import (
    CONTAMINATION_FILE,
    clean_splits,
    excluded_ids,
    matches,
    normalize,
    overlap_count,
    read_record,
)
from stablelora.tasks import task_splits
from stablelora.tasks.bbc_news import is_eval_body, is_eval_file
from stablelora.tasks.prompts import MultipleChoiceExample

pytestmark = pytest.mark.usefixtures("hub_offline")

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
]


def sentence(i: int, length: int = 12) -> str:
    """A text no other i shares any word 3-gram with (words drawn by i's digits)."""
    return " ".join(f"{WORDS[(i * 7 + k * 3) % len(WORDS)]}{i}w{k}" for k in range(length))


def mc(text: str, gold: int = 0) -> MultipleChoiceExample:
    return MultipleChoiceExample(query=text, choices=["yes", "no"], gold=gold, instruction=text)


def test_normalize_and_matches_find_exact_and_near_copies_only():
    assert normalize("  The CAT's  hat!\n") == "the cat s hat"
    base = sentence(1)
    reworded = base.replace(base.split()[-1], "changed")  # one word of twelve
    found = matches([base.upper() + "!!", reworded, sentence(2)], [base])
    assert found == [(0, 0, True), (1, 0, False)]
    assert matches([sentence(3)], [sentence(4)]) == []
    # A text sharing half its 3-grams is not a copy at the default threshold (0.6).
    half = " ".join(base.split()[:7] + sentence(5).split()[:5])
    assert matches([half], [base]) == []


def test_large_comparisons_are_cached_by_content_and_a_damaged_cache_is_recomputed(
    tmp_path, monkeypatch
):
    import stablelora.contamination as contamination

    monkeypatch.setenv("STABLELORA_CACHE", str(tmp_path))
    monkeypatch.setattr(contamination, "DISK_CACHE_MIN_CHARS", 1)
    monkeypatch.setattr(contamination, "_matches_seen", {})
    base = sentence(1)
    queries, references = [base.upper(), base.replace(base.split()[-1], "x"), sentence(2)], [base]
    expected = [(0, 0, True), (1, 0, False)]
    assert matches(queries, references) == expected
    (cached,) = (tmp_path / "overlap").glob("*.json")
    assert json.loads(cached.read_text()) == [list(row) for row in expected]
    # a new process reads the file; a torn file is computed again and rewritten
    monkeypatch.setattr(contamination, "_matches_seen", {})
    cached.write_text("[[0, 0, tr")
    assert matches(queries, references) == expected
    assert json.loads(cached.read_text()) == [list(row) for row in expected]
    # another threshold or another rule version is another comparison, never the cached one
    assert matches(queries, references, threshold=0.95) == [(0, 0, True)]
    monkeypatch.setattr(contamination, "MATCH_RULE_VERSION", 2)
    monkeypatch.setattr(contamination, "_matches_seen", {})
    cached.write_text(json.dumps([[2, 0, True]]))  # a stale answer of the old rule
    assert matches(queries, references) == expected
    assert len(list((tmp_path / "overlap").glob("*.json"))) == 3


def test_clean_splits_keeps_every_held_out_item_out_of_training():
    test = [mc(sentence(i)) for i in range(10)] + [mc(sentence(3))]  # a repeat of item 3
    validation = [mc(sentence(i)) for i in range(20, 25)] + [mc(sentence(4))]  # copy of a test item
    train = [mc(sentence(i)) for i in range(40, 60)] + [mc(sentence(2)), mc(sentence(21))]
    new_train, evals, held, counts = clean_splits(
        list(train), list(test), list(validation), eval_is_validation=False
    )
    assert len(evals) == 10 and len(held) == 5 and len(new_train) == 20
    assert counts == {"train_dropped": 2, "repeats_dropped": 1, "held_out_dropped": 1}
    # Scoring validation instead trains on exactly the same examples.
    same_train, val_evals, _, _ = clean_splits(
        list(train), list(validation), list(test), eval_is_validation=True
    )
    assert same_train == new_train and len(val_evals) == 5


def arc_row(i: int, question: str | None = None, row_id: str | None = None) -> dict:
    return {
        "id": row_id or f"Q{i}",
        "question": question or sentence(i),
        "choices": {"text": [f"right{i}", f"wrong{i}"], "label": ["A", "B"]},
        "answerKey": "A",
    }


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def arc_copy(tmp_path) -> Path:
    """An ARC-like dataset whose train split holds a test question under another id and a
    reworded copy of another test question."""
    folder = tmp_path / "arc"
    test = [arc_row(1000 + i) for i in range(30)]
    reworded = sentence(1001).replace(sentence(1001).split()[0], "Which")
    train = [arc_row(i) for i in range(300)]
    train += [arc_row(1000, row_id="other-id"), arc_row(1001, question=reworded)]
    write_rows(folder / "train.jsonl", train)
    write_rows(folder / "test.jsonl", test)
    return folder


@pytest.mark.parametrize("rule", ["legacy", "content"])
def test_arc_split_rules_record_or_remove_copies_of_test_items(arc_copy, rule):
    task = {**group_option("task", "arc_easy"), "data_dir": str(arc_copy), "split_rule": rule}
    split = task_splits(task, seed=0)["arc_easy"]
    entry = split.overlap
    assert entry["eval_items"] == 30
    if rule == "legacy":
        assert (len(entry["in_train"]["exact"]), len(entry["in_train"]["near"])) == (1, 1)
        assert len(split.train) == 302
        assert len(excluded_ids({"tasks": {"arc_easy": entry}})["arc_easy"]) == 2
    else:
        assert overlap_count(entry) == 0 and entry["train_dropped"] == 2
        assert len(split.train) == 300


def write_article(root: Path, topic: str, name: str, headline: str, body: str) -> None:
    (root / topic).mkdir(parents=True, exist_ok=True)
    (root / topic / name).write_text(f"{headline}\n{body}\n")


def names_split_by_file(topic: str, count: int) -> list[str]:
    """File names of which the legacy rule puts the first in eval and the others in train."""
    evals = [f"{i:03d}.txt" for i in range(1000) if is_eval_file(topic, f"{i:03d}.txt")]
    trains = [f"{i:03d}.txt" for i in range(1000) if not is_eval_file(topic, f"{i:03d}.txt")]
    return [evals[0], *trains[: count - 1]]


@pytest.fixture
def bbc_copy(tmp_path) -> Path:
    """A BBC-like corpus: two topics of 60 articles, one article filed twice (under two names
    the legacy rule splits apart) and one re-filed with a word changed."""
    root = tmp_path / "bbc"
    for t, topic in enumerate(("business", "sport")):
        for i in range(60):
            write_article(
                root, topic, f"{i + 100:03d}.txt", f"Headline {t} {i}", sentence(t * 100 + i, 40)
            )
    body = sentence(999, 40)
    copy_names = names_split_by_file("business", 3)
    write_article(root, "business", copy_names[0], "Copied story", body)
    write_article(root, "business", copy_names[1], "Same story, new headline", body)
    edited = body.replace(body.split()[5], "edited")
    write_article(root, "business", copy_names[2], "Copied story", edited)
    return root


def test_bbc_content_rule_puts_copies_of_an_article_on_one_side(bbc_copy):
    base = {**group_option("task", "bbc_news"), "data_dir": str(bbc_copy)}
    legacy = task_splits({**base, "split_rule": "legacy"}, seed=0)["bbc_news"].overlap
    assert overlap_count(legacy) == 1  # the eval copy, with an exact and a near copy in train
    assert len(legacy["in_train"]["exact"]) == 1
    content = task_splits(base, seed=0)["bbc_news"]
    assert content.overlap["eval_split"] == "test"
    assert overlap_count(content.overlap) == 0
    evals = {normalize(ex.content) for ex in content.evals}
    trains = {normalize(ex.content) for ex in content.train}
    body = normalize(sentence(999, 40))
    assert (body in evals) == is_eval_body(sentence(999, 40)) != (body in trains)


def test_a_run_writes_its_record_and_the_check_reads_it_back(tmp_path):
    from stablelora.runner.train import train

    cfg = compose_config(SMOKE)
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    record = read_record(run_dir)
    assert record["split_rule"] == "content"
    assert all(overlap_count(entry) == 0 for entry in record["tasks"].values())
    # The check recomputes the same record from the run's config.yaml.
    result = run_cli("-m", "stablelora.contamination", "--run", str(run_dir), "--ids")
    assert result.returncode == 0, result.stderr
    assert "split rule content" in result.stdout and "bbc_news: -" in result.stdout


def test_check_cli_on_overrides_and_its_one_line_errors(arc_copy, tmp_path):
    result = run_cli(
        "-m",
        "stablelora.contamination",
        "task=arc_easy",
        f"task.data_dir={arc_copy}",
        "task.split_rule=legacy",
    )
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("| arc_easy"))
    assert "| 1 / 1 |" in row
    bad = run_cli(
        "-m",
        "stablelora.contamination",
        "task=arc_easy",
        "task.split_rule=nope",
        f"task.data_dir={arc_copy}",
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "split_rule" in bad.stderr
    # Writing a record for a run recorded before the key: it reads as legacy.
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    task = {**group_option("task", "arc_easy"), "data_dir": str(arc_copy)}
    task.pop("split_rule")
    (run_dir / "config.yaml").write_text(json.dumps({"seed": 0, "task": task}))
    wrote = run_cli("-m", "stablelora.contamination", "--run", str(run_dir), "--write")
    assert wrote.returncode == 0, wrote.stderr
    record = json.loads((run_dir / CONTAMINATION_FILE).read_text())
    assert record["split_rule"] == "legacy" and overlap_count(record["tasks"]["arc_easy"]) == 2


def test_committed_tuned_study_records_name_the_old_rules_overlap():
    """The committed tuned study's runs ran under the legacy rule: their records list the
    overlapping test items the analysis leaves out of the clean subset."""
    records = sorted((ROOT / "results/cpu/cpu_tuned_final/runs").glob(f"*/{CONTAMINATION_FILE}"))
    assert len(records) == 12
    for path in records:
        record = json.loads(path.read_text())
        assert record["split_rule"] == "legacy"
        assert overlap_count(record["tasks"]["bbc_news"]) == 25


def test_the_corpus_is_read_once_per_process_and_again_when_a_file_changes(bbc_copy):
    from stablelora.tasks.bbc_news import read_corpus, topic_dirs

    base = {**group_option("task", "bbc_news"), "data_dir": str(bbc_copy)}
    first = task_splits(base, seed=0)["bbc_news"]
    articles = read_corpus(topic_dirs(bbc_copy))
    assert read_corpus(topic_dirs(bbc_copy)) is articles  # a sweep's next job reads nothing
    assert len(articles) == 123 and all(a.eval_by_body == is_eval_body(a.body) for a in articles)
    # an article rewritten (another size) is read again, and its split follows its new body
    moved = next(a for a in articles if not a.eval_by_body and a.topic == "sport")
    new_body = next(
        sentence(5000 + i, 41) for i in range(1000) if is_eval_body(sentence(5000 + i, 41))
    )
    write_article(bbc_copy, "sport", moved.file, moved.headline, new_body)
    assert read_corpus(topic_dirs(bbc_copy)) is not articles
    second = task_splits(base, seed=0)["bbc_news"]
    assert len(second.evals) == len(first.evals) + 1
    assert normalize(new_body) in {normalize(ex.content) for ex in second.evals}
