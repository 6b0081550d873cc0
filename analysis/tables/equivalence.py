"""The statistics of a paired comparison: the bootstrap that matches the design, equivalence
(TOST) against a margin, Holm's correction, the verdict, and the pre-declared analysis plan.

**Bootstrap** (:func:`bootstrap_replicates`): the difference method - reference per eval set is
a (seeds, examples) matrix of 0/±1. Each replicate draws the seeds with replacement, ONE draw
shared by every eval set scored by the same runs (a mixture's run scores all its eval sets, so
its seed is one unit), and, per eval set, the example positions with replacement (one draw for
every seed: the seeds score the same examples). From the same replicates:

- ``seeds_and_questions``: the seed-weighted mean of the example-resampled per-seed differences;
- ``questions``: seeds fixed, each example's seed mean resampled (equal seed weights);
- ``seeds``: not a bootstrap: a t interval (scipy) over the per-seed differences.

Averages over eval sets: ``tasks`` (macro, the mean of the task accuracies, Table 1's ``Avg``)
and ``questions`` (micro, pooled: weighted by the number of examples).

**Tests**, two-sided at ``alpha``: p is twice the smaller bootstrap tail beyond 0 (its Monte
Carlo standard error sqrt(p (1 - p) / B)), the interval the (alpha/2, 1 - alpha/2)
percentiles. **TOST** against a margin m (pp): H0- "diff <= -m" rejected when few draws lie at
or below -m, H0+ "diff >= +m" when few lie at or above +m; p_TOST is the larger one-sided p, so
equivalence at alpha means the (alpha, 1 - alpha) percentile interval lies inside (-m, +m).
The t analogues (``seeds``) use scipy's one-sample t test (statsmodels ``ttost_paired``'s
construction).

**Verdict** (:func:`verdict`), from Holm-adjusted p-values (statsmodels ``multipletests``)
across the family of comparisons: ``different`` when the two-sided test rejects, else
``equivalent within ±m pp`` when TOST rejects, else ``inconclusive``.

**Plan** (:func:`read_plan`): the experiment's ``analysis.primary`` config block
(``conf/config.yaml`` documents the keys), read from the runs' ``config.yaml``; every run of the
collection must declare the same plan. Runs from before the block take it from the report's
``--plan KEY=VALUE`` options (``experiments.reproduce`` passes the preset's), and the report
says that it was declared after the runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import pandas as pd

#: Resamples of every bootstrap.
BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0
#: Replicates built at once (bounds the memory of the example draws: chunk x examples).
CHUNK = 1000

RESAMPLINGS = {
    "seeds_and_questions": "bootstrap over seeds and questions",
    "questions": "bootstrap over questions (seeds fixed)",
    "seeds": "t interval over seeds",
}
AVERAGES = {"tasks": "mean of task accuracies", "questions": "over questions (pooled)"}
CORRECTIONS = ("holm", "none")
DECLARED = ("before_runs", "after_results")
#: The verdict words: the only ones a report prints about a comparison's outcome.
DIFFERENT, INCONCLUSIVE = "different", "inconclusive"


class PlanError(ValueError):
    """An analysis plan that is invalid, or that the runs of a collection disagree on."""


# ---------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Plan:
    """The pre-declared primary analysis (``analysis.primary`` in the experiment's config)."""

    resample: str = "seeds_and_questions"
    average: str = "tasks"
    margin_pp: float | None = None
    alpha: float = 0.05
    correction: str = "holm"
    #: ``before_runs`` (the default: in the config before the first run) or ``after_results``.
    declared: str = "before_runs"
    #: Why this margin (printed beside it); None when no margin is declared.
    margin_rule: str | None = None
    #: Where the plan came from: ``runs`` (their config.yaml), ``report`` (--plan), ``default``.
    source: str = "default"

    def check(self) -> Plan:
        """The plan, or :class:`PlanError` naming the first invalid key."""
        choices = {
            "resample": RESAMPLINGS,
            "average": AVERAGES,
            "correction": CORRECTIONS,
            "declared": DECLARED,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise PlanError(
                    f"analysis.primary.{key} is {getattr(self, key)!r}; choose from "
                    f"{list(allowed)}."
                )
        if not 0 < self.alpha < 0.5:
            raise PlanError(f"analysis.primary.alpha is {self.alpha}; it must lie in (0, 0.5).")
        if self.margin_pp is not None and not self.margin_pp > 0:
            raise PlanError(f"analysis.primary.margin_pp is {self.margin_pp}; give a positive pp.")
        return self


#: The plan's keys as the config and ``--plan`` name them (``source`` is not one).
PLAN_KEYS = tuple(f.name for f in fields(Plan) if f.name != "source")
PLAN_PREFIX = "analysis.primary."


def _plan_value(key: str, value):
    """A config value as the plan holds it: NaN (a missing cell) -> None, numbers as float."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if key in ("margin_pp", "alpha"):
        return float(value)
    return str(value)


def make_plan(values: dict, source: str) -> Plan:
    """A checked :class:`Plan` from ``{key: value}`` (unknown keys are an error)."""
    unknown = sorted(set(values) - set(PLAN_KEYS))
    if unknown:
        raise PlanError(f"unknown analysis plan key(s) {unknown}; the keys: {list(PLAN_KEYS)}.")
    given = {k: _plan_value(k, v) for k, v in values.items()}
    given = {k: v for k, v in given.items() if v is not None or k in ("margin_pp", "margin_rule")}
    return replace(Plan(), **given, source=source).check()


def parse_plan_options(options: list[str]) -> dict:
    """``["margin_pp=1.0", "average=tasks"]`` -> ``{"margin_pp": 1.0, "average": "tasks"}``
    (values read as YAML: ``null``, numbers, text)."""
    import yaml

    values = {}
    for option in options:
        key, sep, text = option.partition("=")
        if not sep or key.strip() not in PLAN_KEYS:
            raise PlanError(f"--plan {option!r}: give KEY=VALUE with KEY one of {list(PLAN_KEYS)}.")
        values[key.strip()] = yaml.safe_load(text)
    return values


def read_plan(runs: pd.DataFrame, given: dict | None = None) -> Plan:
    """The collection's plan: the ``analysis.primary`` block of the runs' config (every run the
    same), else ``given`` (the report's ``--plan``; its keys must then agree with the runs'),
    else the defaults. Raises :class:`PlanError` when the runs disagree."""
    columns = [c for c in runs.columns if c.startswith(PLAN_PREFIX)]
    declared = {}
    if columns:
        rows = {
            tuple(
                (c.removeprefix(PLAN_PREFIX), _plan_value(c.removeprefix(PLAN_PREFIX), row[c]))
                for c in columns
            )
            for row in runs[columns].to_dict("records")
        }
        if len(rows) > 1 or runs["analysis.primary.resample"].isna().any():
            raise PlanError(
                f"the runs declare {len(rows)} different analysis plans (analysis.primary in "
                "their config.yaml): report the runs of one plan at a time."
            )
        declared = {k: v for k, v in next(iter(rows)) if k in PLAN_KEYS}
    if declared:
        for key, value in (given or {}).items():
            if key in declared and _plan_value(key, value) != declared[key]:
                raise PlanError(
                    f"--plan {key}={value} contradicts the runs' declared "
                    f"analysis.primary.{key}={declared[key]}: a pre-declared plan is kept."
                )
        return make_plan(declared, "runs")
    if given:
        return make_plan(given, "report")
    return Plan()


def plan_note(plan: Plan, split_note: str) -> str:
    """The report's sentence on the plan: what is primary, the margin and its rule, and
    whether it was declared before the runs."""
    margin = "no equivalence margin" if plan.margin_pp is None else f"margin ±{plan.margin_pp:g} pp"
    rule = f" (rule: {plan.margin_rule})" if plan.margin_rule else ""
    primary = (
        f"Primary analysis: {RESAMPLINGS[plan.resample]}, {AVERAGES[plan.average]} average, "
        f"{split_note}; {margin}{rule}; alpha {plan.alpha:g}, correction: {plan.correction}."
    )
    if plan.source == "runs" and plan.declared == "before_runs":
        when = "Declared before the runs: their config.yaml holds it (analysis.primary)."
    elif plan.declared == "after_results":
        where = (
            "" if plan.source == "runs" else " (not in the runs' config.yaml: given at report time)"
        )
        when = (
            f"Declared AFTER the results were seen{where}; the margin is set by the rule stated "
            "beside it, not by the verdict it gives."
        )
    elif plan.source == "report":
        when = "Declared after the runs: their config.yaml does not hold it (given at report time)."
    else:
        when = "No plan declared: the defaults of conf/config.yaml's analysis.primary."
    return f"{primary} {when}"


# ---------------------------------------------------------------------------- bootstrap
@dataclass
class Replicates:
    """Bootstrap replicates of one comparison: per eval set, the example-resampled mean
    difference of each seed (``per_seed``, shape (B, seeds)) and the seed draw's weights
    (``seed_weights``, (B, seeds), rows summing to 1; the same array for eval sets of one run
    group), with the eval sets' sizes."""

    per_seed: dict[str, np.ndarray]
    seed_weights: dict[str, np.ndarray]
    sizes: dict[str, int]

    def per_set(self, resample: str) -> dict[str, np.ndarray]:
        """Eval set -> (B,) replicated differences under ``resample`` (a bootstrap one)."""
        if resample == "seeds_and_questions":
            return {k: (v * self.seed_weights[k]).sum(axis=1) for k, v in self.per_seed.items()}
        if resample == "questions":
            return {k: v.mean(axis=1) for k, v in self.per_seed.items()}
        raise ValueError(f"{resample!r} is not a bootstrap resampling.")

    def averaged(self, resample: str, average: str) -> np.ndarray:
        """(B,) replicated differences of the average over the eval sets."""
        return average_over_sets(self.per_set(resample), self.sizes, average)


def average_over_sets(values: dict[str, np.ndarray], sizes: dict[str, int], average: str):
    """The ``tasks`` (unweighted) or ``questions`` (weighted by size) average of per-set
    values (arrays of one shape, or floats)."""
    if average == "tasks":
        return sum(values.values()) / len(values)
    total = sum(sizes[k] for k in values)
    return sum(sizes[k] * v for k, v in values.items()) / total


def bootstrap_replicates(
    per_set: dict[str, np.ndarray],
    seed_groups: dict[str, str] | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
    rng_seed: int = BOOTSTRAP_SEED,
) -> Replicates:
    """Resample the paired differences ``per_set`` (eval set -> (seeds, examples) array of
    method - reference) ``samples`` times: one seed draw per replicate for each group of
    ``seed_groups`` (eval set -> the runs that score it; default: one group, a mixture's runs
    scoring every set), the examples drawn per eval set (the same draw for every seed).

    Vectorised: a chunk of replicates' example draws becomes a count matrix C (chunk,
    examples), and C @ diff.T / examples gives every seed's resampled mean at once."""
    rng = np.random.default_rng(rng_seed)
    groups = seed_groups or dict.fromkeys(per_set, "")
    weights: dict[str, np.ndarray] = {}
    for group in dict.fromkeys(groups[name] for name in per_set):
        n_seeds = {per_set[k].shape[0] for k in per_set if groups[k] == group}
        if len(n_seeds) != 1:
            raise ValueError(f"eval sets of run group {group!r} differ in their number of seeds")
        (count,) = n_seeds
        draws = rng.integers(0, count, size=(samples, count))
        offsets = (draws + count * np.arange(samples)[:, None]).ravel()
        counts = np.bincount(offsets, minlength=samples * count).reshape(samples, count)
        shared = counts / count
        for name in per_set:
            if groups[name] == group:
                weights[name] = shared
    per_seed = {}
    for name, diff in per_set.items():
        diff = np.asarray(diff, dtype=float)
        n = diff.shape[1]
        out = np.empty((samples, diff.shape[0]))
        for start in range(0, samples, CHUNK):
            size = min(CHUNK, samples - start)
            idx = rng.integers(0, n, size=(size, n))
            flat = (idx + n * np.arange(size)[:, None]).ravel()
            counts = np.bincount(flat, minlength=size * n).reshape(size, n)
            out[start : start + size] = counts @ diff.T / n
        per_seed[name] = out
    sizes = {name: np.asarray(d).shape[1] for name, d in per_set.items()}
    return Replicates(per_seed, weights, sizes)


def bootstrap_differences(
    per_set: dict[str, tuple[np.ndarray, np.ndarray]],
    seed_groups: dict[str, str] | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
    rng_seed: int = BOOTSTRAP_SEED,
    resample: str = "seeds_and_questions",
    average: str = "tasks",
) -> np.ndarray:
    """Resampled differences (method - reference, accuracy units) of the ``average`` over the
    eval sets; ``per_set``: eval set -> (method, reference) correctness, (seeds, examples),
    rows in one seed order. See :func:`bootstrap_replicates`."""
    diffs = {k: np.asarray(m, float) - np.asarray(r, float) for k, (m, r) in per_set.items()}
    replicates = bootstrap_replicates(diffs, seed_groups, samples, rng_seed)
    return replicates.averaged(resample, average)


# ---------------------------------------------------------------------------- tests
def bootstrap_p(draws: np.ndarray) -> float:
    """Two-sided bootstrap p of "no difference": twice the smaller tail mass at or beyond 0."""
    return float(min(1.0, 2 * min((draws <= 0).mean(), (draws >= 0).mean())))


def monte_carlo_se(p: float, samples: int) -> float:
    """The Monte Carlo standard error of a bootstrap p from ``samples`` resamples."""
    return math.sqrt(p * (1 - p) / samples)


def bootstrap_tost_p(draws: np.ndarray, margin: float) -> float:
    """TOST p against ±``margin`` (draws' units): the larger of the one-sided bootstrap
    p-values of "diff <= -margin" (draws at or below -margin) and "diff >= +margin"."""
    return float(max((draws <= -margin).mean(), (draws >= margin).mean()))


def t_tests(values: np.ndarray, margin: float | None, alpha: float) -> dict:
    """Over per-seed differences: mean, two-sided t interval at 1 - alpha, its p, the TOST p
    against ±``margin`` (scipy's one-sample t tests; as statsmodels' ``ttost_paired``) and
    the standard error; NaN where fewer than two seeds give no spread."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    n, mean = len(values), float(np.mean(values))
    se = float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    out = {"diff": mean, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan,
           "tost_p": math.nan, "se": se}  # fmt: skip
    if n < 2 or not se > 0:
        return out
    half = float(stats.t.ppf(1 - alpha / 2, n - 1)) * se
    out.update(ci_low=mean - half, ci_high=mean + half)
    out["p_value"] = float(stats.ttest_1samp(values, 0.0).pvalue)
    if margin is not None:
        lower = stats.ttest_1samp(values, -margin, alternative="greater").pvalue
        upper = stats.ttest_1samp(values, margin, alternative="less").pvalue
        out["tost_p"] = float(max(lower, upper))
    return out


def adjust(p_values, correction: str) -> np.ndarray:
    """``p_values`` adjusted across the family (Holm via statsmodels ``multipletests``); NaN
    entries (no test) stay NaN and are not counted in the family."""
    from statsmodels.stats.multitest import multipletests

    p_values = np.asarray(p_values, dtype=float)
    out = np.full_like(p_values, np.nan)
    present = ~np.isnan(p_values)
    if correction == "none" or not present.any():
        out[present] = p_values[present]
        return out
    out[present] = multipletests(p_values[present], method=correction)[1]
    return out


def equivalent_text(margin_pp: float) -> str:
    return f"equivalent within ±{margin_pp:g} pp"


def verdict(p_adjusted: float, tost_adjusted: float, margin_pp: float | None, alpha: float) -> str:
    """``different`` when the adjusted two-sided p is below ``alpha``, else ``equivalent
    within ±m pp`` when the adjusted TOST p is, else ``inconclusive``."""
    if p_adjusted < alpha:
        return DIFFERENT
    if margin_pp is not None and tost_adjusted < alpha:
        return equivalent_text(margin_pp)
    return INCONCLUSIVE
