"""Example-level paired tests, from the runs' ``examples.parquet``.

Two runs scored on the same examples (the same model, task and seed; a seed fixes the adapter
initialisation and the data order) are compared example by example on their last evaluation:

- ``paired_examples``: per (task, method, seed), McNemar's test of the method against LoRA on
  the discordant examples (b: only the method right, c: only LoRA right), statsmodels'
  ``mcnemar``: the exact binomial test when b + c < :data:`EXACT_BELOW`, else the chi-square
  test with continuity correction;
- ``paired_bootstrap``: per (task, method), for the task average (``Avg``, the mean of the task
  accuracies) and the average over questions (:data:`POOLED`), the difference in accuracy with
  a 95% percentile interval from the paired bootstrap of :mod:`analysis.tables.equivalence`
  (seeds redrawn once per replicate for every eval set the same runs score, examples per eval
  set, the same draw for both methods), its two-sided bootstrap p and that p's Monte Carlo
  standard error;
- ``stable_vs_baselines``: the same bootstrap with Stable-LoRA as the method and each other
  method as the reference in turn (LoRA, rsLoRA, LoRA+, ...), the comparison a study of
  Stable-LoRA asks for. The verdicts (equivalence, Holm, the pre-declared primary analysis and
  its sensitivity rows) are the ``verdicts`` table (:mod:`analysis.tables.verdicts`).

Examples of a run's ``contamination.json`` (:mod:`stablelora.contamination`: eval items seen
in training or validation, repeats) are left out: the tables score the *clean subset*; runs
without the record are scored on the full split, and the notes say it was not checked.

Both state the minimum detectable difference (MDD), a design figure: the true difference a
two-sided 5% test would detect with 80% power, ``(z_0.975 + z_0.8) * SE`` = 2.80 SE, where SE
is the standard error of the paired difference (McNemar: from the discordant rates of the n
examples, sqrt((b + c) / n - ((b - c) / n)^2) / sqrt(n); bootstrap: the standard deviation of
the resampled differences). What rules an effect in or out is the confidence interval.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.collect import Collection
from analysis.labels import setting_labels
from analysis.tables.aggregation import AVG, accuracy_runs, check_mode
from analysis.tables.equivalence import (
    BOOTSTRAP_SAMPLES,
    BOOTSTRAP_SEED,
    average_over_sets,
    bootstrap_differences,
    bootstrap_p,
    bootstrap_replicates,
    monte_carlo_se,
)
from analysis.tables.formatting import Table, num_text
from analysis.tables.ordering import sort_frame
from analysis.tables.registry import register_table
from stablelora.contamination import excluded_ids, read_record
from stablelora.records.examples import EXAMPLES_FILE
from stablelora.records.folder import RunFolder
from stablelora.records.layers import RecordsError

__all__ = ["BOOTSTRAP_SAMPLES", "BOOTSTRAP_SEED", "bootstrap_differences"]

#: The method every other one is paired with (as in ``paired_difference``).
REFERENCE = "lora"
#: The method ``stable_vs_baselines`` pairs with every other one.
STABLE = "stable_lora"
#: McNemar is exact (binomial) when the discordant pairs are fewer than this.
EXACT_BELOW = 25
ALPHA, POWER = 0.05, 0.80
#: The row of the average over questions (pooled; ``Avg`` is the mean of task accuracies).
POOLED = "Avg over questions"


def mdd_factor() -> float:
    """``z_(1 - alpha/2) + z_power``: 2.80 for a two-sided 5% test at 80% power."""
    from scipy.stats import norm

    return float(norm.ppf(1 - ALPHA / 2) + norm.ppf(POWER))


def mcnemar_test(b: int, c: int) -> tuple[float, str]:
    """(p-value, test name) of McNemar's test on the discordant counts ``b`` and ``c``."""
    from statsmodels.stats.contingency_tables import mcnemar

    exact = b + c < EXACT_BELOW
    result = mcnemar([[0, b], [c, 0]], exact=exact, correction=True)
    return float(result.pvalue), "exact" if exact else "chi2"


def final_examples(run: dict) -> tuple[pd.DataFrame | None, str | None]:
    """The rows of a run's final evaluation (``eval_set``, ``example_id``, ``correct``), or
    None and why the run has none (a few words for the tables' notes).

    The final evaluation is the one at the step the summary records (``steps``), never the
    largest step the file holds: a file cut back, or restored from an earlier copy, may hold
    only the initial evaluation's rows, which are not the trained model's. A file that cannot
    be read, or lacks that step, is warned about, naming it (as the per-layer files are)."""
    folder = RunFolder(run["run_id"])
    path = folder.path / EXAMPLES_FILE
    if not path.exists():
        return None, f"no {EXAMPLES_FILE}"
    try:
        frame = folder.examples()
    except RecordsError as error:
        warnings.warn(f"{error}; the run is left out of the paired tables.", stacklevel=2)
        return None, f"{EXAMPLES_FILE} cannot be read"
    step = run.get("steps")
    final = frame[frame["step"] == step] if pd.notna(step) else frame.iloc[:0]
    if final.empty:
        shown = "unknown" if pd.isna(step) else int(step)
        warnings.warn(
            f"{path} has no rows of the run's final step ({shown}); the run is left out of "
            "the paired tables.",
            stacklevel=2,
        )
        return None, f"{EXAMPLES_FILE} has no rows of its final step ({shown})"
    return final[["eval_set", "example_id", "correct"]], None


def unpaired_note(runs: pd.DataFrame) -> list[str]:
    """A note naming the completed runs of ``runs`` that the pairs leave out for want of
    per-example records of their final step (:func:`final_examples`): a run missing from the
    pairs is said, never silently dropped. Empty when every completed run has them."""
    completed = runs[runs["status"] == "completed"]
    left_out = [
        f"{run['run']} ({why})"
        for run in completed.to_dict("records")
        if (why := final_examples(run)[1]) is not None
    ]
    if not left_out:
        return []
    return [
        f"{len(left_out)} of {len(completed)} completed runs are left out of the pairs (no "
        f"per-example records of their final evaluation): {'; '.join(left_out)}."
    ]


def paired_frames(coll: Collection, reference_method: str = REFERENCE) -> pd.DataFrame:
    """Long rows (model, training, method, label, seed, eval_set, example_id, correct,
    reference): every completed run's final per-example results joined with the run of
    ``reference_method`` (LoRA) of the same model, task and seed on the example ids."""
    runs = accuracy_runs(coll.runs)
    if runs.empty or reference_method not in set(runs["method"]):
        return pd.DataFrame()
    return pair_with(final_example_rows(runs), reference_method)


def final_example_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """Every completed run's final per-example results (eval_set, example_id, correct) with
    its model, task, seed, setting (:func:`~analysis.labels.setting_labels`: the lr, the
    scale of A0... when the methods are each run at several), method and label,
    ``excluded`` (the example is in the run's contamination record: left out of the clean
    subset) and ``checked`` (the run has that record); empty when no run has per-example
    records. A run without those of its final step is left out (:func:`unpaired_note`)."""
    keys = ["model", "task", "seed", "setting"]
    runs = runs.assign(setting=setting_labels(runs))
    frames = []
    for run in runs[runs["status"] == "completed"].to_dict("records"):
        examples, _ = final_examples(run)  # a run without them: unpaired_note says so
        if examples is None:
            continue
        record = read_record(Path(run["run_id"]))
        excluded = excluded_ids(record)
        left_out = [
            example_id in excluded.get(str(eval_set), ())
            for eval_set, example_id in zip(examples["eval_set"], examples["example_id"])
        ]
        frames.append(
            examples.assign(
                **{k: run[k] for k in keys},
                method=run["method"],
                label=run["label"],
                excluded=left_out,
                checked=record is not None,
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def pair_with(examples: pd.DataFrame, reference_method: str) -> pd.DataFrame:
    """``examples`` (:func:`final_example_rows`) of every other method joined with
    ``reference_method``'s run of the same model, task, seed and setting on the example ids; an
    example is ``excluded`` when either run's record excludes it, ``checked`` when both runs
    have a record."""
    if examples.empty:
        return examples
    keys = ["model", "task", "seed", "eval_set", "example_id"]
    if "setting" in examples:  # a method at one lr is paired with the reference at that lr
        keys.insert(3, "setting")
    reference = examples[examples["method"] == reference_method]
    reference = reference[[*keys, "correct", "excluded", "checked"]].rename(
        columns={"correct": "reference", "excluded": "excluded_ref", "checked": "checked_ref"}
    )
    others = examples[examples["method"] != reference_method]
    pairs = others.merge(reference, on=keys)
    pairs["excluded"] = pairs["excluded"] | pairs.pop("excluded_ref")
    pairs["checked"] = pairs["checked"] & pairs.pop("checked_ref")
    return pairs


def clean_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """``pairs`` without the examples a contamination record excludes (the clean subset)."""
    return pairs[~pairs["excluded"]] if not pairs.empty else pairs


def split_note(pairs: pd.DataFrame) -> str:
    """Which split ``pairs`` are scored on: the clean subset (how many scored items the
    contamination records left out) or the full split, not checked for overlap."""
    checked = pairs["checked"].to_numpy(dtype=bool)
    items = pairs[["eval_set", "example_id"]].drop_duplicates()
    left_out = pairs.loc[pairs["excluded"], ["eval_set", "example_id"]].drop_duplicates()
    if checked.all():
        return (
            f"clean subset: {len(left_out)} of {len(items)} scored items left out as seen in "
            "training or validation, or repeated (the runs' contamination.json)"
        )
    if not checked.any():
        return (
            "full split, not checked for train/eval overlap (the runs have no contamination.json)"
        )
    return (
        f"clean subset where both runs have a contamination.json ({len(left_out)} of "
        f"{len(items)} scored items left out); the pairs of runs without one are scored on the "
        "full split, not checked"
    )


def mcnemar_rows(pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, task, eval_set, method, label, seed): n, accuracies, b, c, the
    McNemar p-value and test, the MDD (all differences in percentage points)."""
    rows = []
    factor = mdd_factor()
    groups = ["model", "task", "eval_set", "method", "label", "seed"]
    for key, group in pairs.groupby(groups, sort=False):
        method, reference = group["correct"].astype(bool), group["reference"].astype(bool)
        n = len(group)
        b, c = int((method & ~reference).sum()), int((~method & reference).sum())
        p_value, test = mcnemar_test(b, c)
        se = math.sqrt(max((b + c) / n - ((b - c) / n) ** 2, 0.0) / n)
        rows.append(
            {
                **dict(zip(groups, key)),
                "n": n,
                "acc": 100 * method.mean(),
                "acc_reference": 100 * reference.mean(),
                "diff": 100 * (b - c) / n,
                "b": b,
                "c": c,
                "p_value": p_value,
                "test": test,
                # no discordant example: no estimate of the spread, so no MDD
                "mdd": 100 * factor * se if b + c else math.nan,
            }
        )
    return pd.DataFrame(rows)


def comparison_matrices(
    group: pd.DataFrame,
) -> tuple[dict[str, np.ndarray], dict[str, str], list]:
    """One comparison's paired differences as matrices: (eval set -> (seeds, examples) array of
    method - reference over the examples every paired seed scored, eval set -> its runs' task
    (the eval sets of one task share the seed draw: one run scores them all), the seeds).
    Eval sets that some paired seed did not score are left out."""
    seeds = sorted(set(group["seed"]))
    per_set: dict[str, np.ndarray] = {}
    tasks: dict[str, str] = {}
    for eval_set, part in group.groupby("eval_set", sort=False):
        wide = part.pivot_table(
            index="seed", columns="example_id", values=["correct", "reference"], aggfunc="first"
        )
        wide = wide.dropna(axis=1).reindex(seeds).dropna(axis=0)
        if wide.empty or len(wide) != len(seeds):
            continue
        diff = wide["correct"].to_numpy(dtype=float) - wide["reference"].to_numpy(dtype=float)
        per_set[str(eval_set)] = diff
        tasks[str(eval_set)] = str(part["task"].iloc[0])
    return per_set, tasks, seeds


def bootstrap_rows(pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, method, label) and eval set, plus ``Avg`` (the mean of the task
    accuracies) and :data:`POOLED` (over questions) when there are several eval sets: the
    observed difference, its bootstrap CI, p-value and p's Monte Carlo SE, SE and MDD
    (percentage points)."""
    rows = []
    factor = mdd_factor()
    for key, group in pairs.groupby(["model", "method", "label"], sort=False):
        per_set, tasks, seeds = comparison_matrices(group)
        if not per_set:
            continue
        replicates = bootstrap_replicates(per_set, tasks)
        draws = replicates.per_set("seeds_and_questions")
        observed = {name: float(diff.mean()) for name, diff in per_set.items()}
        targets = [(name, [name], observed[name], draws[name]) for name in per_set]
        if len(per_set) > 1:
            for name, average in ((AVG, "tasks"), (POOLED, "questions")):
                targets.append(
                    (
                        name,
                        list(per_set),
                        float(average_over_sets(observed, replicates.sizes, average)),
                        replicates.averaged("seeds_and_questions", average),
                    )
                )
        for name, members, value, samples in targets:
            low, high = np.percentile(samples, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
            p_value = bootstrap_p(samples)
            se = float(samples.std(ddof=1))
            rows.append(
                {
                    **dict(zip(["model", "method", "label"], key)),
                    "eval_set": name,
                    "seeds": len(seeds),
                    "examples": sum(replicates.sizes[m] for m in members),
                    "diff": 100 * value,
                    "ci_low": 100 * low,
                    "ci_high": 100 * high,
                    "p_value": p_value,
                    "p_mc_se": monte_carlo_se(p_value, len(samples)),
                    "se": 100 * se,
                    "mdd": 100 * factor * se if se > 0 else math.nan,
                }
            )
    return pd.DataFrame(rows)


def _mdd_text(mdd: float, digits: int) -> str:
    return "–" if not np.isfinite(mdd) else f"{mdd:.{digits}f}"


def _p_text(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _bootstrap_cells(data: pd.DataFrame, diff_header: str) -> dict[str, list[str] | pd.Series]:
    """The displayed columns of :func:`bootstrap_rows`'s rows, the difference under
    ``diff_header``."""
    return {
        "seeds × examples": data["seeds"].astype(str) + " × " + data["examples"].astype(str),
        diff_header: [num_text(d, 2, signed=True) for d in data["diff"]],
        "95% bootstrap CI": [
            f"[{lo:+.2f}, {hi:+.2f}]" for lo, hi in zip(data["ci_low"], data["ci_high"])
        ],
        "p (MC SE)": [p_cell(p, e) for p, e in zip(data["p_value"], data["p_mc_se"])],
        "MDD (pp)": [_mdd_text(m, 2) for m in data["mdd"]],
    }


def p_cell(p: float, mc_se: float) -> str:
    """A bootstrap p with its Monte Carlo standard error: ``0.104 (0.003)``; – for no test."""
    if not np.isfinite(p):
        return "–"
    return _p_text(p) if not np.isfinite(mc_se) else f"{_p_text(p)} ({mc_se:.3f})"


def _sort_averages_last(data: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """``data`` sorted by ``order`` with the eval sets first, then ``Avg``, then the pooled."""
    data = data.assign(avg_rank=data["eval_set"].map({AVG: 1, POOLED: 2}).fillna(0))
    return sort_frame(data, [c if c != "is_avg" else "avg_rank" for c in order]).drop(
        columns="avg_rank"
    )


#: The notes every bootstrap table shares: what the interval, p and MDD are, and which rules.
BOOTSTRAP_NOTES = [
    f"Paired bootstrap ({BOOTSTRAP_SAMPLES:,} resamples, numpy seed {BOOTSTRAP_SEED}; "
    "analysis.tables.equivalence): each resample redraws the seeds with replacement once for "
    "every task the same runs score, and per task the examples with replacement, the same "
    "draw for both methods; the interval is the 2.5-97.5 percentiles, p twice the smaller "
    "tail mass at or beyond 0, with its Monte Carlo standard error sqrt(p(1 - p)/B).",
    f"Avg: the mean of the task accuracies (Table 1's average); {POOLED}: every question "
    "weighted alike. The verdicts table names which is the primary analysis.",
    "The confidence interval is what rules an effect in or out: differences outside it are "
    "ruled out at 5%. MDD (a design figure): 2.80 bootstrap standard errors, the true "
    "difference a two-sided 5% test detects with 80% power.",
]


@register_table
def paired_examples(coll: Collection, seeds: str = "mean") -> Table | None:
    """McNemar per (task, method, seed) against LoRA on the same examples."""
    check_mode(seeds)
    everything = paired_frames(coll)
    if everything.empty:
        return None
    pairs = clean_pairs(everything)
    data = sort_frame(mcnemar_rows(pairs), ["model", "task", "eval_set", "method", "seed"])
    display = pd.DataFrame(
        {
            "model": data["model"],
            "task": data["eval_set"],
            "method": data["label"],
            "seed": data["seed"].astype(str),
            "n": data["n"].astype(str),
            "acc / lora (%)": [
                f"{a:.1f} / {r:.1f}" for a, r in zip(data["acc"], data["acc_reference"])
            ],
            "Δ (pp)": [num_text(d, 1, signed=True) for d in data["diff"]],
            "b / c": data["b"].astype(str) + " / " + data["c"].astype(str),
            "McNemar p": [f"{_p_text(p)} ({t})" for p, t in zip(data["p_value"], data["test"])],
            "MDD (pp)": [_mdd_text(m, 1) for m in data["mdd"]],
        }
    )
    notes = [
        f"Each method's final evaluation against {REFERENCE}'s run of the same model, task and "
        "seed, example by example (examples.parquet). b: examples only the method got right; "
        f"c: only {REFERENCE}. Δ = (b - c) / n.",
        f"McNemar's test (statsmodels): exact binomial on b of b + c when b + c < {EXACT_BELOW}, "
        "else chi-square with continuity correction; two-sided.",
        "MDD (a design figure): the difference a two-sided 5% test detects with 80% power at "
        "these discordance rates, 2.80 · sqrt(((b + c)/n - ((b - c)/n)²) / n); – where no "
        "example is discordant.",
        f"Scored on the {split_note(everything)}.",
        *unpaired_note(accuracy_runs(coll.runs)),
    ]
    return Table(
        "paired_examples",
        f"Example-level paired test against {REFERENCE}, per task and seed (McNemar)",
        display,
        data,
        notes,
        key_columns=4,
    )


@register_table
def paired_bootstrap(coll: Collection, seeds: str = "mean") -> Table | None:
    """Paired bootstrap over seeds and examples, per task and for the task average."""
    check_mode(seeds)
    everything = paired_frames(coll)
    if everything.empty:
        return None
    data = bootstrap_rows(clean_pairs(everything))
    if data.empty:
        return None
    data = _sort_averages_last(data, ["model", "is_avg", "eval_set", "method"])
    display = pd.DataFrame(
        {
            "model": data["model"],
            "task": data["eval_set"],
            "method": data["label"],
            **_bootstrap_cells(data, f"Δ vs {REFERENCE} (pp)"),
        }
    )
    notes = [
        f"Δ: the method's accuracy minus {REFERENCE}'s on the same examples, averaged over the "
        f"paired seeds; scored on the {split_note(everything)}.",
        *BOOTSTRAP_NOTES,
        *unpaired_note(accuracy_runs(coll.runs)),
    ]
    return Table(
        "paired_bootstrap",
        f"Paired bootstrap over seeds and examples against {REFERENCE} (percentage points)",
        display,
        data,
        notes,
        key_columns=3,
    )


@register_table
def stable_vs_baselines(coll: Collection, seeds: str = "mean") -> Table | None:
    """Stable-LoRA against each other method: paired bootstrap over seeds and examples."""
    check_mode(seeds)
    runs = accuracy_runs(coll.runs)
    if runs.empty or STABLE not in set(runs["method"]):
        return None
    examples = final_example_rows(runs)  # read once, paired with each baseline in turn
    frames, splits = [], []
    for baseline in sorted(set(runs["method"]) - {STABLE}):
        pairs = pair_with(examples, baseline)
        pairs = pairs[pairs["method"] == STABLE] if not pairs.empty else pairs
        if not pairs.empty:
            splits.append(pairs)
            frames.append(bootstrap_rows(clean_pairs(pairs)).assign(baseline=baseline))
    data = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if data.empty:
        return None
    # "method" is the baseline from here on (the tables' order of methods), "label" Stable-LoRA's
    data = data.drop(columns="method").rename(columns={"baseline": "method"})
    data = _sort_averages_last(data, ["model", "label", "is_avg", "eval_set", "method"])
    display = pd.DataFrame(
        {
            "model": data["model"],
            "method": data["label"],
            "task": data["eval_set"],
            "against": data["method"],
            **_bootstrap_cells(data, "Δ (pp)"),
        }
    )
    notes = [
        f"Δ: {STABLE}'s accuracy minus the baseline's on the same examples and seeds (each "
        "baseline's runs of the seeds both completed), averaged over those seeds; scored on the "
        f"{split_note(pd.concat(splits, ignore_index=True))}.",
        *BOOTSTRAP_NOTES,
        "Each baseline is a separate test: the verdicts table adjusts the p-values across the "
        "baselines (Holm) and tests equivalence against the declared margin.",
        *unpaired_note(runs),
    ]
    return Table(
        "stable_vs_baselines",
        f"{STABLE} against each baseline: paired bootstrap over seeds and examples "
        "(percentage points)",
        display,
        data,
        notes,
        key_columns=4,
    )
