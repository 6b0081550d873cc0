"""Train/eval overlap of a run's data: the split rule that prevents it, the check that
measures it, the record a run writes, and the reader the analysis uses.

Two items *overlap* when their normalised texts (:func:`normalize`: NFKC, case-folded,
punctuation dropped, whitespace collapsed) are equal (*exact*) or when the Jaccard similarity
of their word 3-gram sets is at least :data:`NEAR_THRESHOLD` (*near*: the same question
reworded by a word or two, the same article re-filed with a typo fixed). The text of an item
is :func:`overlap_text`: a multiple-choice question with its gold answer, a maths question, or
the item's own ``content`` (BBC News: the article body, whatever its headline). All pairs are
compared exactly (a sparse shingle matrix product, scipy), no hashing approximation.

Split rules (``task.split_rule``; a recorded config without the key ran under ``legacy``):

- ``legacy``: the rules of the runs before it: BBC News split by a hash of the file name,
  validation slices carved by a hash of the whole row (its id included), eval splits scored
  with their repeats, nothing removed from training.
- ``content``: splits made on normalised content, so a text and its copies land on one side:
  repeats within an eval split are scored once, validation items that overlap the test split
  leave the validation slice, and training items that overlap any held-out item (the scored
  split and, where one exists, the other held-out split) leave training
  (:func:`clean_splits`). The check then finds no overlap by construction, and says so.

A run writes ``contamination.json`` beside its other records (:func:`write_record`): for each
(sub)task, the ids (:func:`stablelora.records.examples.example_id`, as in ``examples.parquet``)
of the eval items that overlap its training data or its validation slice, exactly or as near
duplicates, and the repeats of an item within the eval split. The analysis scores the *clean
subset* of an eval split, every item minus :func:`excluded_ids`, beside the full split.

Format (``version`` 1)::

    {"version": 1, "split_rule": "content" | "legacy",
     "near_threshold": 0.6, "shingle_words": 3,
     "tasks": {"<eval set>": {
         "eval_split": "test", "eval_items": 218,
         "held_out_split": "validation" | "test" | null,
         "in_train": {"exact": [ids], "near": [ids]},
         "in_held_out": {"exact": [ids], "near": [ids]},
         "repeats": [ids],              # later copies of an item within the eval split
         "repeats_dropped": 0,          # such copies removed from the eval split (content)
         "train_dropped": 0,            # training items removed as copies of held-out items
         "held_out_dropped": 0}}}       # validation items removed as copies of test items
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stablelora.records.atomic import fsync_replace
from stablelora.records.examples import example_id, unique_ids

CONTAMINATION_FILE = "contamination.json"
VERSION = 1
CONTENT, LEGACY = "content", "legacy"
SPLIT_RULES = (CONTENT, LEGACY)
#: Jaccard similarity of word 3-gram sets from which two texts are near duplicates. Over the
#: ARC and BBC News splits, pairs at 0.6-0.9 are rewordings of one question or one article
#: re-filed with small edits; different articles on one story score about 0.5 and below.
NEAR_THRESHOLD = 0.6
SHINGLE_WORDS = 3
_NON_WORD = re.compile(r"[^\w\s]+")
#: Part of the key of cached comparisons (:func:`matches`): bump it when :func:`normalize` or
#: the shingling changes, so that no cached answer of the old comparison is read.
MATCH_RULE_VERSION = 1
#: Comparisons of at least this many characters are cached on disk (``<cache>/overlap/``):
#: every run of a task compares the same splits (BBC News: ~1.5 s of CPU per run otherwise).
DISK_CACHE_MIN_CHARS = 200_000
_matches_seen: dict[str, list[tuple[int, int, bool]]] = {}


@dataclass
class SplitExamples:
    """One dataset's examples as a run uses them: ``train``, the scored ``evals``, the other
    held-out split kept out of training (``held_out``, None when there is none) and the
    eval split's overlap record (:func:`overlap_entry`)."""

    train: list
    evals: list
    held_out: list | None
    overlap: dict[str, Any]


def normalize(text: str) -> str:
    """NFKC, case-folded, punctuation replaced by spaces, whitespace collapsed."""
    text = _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(text.split())


def overlap_text(example: Any) -> str:
    """The text two items are compared by: ``example.content`` when set (BBC News: the
    article body), else a multiple-choice query with its gold choice, or a maths question."""
    content = getattr(example, "content", "")
    if content:
        return content
    if hasattr(example, "choices"):
        return f"{example.query} {example.choices[example.gold]}"
    return str(example.question)


def item_ids(examples: Sequence[Any]) -> list[str]:
    """The ids the per-example records give these eval items, in order (repeats suffixed)."""
    if examples and not hasattr(examples[0], "choices"):
        return unique_ids([example_id(ex.question, ex.gold) for ex in examples])
    return unique_ids([example_id(ex.query, ex.choices, ex.gold) for ex in examples])


def _shingle_sets(texts: Sequence[str], vocabulary: dict[str, int]) -> list[set[int]]:
    """Each normalised text's set of word n-grams, as indices into ``vocabulary`` (grown)."""
    sets = []
    for text in texts:
        words = text.split()
        grams = (
            " ".join(words[i : i + SHINGLE_WORDS])
            for i in range(max(1, len(words) - SHINGLE_WORDS + 1))
        )
        sets.append({vocabulary.setdefault(gram, len(vocabulary)) for gram in grams})
    return sets


def _binary_matrix(sets: list[set[int]], width: int):
    """A (len(sets) x width) CSR matrix with a 1 at each (row, member)."""
    import numpy as np
    import scipy.sparse as sparse

    rows = [row for row, members in enumerate(sets) for _ in members]
    cols = [col for members in sets for col in members]
    return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(sets), width))


def matches(
    queries: Sequence[str], references: Sequence[str], *, threshold: float = NEAR_THRESHOLD
) -> list[tuple[int, int, bool]]:
    """Every (query index, reference index, exact) pair of raw texts that overlap: equal
    after :func:`normalize` (exact) or with word 3-gram Jaccard >= ``threshold`` (near).
    Answers are kept by a hash of the texts and the rule, in the process and, for large
    comparisons, in ``<cache>/overlap/`` (a damaged file is recomputed)."""
    if not queries or not references:
        return []
    digest = hashlib.sha256(
        json.dumps([MATCH_RULE_VERSION, SHINGLE_WORDS, threshold, queries, references]).encode()
    ).hexdigest()
    if digest in _matches_seen:
        return list(_matches_seen[digest])
    size = sum(map(len, queries)) + sum(map(len, references))
    path = _overlap_cache() / f"{digest}.json" if size >= DISK_CACHE_MIN_CHARS else None
    found = _read_matches(path) if path is not None else None
    if found is None:
        found = _compute_matches(queries, references, threshold)
        if path is not None:
            _write_matches(path, found)
    _matches_seen[digest] = found
    return list(found)


def _overlap_cache() -> Path:
    from stablelora.offline import cache_dir

    return cache_dir() / "overlap"


def _read_matches(path: Path) -> list[tuple[int, int, bool]] | None:
    try:
        rows = json.loads(path.read_text())
        return [(int(i), int(j), bool(exact)) for i, j, exact in rows]
    except (OSError, ValueError, TypeError):  # absent, torn or foreign: compute it again
        return None


def _write_matches(path: Path, found: list[tuple[int, int, bool]]) -> None:
    try:  # a cache: a folder that cannot be written costs the recomputation, nothing else
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(found))
        os.replace(tmp, path)
    except OSError:
        pass


def _compute_matches(
    queries: Sequence[str], references: Sequence[str], threshold: float
) -> list[tuple[int, int, bool]]:
    query_norm = [normalize(t) for t in queries]
    reference_norm = [normalize(t) for t in references]
    vocabulary: dict[str, int] = {}
    query_sets = _shingle_sets(query_norm, vocabulary)
    reference_sets = _shingle_sets(reference_norm, vocabulary)
    q = _binary_matrix(query_sets, len(vocabulary))
    r = _binary_matrix(reference_sets, len(vocabulary))
    shared = (q @ r.T).tocoo()
    q_sizes, r_sizes = q.getnnz(axis=1), r.getnnz(axis=1)
    jaccard = shared.data / (q_sizes[shared.row] + r_sizes[shared.col] - shared.data)
    found = []
    for i, j, similarity in zip(shared.row.tolist(), shared.col.tolist(), jaccard.tolist()):
        exact = query_norm[i] == reference_norm[j]
        if exact or similarity >= threshold:
            found.append((i, j, exact))
    return sorted(found)


def overlapping(queries: Sequence[Any], references: Sequence[Any]) -> dict[int, bool]:
    """Query position -> exact (True) or near (False), for the items that overlap any
    reference item (an exact match wins over a near one)."""
    found: dict[int, bool] = {}
    texts = [overlap_text(ex) for ex in references]
    for i, _, exact in matches([overlap_text(ex) for ex in queries], texts):
        found[i] = found.get(i, False) or exact
    return found


def repeats(examples: Sequence[Any]) -> list[int]:
    """Positions of items that overlap an earlier item of the same list."""
    texts = [overlap_text(ex) for ex in examples]
    return sorted({i for i, j, _ in matches(texts, texts) if j < i})


def clean_splits(
    train: list, evals: list, held_out: list | None, *, eval_is_validation: bool
) -> tuple[list, list, list | None, dict[str, int]]:
    """The ``content`` rule on examples: (train, evals, held_out, counts).

    ``evals`` is the scored split, ``held_out`` the other held-out split (the validation
    slice when scoring test, the test split when scoring validation) or None. Training items
    overlapping an item of either leave ``train``; repeats leave ``evals``; validation items
    overlapping test leave the validation side (``evals`` or ``held_out``, whichever it is).
    """
    # Training is checked against every held-out item before either split is trimmed, so
    # that a run scoring test and one scoring validation train on the same examples.
    in_train = overlapping(train, list(evals) + list(held_out or []))
    train = [ex for i, ex in enumerate(train) if i not in in_train]
    dropped = set(repeats(evals))
    evals = [ex for i, ex in enumerate(evals) if i not in dropped]
    held_out_dropped = 0
    if held_out is not None:
        if eval_is_validation:
            leaked = overlapping(evals, held_out)
            evals = [ex for i, ex in enumerate(evals) if i not in leaked]
        else:
            leaked = overlapping(held_out, evals)
            held_out = [ex for i, ex in enumerate(held_out) if i not in leaked]
        held_out_dropped = len(leaked)
    counts = {
        "train_dropped": len(in_train),
        "repeats_dropped": len(dropped),
        "held_out_dropped": held_out_dropped,
    }
    return train, evals, held_out, counts


def overlap_ids(evals: Sequence[Any], references: Sequence[Any]) -> dict[str, list[str]]:
    """``{"exact": [ids], "near": [ids]}``: the eval items that overlap a reference item."""
    ids = item_ids(evals)
    found = overlapping(evals, references)
    return {
        "exact": sorted(ids[i] for i, exact in found.items() if exact),
        "near": sorted(ids[i] for i, exact in found.items() if not exact),
    }


def overlap_entry(
    train: Sequence[Any],
    evals: Sequence[Any],
    held_out: Sequence[Any] | None,
    *,
    eval_split: str,
    held_out_split: str | None,
    counts: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """What :func:`write_record` keeps for one eval set: the ids of its items that overlap
    training or the other held-out split, exactly or nearly, and its repeats."""
    return {
        "eval_split": eval_split,
        "eval_items": len(evals),
        "held_out_split": held_out_split if held_out is not None else None,
        "in_train": overlap_ids(evals, train),
        "in_held_out": overlap_ids(evals, held_out or []),
        "repeats": sorted(item_ids(evals)[i] for i in repeats(evals)),
        "train_dropped": int((counts or {}).get("train_dropped", 0)),
        "repeats_dropped": int((counts or {}).get("repeats_dropped", 0)),
        "held_out_dropped": int((counts or {}).get("held_out_dropped", 0)),
    }


def apply_split_rule(
    train: list,
    evals: list,
    held_out: list | None,
    *,
    split_rule: str,
    eval_split: str,
    held_out_split: str | None,
    max_eval_examples: int | None,
) -> SplitExamples:
    """A family's loaded splits under ``split_rule``: cleaned (:func:`clean_splits`) under
    ``content``, the scored split cut to ``max_eval_examples``, and its overlap record."""
    counts = None
    if split_rule == CONTENT:
        train, evals, held_out, counts = clean_splits(
            train, evals, held_out, eval_is_validation=eval_split == "validation"
        )
    evals = evals[:max_eval_examples]
    entry = overlap_entry(
        train,
        evals,
        held_out,
        eval_split=eval_split,
        held_out_split=held_out_split,
        counts=counts,
    )
    return SplitExamples(train, evals, held_out, entry)


def overlap_count(entry: Mapping[str, Any]) -> int:
    """How many eval items of an entry overlap training or the other held-out split."""
    ids: set[str] = set()
    for part in ("in_train", "in_held_out"):
        for kind in ("exact", "near"):
            ids.update(entry.get(part, {}).get(kind, []))
    return len(ids)


class ContaminationRecordError(ValueError):
    """A ``contamination.json`` that cannot be read."""


def write_record(run_dir: Path, record: Mapping[str, Any]) -> Path:
    """Write ``record`` to ``run_dir/contamination.json`` atomically; return its path."""
    path = Path(run_dir) / CONTAMINATION_FILE
    text = json.dumps({"version": VERSION, **record}, indent=1, sort_keys=True) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    fsync_replace(tmp, path)
    return path


def read_record(run_dir: Path) -> dict | None:
    """The run's contamination record, or None when it has none (runs from before it)."""
    path = Path(run_dir) / CONTAMINATION_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ContaminationRecordError(f"{path} is not JSON ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("tasks"), dict):
        raise ContaminationRecordError(f"{path} has no 'tasks' mapping")
    return record


def excluded_ids(record: Mapping[str, Any] | None) -> dict[str, set[str]]:
    """Eval set -> the example ids left out of its clean subset: items with an exact or near
    copy in training or in the other held-out split, and repeats within the split."""
    if not record:
        return {}
    out: dict[str, set[str]] = {}
    for eval_set, entry in record["tasks"].items():
        ids: set[str] = set(entry.get("repeats", []))
        for part in ("in_train", "in_held_out"):
            for kind in ("exact", "near"):
                ids.update(entry.get(part, {}).get(kind, []))
        out[str(eval_set)] = ids
    return out


def split_rule_of(task_cfg: Any) -> str:
    """The split rule a (recorded) task config ran under: absent reads as ``legacy``."""
    rule = task_cfg.get("split_rule")  # a mapping or an OmegaConf DictConfig
    return str(rule) if rule is not None else LEGACY


def overlap_warning(overlap: Mapping[str, Mapping[str, Any]], split_rule: str) -> str | None:
    """One line when an eval set overlaps training or the other held-out split, else None."""
    parts = [
        f"{name} {overlap_count(entry)} of {entry['eval_items']}"
        for name, entry in overlap.items()
        if overlap_count(entry)
    ]
    if not parts:
        return None
    return (
        f"eval items overlapping training or the other held-out split (split rule "
        f"{split_rule}): {', '.join(parts)}; the analysis scores the clean subset beside the "
        "full split (task.split_rule=content keeps them apart)"
    )


def record_overlap(run_dir: Path, task_cfg: Any, overlap: Mapping[str, Any]) -> None:
    """Write the run's ``contamination.json`` (nothing for a family the check does not
    cover) and print :func:`overlap_warning`'s line when there is one."""
    if not overlap:
        return
    rule = split_rule_of(task_cfg)
    write_record(
        run_dir,
        {
            "split_rule": rule,
            "near_threshold": NEAR_THRESHOLD,
            "shingle_words": SHINGLE_WORDS,
            "tasks": dict(overlap),
        },
    )
    warning = overlap_warning(overlap, rule)
    if warning:
        print(f"[stablelora] warning: {warning}")


def overlap_rows(overlap: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per eval set of a record's ``tasks``: counts of its overlapping items."""
    rows = []
    for name, entry in overlap.items():
        rows.append(
            {
                "task": name,
                "eval split": entry["eval_split"],
                "items": entry["eval_items"],
                "in train (exact / near)": f"{len(entry['in_train']['exact'])} / "
                f"{len(entry['in_train']['near'])}",
                "in held-out (exact / near)": f"{len(entry['in_held_out']['exact'])} / "
                f"{len(entry['in_held_out']['near'])}"
                + (f" ({entry['held_out_split']})" if entry.get("held_out_split") else ""),
                "repeats": len(entry["repeats"]),
                "overlapping items": overlap_count(entry),
                "train dropped": entry["train_dropped"],
                "held-out dropped": entry["held_out_dropped"],
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub Markdown table of ``rows`` (dicts with the same keys)."""
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[k]) for k in header) + " |" for row in rows]
    return "\n".join(lines)
