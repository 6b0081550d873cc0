"""Example-level paired tests against LoRA, from the runs' ``examples.parquet``.

Two runs scored on the same examples (the same model, task and seed; a seed fixes the adapter
initialisation and the data order) are compared example by example on their last evaluation:

- ``paired_examples``: per (task, method, seed), McNemar's test of the method against LoRA on
  the discordant examples (b: only the method right, c: only LoRA right), statsmodels'
  ``mcnemar``: the exact binomial test when b + c < :data:`EXACT_BELOW`, else the chi-square
  test with continuity correction;
- ``paired_bootstrap``: per (task, method) and for the task average, the difference in
  accuracy with a 95% percentile interval from a paired bootstrap that resamples the seeds and,
  within each task, the examples (the same draw for both methods), and its two-sided bootstrap
  p-value;
- ``stable_vs_baselines``: the same bootstrap with Stable-LoRA as the method and each other
  method as the reference in turn (LoRA, rsLoRA, LoRA+, ...), the comparison a study of
  Stable-LoRA asks for.

Both state the minimum detectable difference (MDD): the true difference a two-sided 5% test
would detect with 80% power, ``(z_0.975 + z_0.8) * SE`` = 2.80 SE, where SE is the standard
error of the paired difference (McNemar: from the discordant rates of the n examples, sqrt((b +
c) / n - ((b - c) / n)^2) / sqrt(n); bootstrap: the standard deviation of the resampled
differences).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.collect import Collection
from analysis.tables.aggregation import AVG, accuracy_runs, check_mode
from analysis.tables.formatting import Table, num_text
from analysis.tables.ordering import sort_frame
from analysis.tables.registry import register_table
from stablelora.example_records import read_examples

#: The method every other one is paired with (as in ``paired_difference``).
REFERENCE = "lora"
#: The method ``stable_vs_baselines`` pairs with every other one.
STABLE = "stable_lora"
#: McNemar is exact (binomial) when the discordant pairs are fewer than this.
EXACT_BELOW = 25
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0
ALPHA, POWER = 0.05, 0.80


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


def final_examples(run_dir: str) -> pd.DataFrame:
    """The rows of the run's last evaluation (``eval_set``, ``example_id``, ``correct``)."""
    frame = read_examples(Path(run_dir))
    if frame.empty:
        return frame
    return frame[frame["step"] == frame["step"].max()][["eval_set", "example_id", "correct"]]


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
    its model, task, seed, method and label; empty when no run has per-example records."""
    keys = ["model", "task", "seed"]
    frames = []
    for run in runs[runs["status"] == "completed"].to_dict("records"):
        examples = final_examples(run["run_id"])
        if examples.empty:
            continue
        frames.append(
            examples.assign(**{k: run[k] for k in keys}, method=run["method"], label=run["label"])
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def pair_with(examples: pd.DataFrame, reference_method: str) -> pd.DataFrame:
    """``examples`` (:func:`final_example_rows`) of every other method joined with
    ``reference_method``'s run of the same model, task and seed on the example ids."""
    if examples.empty:
        return examples
    keys = ["model", "task", "seed", "eval_set", "example_id"]
    reference = examples[examples["method"] == reference_method]
    reference = reference[[*keys, "correct"]].rename(columns={"correct": "reference"})
    others = examples[examples["method"] != reference_method]
    return others.merge(reference, on=keys)


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


def bootstrap_differences(
    per_set: dict[str, tuple[np.ndarray, np.ndarray]],
    seeds: list,
    samples: int = BOOTSTRAP_SAMPLES,
    rng_seed: int = BOOTSTRAP_SEED,
) -> np.ndarray:
    """Resampled differences (method - reference, in accuracy units) of the unweighted mean
    over the eval sets: each sample draws the seeds with replacement and, per eval set, the
    example positions with replacement (one draw for both methods and every seed: the seeds
    score the same examples in the same order).

    Args:
        per_set: eval set -> (method, reference) correctness, shape (seeds, examples), rows in
            the order of ``seeds``.
        seeds: the paired seeds.
    """
    rng = np.random.default_rng(rng_seed)
    total = np.zeros(samples)
    for method, reference in per_set.values():
        diff = method.astype(float) - reference.astype(float)  # (seeds, examples)
        n_seeds, n = diff.shape
        seed_draws = rng.integers(0, n_seeds, size=(samples, n_seeds))
        example_draws = rng.integers(0, n, size=(samples, n))
        for s in range(samples):
            total[s] += diff[np.ix_(seed_draws[s], example_draws[s])].mean()
    return total / len(per_set)


def bootstrap_rows(pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, method, label) and eval set, plus ``Avg`` over the eval sets (of a
    mixture's runs, or of the per-task runs): the observed difference, its bootstrap CI,
    p-value, SE and MDD (percentage points)."""
    rows = []
    factor = mdd_factor()
    for key, group in pairs.groupby(["model", "method", "label"], sort=False):
        matrices: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        seeds = sorted(set(group["seed"]))
        for eval_set, part in group.groupby("eval_set", sort=False):
            wide = part.pivot_table(
                index="seed", columns="example_id", values=["correct", "reference"], aggfunc="first"
            )
            wide = wide.dropna(axis=1).reindex(seeds).dropna(axis=0)
            if wide.empty:
                continue
            matrices[str(eval_set)] = (
                wide["correct"].to_numpy(dtype=float),
                wide["reference"].to_numpy(dtype=float),
            )
        common = {name: m for name, m in matrices.items() if m[0].shape[0] == len(seeds)}
        targets = {name: {name: m} for name, m in common.items()}
        if len(common) > 1:
            targets[AVG] = common
        for name, per_set in targets.items():
            observed = np.mean([(m - r).mean() for m, r in per_set.values()])
            draws = bootstrap_differences(per_set, seeds)
            low, high = np.percentile(draws, [2.5, 97.5])
            p_value = min(1.0, 2 * min((draws <= 0).mean(), (draws >= 0).mean()))
            se = float(draws.std(ddof=1))
            rows.append(
                {
                    **dict(zip(["model", "method", "label"], key)),
                    "eval_set": name,
                    "seeds": len(seeds),
                    "examples": sum(m.shape[1] for m, _ in per_set.values()),
                    "diff": 100 * observed,
                    "ci_low": 100 * low,
                    "ci_high": 100 * high,
                    "p_value": p_value,
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
        "p": [_p_text(p) for p in data["p_value"]],
        "MDD (pp)": [_mdd_text(m, 2) for m in data["mdd"]],
    }


@register_table
def paired_examples(coll: Collection, seeds: str = "mean") -> Table | None:
    """McNemar per (task, method, seed) against LoRA on the same examples."""
    check_mode(seeds)
    pairs = paired_frames(coll)
    if pairs.empty:
        return None
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
        "MDD: the difference a two-sided 5% test detects with 80% power at these discordance "
        "rates, 2.80 · sqrt(((b + c)/n - ((b - c)/n)²) / n); – where no example is discordant.",
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
    pairs = paired_frames(coll)
    if pairs.empty:
        return None
    data = bootstrap_rows(pairs)
    if data.empty:
        return None
    data["is_avg"] = data["eval_set"] == AVG
    data = sort_frame(data, ["model", "is_avg", "eval_set", "method"]).drop(columns="is_avg")
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
        "paired seeds; Avg: the unweighted mean over the tasks (Table 1's average).",
        f"Paired bootstrap ({BOOTSTRAP_SAMPLES} samples, numpy seed {BOOTSTRAP_SEED}): each "
        "sample redraws the seeds and, per task, the examples with replacement, the same "
        "draw for both methods; the interval is the 2.5-97.5 percentiles, p twice the smaller "
        "tail mass beyond 0.",
        "MDD: 2.80 bootstrap standard errors, the true difference a two-sided 5% test detects "
        "with 80% power; a CI containing 0 with an MDD of m pp rules out only differences "
        "larger than about m.",
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
    frames = []
    for baseline in sorted(set(runs["method"]) - {STABLE}):
        pairs = pair_with(examples, baseline)
        pairs = pairs[pairs["method"] == STABLE] if not pairs.empty else pairs
        if not pairs.empty:
            frames.append(bootstrap_rows(pairs).assign(baseline=baseline))
    data = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if data.empty:
        return None
    # "method" is the baseline from here on (the tables' order of methods), "label" Stable-LoRA's
    data = data.drop(columns="method").rename(columns={"baseline": "method"})
    data["is_avg"] = data["eval_set"] == AVG
    data = sort_frame(data, ["model", "label", "is_avg", "eval_set", "method"])
    data = data.drop(columns="is_avg")
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
        "baseline's runs of the seeds both completed), averaged over those seeds; Avg: the "
        "unweighted mean over the tasks.",
        f"The paired bootstrap of paired_bootstrap ({BOOTSTRAP_SAMPLES} samples, numpy seed "
        f"{BOOTSTRAP_SEED}): seeds and, per task, examples redrawn with replacement, the same "
        "draw for both methods; 2.5-97.5 percentile interval, p twice the smaller tail mass "
        "beyond 0; MDD: 2.80 bootstrap standard errors (80% power, 5% two-sided).",
        "Each baseline is a separate test: with k baselines, a Bonferroni reading asks for "
        "p < 0.05 / k.",
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
