"""``verdicts``: every comparison of the family under the experiment's pre-declared primary
analysis, with its sensitivity rows, Holm-adjusted p-values, equivalence (TOST) and a verdict
computed from the numbers (:mod:`analysis.tables.equivalence`).

The family: Stable-LoRA against each other method when the runs hold Stable-LoRA, else each
method against LoRA, at every *setting* the methods share (:func:`analysis.labels.setting_labels`:
in an lr sweep each lr, and A0 x4, is a comparison of its own: the method's run paired with the
baseline's run of the same seed and setting; the family holds every setting). Per comparison
the rows are

- ``primary``: the plan's resampling and average, on the clean subset (the full split when
  the runs have no contamination record);
- ``sensitivity``: each other resampling (bootstrap over seeds and questions, over questions
  with the seeds fixed, a t interval over seeds), the other average, and the full split
  (when a clean subset exists).

Each analysis (resampling, average, split) is one family: its p-values are adjusted across the
comparisons (the plan's correction), and its verdict reads the adjusted p-values at the plan's
alpha: ``different``, ``equivalent within ±m pp``, or ``inconclusive``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.collect import Collection
from analysis.tables.aggregation import accuracy_runs, check_mode
from analysis.tables.equivalence import (
    AVERAGES,
    BOOTSTRAP_SAMPLES,
    BOOTSTRAP_SEED,
    RESAMPLINGS,
    Plan,
    adjust,
    average_over_sets,
    bootstrap_p,
    bootstrap_replicates,
    bootstrap_tost_p,
    monte_carlo_se,
    plan_note,
    read_plan,
    t_tests,
    verdict,
)
from analysis.tables.formatting import Table, num_text
from analysis.tables.ordering import sort_frame
from analysis.tables.paired_examples import (
    REFERENCE,
    STABLE,
    clean_pairs,
    comparison_matrices,
    final_example_rows,
    mdd_factor,
    p_cell,
    pair_with,
    split_note,
    unpaired_note,
)
from analysis.tables.registry import register_table

CLEAN, FULL = "clean", "full"


def family_pairs(coll: Collection) -> list[tuple[str, pd.DataFrame]]:
    """The family of comparisons: (baseline, pairs of the compared method with it)."""
    runs = accuracy_runs(coll.runs)
    if runs.empty:
        return []
    examples = final_example_rows(runs)
    if examples.empty:
        return []
    methods = set(runs["method"])
    if STABLE in methods:
        family = []
        for baseline in sorted(methods - {STABLE}):
            pairs = pair_with(examples, baseline)
            if not pairs.empty:
                pairs = pairs[pairs["method"] == STABLE]
            if not pairs.empty:
                family.append((baseline, pairs))
        return family
    pairs = pair_with(examples, REFERENCE) if REFERENCE in methods else pd.DataFrame()
    return [(REFERENCE, pairs)] if not pairs.empty else []


def analyses(plan: Plan, has_clean: bool) -> list[tuple[str, str, str, str]]:
    """(role, resampling, average, split) of the rows of one comparison, primary first."""
    split = CLEAN if has_clean else FULL
    rows = [("primary", plan.resample, plan.average, split)]
    rows += [("sensitivity", r, plan.average, split) for r in RESAMPLINGS if r != plan.resample]
    rows += [("sensitivity", plan.resample, a, split) for a in AVERAGES if a != plan.average]
    if has_clean:
        rows.append(("sensitivity", plan.resample, plan.average, FULL))
    return rows


def analysis_row(
    per_set: dict[str, np.ndarray], replicates, resample: str, average: str, plan: Plan
) -> dict:
    """The numbers of one analysis of one comparison (percentage points; p-values raw)."""
    margin = None if plan.margin_pp is None else plan.margin_pp / 100
    sizes = {name: diff.shape[1] for name, diff in per_set.items()}
    observed = float(average_over_sets({k: d.mean() for k, d in per_set.items()}, sizes, average))
    if resample == "seeds":
        per_seed = average_over_sets(
            {k: d.mean(axis=1) for k, d in per_set.items()}, sizes, average
        )
        stats = t_tests(per_seed, margin, plan.alpha)
        wide = t_tests(per_seed, None, 2 * plan.alpha)
        row = {**stats, "eq_low": wide["ci_low"], "eq_high": wide["ci_high"], "p_mc_se": math.nan}
        row["diff"] = observed
    else:
        draws = replicates.averaged(resample, average)
        low, high = np.percentile(draws, [50 * plan.alpha, 100 - 50 * plan.alpha])
        eq_low, eq_high = np.percentile(draws, [100 * plan.alpha, 100 - 100 * plan.alpha])
        p_value = bootstrap_p(draws)
        row = {
            "diff": observed,
            "ci_low": low,
            "ci_high": high,
            "eq_low": eq_low,
            "eq_high": eq_high,
            "p_value": p_value,
            "p_mc_se": monte_carlo_se(p_value, len(draws)),
            "tost_p": math.nan if margin is None else bootstrap_tost_p(draws, margin),
            "se": float(draws.std(ddof=1)),
        }
    scaled = ("diff", "ci_low", "ci_high", "eq_low", "eq_high", "se")
    return {k: 100 * v if k in scaled else v for k, v in row.items()}


def verdict_rows(
    family: list[tuple[str, pd.DataFrame]], plan: Plan, primary_only: bool = False
) -> pd.DataFrame:
    """Every comparison's primary and sensitivity rows (``primary_only``: the primary rows
    alone; their adjusted p-values and verdicts are the same), adjusted and with their
    verdicts."""
    has_clean = any(pairs["checked"].any() for _, pairs in family)
    rows = []
    for baseline, pairs in family:
        splits = {FULL: pairs, CLEAN: clean_pairs(pairs)}
        setting = pairs["setting"] if "setting" in pairs else pd.Series("", index=pairs.index)
        compared = pairs.assign(setting=setting)[["model", "method", "label", "setting"]]
        for key in compared.drop_duplicates().itertuples(index=False):
            prepared = {}
            for split, frame in splits.items():
                part = frame[(frame["model"] == key[0]) & (frame["label"] == key[2])]
                per_set, tasks, seeds = comparison_matrices(part)
                if per_set:
                    prepared[split] = (per_set, bootstrap_replicates(per_set, tasks), seeds)
            for role, resample, average, split in analyses(plan, has_clean):
                if split not in prepared or (primary_only and role != "primary"):
                    continue
                per_set, replicates, seeds = prepared[split]
                rows.append(
                    {
                        "model": key[0],
                        "label": key[2],
                        "setting": key[3],
                        "method": baseline,
                        "role": role,
                        "resample": resample,
                        "average": average,
                        "split": split,
                        "seeds": len(seeds),
                        "examples": sum(d.shape[1] for d in per_set.values()),
                        **analysis_row(per_set, replicates, resample, average, plan),
                    }
                )
    data = pd.DataFrame(rows)
    if data.empty:
        return data
    data["mdd"] = [mdd_factor() * se if se > 0 else math.nan for se in data["se"].fillna(0)]
    data["p_adjusted"] = math.nan
    data["tost_adjusted"] = math.nan
    for _, index in data.groupby(["model", "resample", "average", "split"]).groups.items():
        data.loc[index, "p_adjusted"] = adjust(data.loc[index, "p_value"], plan.correction)
        data.loc[index, "tost_adjusted"] = adjust(data.loc[index, "tost_p"], plan.correction)
    data["verdict"] = [
        verdict(p, t, plan.margin_pp, plan.alpha)
        for p, t in zip(data["p_adjusted"].fillna(1.0), data["tost_adjusted"].fillna(1.0))
    ]
    return data


def _without(label: str, setting: str) -> str:
    """The label without the parts its setting column shows: ``"stable_lora, lr=0.001"``,
    ``"lr=0.001"`` -> ``"stable_lora"``."""
    shown = set(setting.split(", "))
    return ", ".join(part for part in label.split(", ") if part not in shown)


def _interval(low: float, high: float) -> str:
    return "–" if not np.isfinite(low) else f"[{low:+.2f}, {high:+.2f}]"


def _p(p: float) -> str:
    return p_cell(p, math.nan)


def family_note(settings: pd.Series) -> str:
    """Which comparisons form a family when the methods run at several settings."""
    found = sorted(set(settings) - {""})
    if not found:
        return ""
    return (
        f" (the family: every setting and baseline of a model, here {len(found)} settings; a "
        "method's run is paired with the baseline's run of the same seed and setting)"
    )


@register_table
def verdicts(coll: Collection, seeds: str = "mean") -> Table | None:
    """The pre-declared primary analysis of each comparison with its sensitivity rows,
    Holm-adjusted p, equivalence test and verdict."""
    check_mode(seeds)
    plan = read_plan(coll.runs, coll.plan_options)
    family = family_pairs(coll)
    data = verdict_rows(family, plan)
    if data.empty:
        return None
    data["role_rank"] = (data["role"] != "primary").astype(int)
    order = {a: i for i, a in enumerate(analyses(plan, True))}
    data["analysis_rank"] = [
        order.get((r, s, a, sp), len(order))
        for r, s, a, sp in zip(data["role"], data["resample"], data["average"], data["split"])
    ]
    data = sort_frame(data, ["model", "label", "role_rank", "analysis_rank", "method"])
    data = data.drop(columns=["role_rank", "analysis_rank"]).reset_index(drop=True)
    level, equivalence_level = 100 * (1 - plan.alpha), 100 * (1 - 2 * plan.alpha)
    settings = data["setting"].fillna("")
    display = pd.DataFrame(
        {
            "model": data["model"],
            **({"setting": settings} if settings.ne("").any() else {}),
            "method": [_without(label, s) for label, s in zip(data["label"], settings)],
            "against": data["method"],
            "analysis": data["role"],
            "resampling": data["resample"].map(RESAMPLINGS),
            "average": data["average"].map(AVERAGES),
            "split": data["split"],
            "seeds × questions": data["seeds"].astype(str) + " × " + data["examples"].astype(str),
            "Δ (pp)": [num_text(d, 2, signed=True) for d in data["diff"]],
            f"{level:g}% CI": [
                _interval(lo, hi) for lo, hi in zip(data["ci_low"], data["ci_high"])
            ],
            f"{equivalence_level:g}% CI": [
                _interval(lo, hi) for lo, hi in zip(data["eq_low"], data["eq_high"])
            ],
            "p (MC SE)": [p_cell(p, e) for p, e in zip(data["p_value"], data["p_mc_se"])],
            f"p {plan.correction}": [_p(p) for p in data["p_adjusted"]],
            f"TOST p {plan.correction}": [_p(p) for p in data["tost_adjusted"]],
            "MDD (pp)": [num_text(m, 2) for m in data["mdd"]],
            "verdict": data["verdict"],
        }
    )
    if not settings.ne("").any():  # one setting per method: the CSV as before settings
        data = data.drop(columns="setting")
    scored = pd.concat([pairs for _, pairs in family], ignore_index=True)
    margin = "no margin declared" if plan.margin_pp is None else f"±{plan.margin_pp:g} pp"
    notes = [
        plan_note(plan, "clean subset" if scored["checked"].any() else "full split"),
        (
            f"Split: clean = {split_note(scored)}; full = every scored item."
            if scored["checked"].any()
            else f"Split: {split_note(scored)}."
        ),
        f"Verdict, from the {plan.correction}-adjusted p-values across the comparisons of each "
        f"analysis{family_note(settings)} (alpha {plan.alpha:g}): 'different' when the "
        "two-sided test rejects, else "
        f"'equivalent within the margin' ({margin}) when both one-sided tests of TOST reject "
        f"(the {equivalence_level:g}% interval inside the margin), else 'inconclusive'.",
        f"Bootstrap: {BOOTSTRAP_SAMPLES:,} resamples (numpy seed {BOOTSTRAP_SEED}), the seeds "
        "redrawn once per resample for every task the same runs score, the questions per task; "
        "p twice the smaller tail at or beyond 0 (MC SE sqrt(p(1 - p)/B)). Questions only: each "
        "question's seed mean resampled. Seeds: the one-sample t test and interval over the "
        "per-seed differences (scipy; TOST as statsmodels' ttost_paired).",
        "The confidence interval rules an effect in or out; MDD is a design figure (2.80 "
        "standard errors: the difference a two-sided 5% test detects with 80% power).",
        *unpaired_note(accuracy_runs(coll.runs)),
    ]
    return Table(
        "verdicts",
        "Verdicts: the pre-declared primary analysis and its sensitivity rows (percentage points)",
        display,
        data,
        notes,
        key_columns=8 + int(settings.ne("").any()),
    )
