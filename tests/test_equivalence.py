"""The verdict machinery of :mod:`analysis.tables.equivalence` and the ``verdicts`` table:
TOST and the t analogue against statsmodels, Holm against ``multipletests``, the two-sided
bootstrap p of a null difference, the seed draw shared by a mixture's tasks, the verdict on
made-up runs, the clean subset, and the analysis plan read from the runs' config."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from helpers import flipped, tables_of, write_examples, write_run

from analysis.collect import collect
from analysis.report import main as report_main
from analysis.tables.equivalence import (
    BOOTSTRAP_SAMPLES,
    Plan,
    PlanError,
    adjust,
    bootstrap_p,
    bootstrap_replicates,
    bootstrap_tost_p,
    monte_carlo_se,
    parse_plan_options,
    read_plan,
    t_tests,
    verdict,
)
from experiments.catalog import ROOT, plan_options
from stablelora.config.identity import config_hash
from stablelora.contamination import write_record

MIXTURE = {"eval/acc": 0.5, "eval/acc/arc_easy": 0.5, "eval/acc/bbc_news": 0.5}


# ---------------------------------------------------------------------------- the tests
def test_bootstrap_tost_p_counts_the_draws_beyond_each_margin():
    draws = np.array([-0.03, -0.01, 0.0, 0.005, 0.01, 0.02, 0.025, 0.04])
    # H0-: diff <= -0.02 -> 1 draw of 8; H0+: diff >= +0.02 -> 3 draws of 8
    assert bootstrap_tost_p(draws, 0.02) == pytest.approx(3 / 8)
    assert bootstrap_tost_p(draws, 0.05) == 0.0
    # equivalence at alpha <=> the (alpha, 1 - alpha) percentile interval inside the margin
    rng = np.random.default_rng(0)
    for margin in (0.004, 0.006, 0.01):
        sample = rng.normal(0.001, 0.002, 5000)
        low, high = np.percentile(sample, [5, 95])
        assert (bootstrap_tost_p(sample, margin) < 0.05) == (-margin < low and high < margin)


def test_t_tests_match_scipy_and_statsmodels_ttost_paired():
    from scipy import stats
    from statsmodels.stats.weightstats import ttost_paired

    values = np.array([0.004, 0.002, 0.009, -0.001])
    out = t_tests(values, margin=0.01, alpha=0.05)
    zeros = np.zeros_like(values)
    assert out["tost_p"] == pytest.approx(ttost_paired(values, zeros, -0.01, 0.01)[0])
    assert out["p_value"] == pytest.approx(stats.ttest_rel(values, zeros).pvalue)
    low, high = stats.t.interval(0.95, 3, loc=values.mean(), scale=stats.sem(values))
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    # one seed: no spread, no test
    assert np.isnan(t_tests(values[:1], 0.01, 0.05)["p_value"])


def test_holm_equals_multipletests_and_by_hand():
    from statsmodels.stats.multitest import multipletests

    p = [0.01, 0.04, 0.03]
    assert adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06])  # 3p, max(2p, .), p
    assert adjust(p, "holm") == pytest.approx(multipletests(p, method="holm")[1])
    with_gap = adjust([0.01, np.nan, 0.04], "holm")  # a row without a test is not counted
    assert np.isnan(with_gap[1]) and with_gap[[0, 2]] == pytest.approx([0.02, 0.04])
    assert adjust(p, "none") == pytest.approx(p)


def test_verdict_words_follow_the_adjusted_p_values():
    assert verdict(0.01, 0.5, 1.0, 0.05) == "different"
    assert verdict(0.3, 0.01, 1.0, 0.05) == "equivalent within ±1 pp"
    assert verdict(0.3, 0.2, 1.0, 0.05) == "inconclusive"
    assert verdict(0.3, 0.0, None, 0.05) == "inconclusive"  # no margin: no equivalence


def test_bootstrap_p_of_no_true_difference_is_near_one_not_one_half():
    # equal discordant counts (b = c = 30 of 200 in every seed): the draws centre on 0, so
    # each tail holds about half of them and the two-sided p (twice the smaller) is near 1
    diff = np.zeros((3, 200))
    diff[:, :30], diff[:, 30:60] = 1.0, -1.0
    draws = bootstrap_replicates({"a": diff}).averaged("seeds_and_questions", "tasks")
    p = bootstrap_p(draws)
    assert p > 0.9
    assert monte_carlo_se(p, BOOTSTRAP_SAMPLES) == pytest.approx(np.sqrt(p * (1 - p) / 1e4))


def test_no_true_difference_through_the_tables(tmp_path):
    rng = np.random.default_rng(5)
    for seed in (0, 1, 2):
        reference = [bool(h) for h in rng.random(300) < 0.5]
        method = flipped(reference, 20, 20, rng)  # b = c = 20
        for name, hits in (("lora", reference), ("stable_lora", method)):
            run = write_run(tmp_path, f"{name}-{seed}", method=name, seed=seed)
            write_examples(run, {"bbc_news": hits})
    tables = tables_of(tmp_path)
    assert tables["paired_bootstrap"].data.iloc[0]["p_value"] > 0.9
    row = tables["verdicts"].data.iloc[0]
    assert row["role"] == "primary" and row["p_value"] > 0.9 and row["verdict"] == "inconclusive"


# ---------------------------------------------------------------------------- shared seed draw
def test_one_seed_draw_per_replicate_is_shared_by_the_tasks_of_one_run():
    # Seed 0's runs differ on every question, seeds 1 and 2 on none: every replicate's value
    # is the weight its seed draw gives seed 0, whatever the question draw; with one draw
    # shared by both tasks the two tasks' replicates are equal, with a draw each they are not.
    sets = {"arc_easy": np.zeros((3, 10)), "bbc_news": np.zeros((3, 25))}
    for diff in sets.values():
        diff[0] = 1.0
    shared = bootstrap_replicates(sets, samples=2000).per_set("seeds_and_questions")
    assert np.array_equal(shared["arc_easy"], shared["bbc_news"])
    assert set(np.round(3 * shared["arc_easy"], 9)) == {0, 1, 2, 3}
    apart = bootstrap_replicates(sets, {"arc_easy": "a", "bbc_news": "b"}, samples=2000)
    apart_sets = apart.per_set("seeds_and_questions")
    assert not np.array_equal(apart_sets["arc_easy"], apart_sets["bbc_news"])
    # questions only: the seeds fixed, every replicate the seed mean
    assert np.allclose(apart.per_set("questions")["arc_easy"], 1 / 3)


def test_a_mixtures_task_average_keeps_the_spread_of_its_shared_seed(tmp_path):
    # The same design through the tables: one run per seed scores both eval sets, so the task
    # average varies with the seed draw exactly as each task does (a draw per task would
    # shrink its spread by about sqrt(2)).
    sizes = {"arc_easy": 10, "bbc_news": 25}
    for seed in (0, 1, 2):
        for name in ("lora", "stable_lora"):
            hits = {k: [name == "stable_lora" or seed > 0] * n for k, n in sizes.items()}
            run = write_run(tmp_path, f"{name}-{seed}", task="arc_bbc", method=name, seed=seed,
                            final=MIXTURE)  # fmt: skip
            write_examples(run, hits)
    data = tables_of(tmp_path)["paired_bootstrap"].data.set_index("eval_set")
    assert data.loc["Avg", "se"] == pytest.approx(data.loc["arc_easy", "se"])
    assert data.loc["Avg", "se"] == pytest.approx(data.loc["bbc_news", "se"])


# ---------------------------------------------------------------------------- verdicts


def write_family(root, n=2000, config=None, record=None) -> None:
    """Stable-LoRA and three baselines x 3 seeds on one task of ``n`` questions (here for
    n = 2000): LoRA equal up to 5 + 5 flips (equivalent), LoRA+ 300 questions behind
    (different), rsLoRA 300 + 280 discordant (1 pp apart, too noisy to tell: inconclusive)."""
    rng = np.random.default_rng(11)
    for seed in (0, 1, 2):
        stable = [bool(h) for h in rng.random(n) < 0.5]
        runs = {
            "stable_lora": stable,
            "lora": flipped(stable, n // 400, n // 400, rng),
            "loraplus": flipped(stable, 0, 3 * n // 20, rng),
            "rslora": flipped(stable, 7 * n // 50, 3 * n // 20, rng),
        }
        for name, hits in runs.items():
            run = write_run(root, f"{name}-{seed}", method=name, seed=seed, config=config)
            write_examples(run, {"bbc_news": hits})
            if record is not None:
                write_record(run, record)


def test_verdicts_on_equivalent_different_and_inconclusive_runs(tmp_path):
    write_family(tmp_path, config={"analysis.primary.margin_pp": 1.0,
                                   "analysis.primary.resample": "seeds_and_questions"})  # fmt: skip
    table = tables_of(tmp_path)["verdicts"]
    data = table.data
    primary = data[data["role"] == "primary"].set_index("method")
    assert primary["verdict"].to_dict() == {
        "lora": "equivalent within ±1 pp",
        "rslora": "inconclusive",
        "loraplus": "different",
    }
    assert primary.loc["loraplus", "diff"] == pytest.approx(15.0)
    # Holm across the three comparisons of the primary analysis
    assert primary["p_adjusted"].to_numpy() == pytest.approx(
        adjust(primary["p_value"].to_numpy(), "holm")
    )
    # sensitivity rows: questions-only bootstrap, seed t interval, the pooled average
    lora = data[data["method"] == "lora"]
    assert list(lora["role"]) == ["primary", "sensitivity", "sensitivity", "sensitivity"]
    assert set(lora["resample"]) == {"seeds_and_questions", "questions", "seeds"}
    assert set(lora["average"]) == {"tasks", "questions"} and set(lora["split"]) == {"full"}
    markdown = table.markdown()
    assert "Declared before the runs" in markdown and "not checked" in markdown


def test_the_clean_subset_is_the_headline_and_the_full_split_a_sensitivity_row(tmp_path):
    left_out = [f"bbc_news-{i}" for i in range(40)]
    record = {"split_rule": "legacy", "tasks": {"bbc_news": {
        "in_train": {"exact": left_out[:30], "near": left_out[30:35]},
        "in_validation": {"exact": [], "near": []}, "repeats": left_out[35:]}}}  # fmt: skip
    write_family(tmp_path, n=400, record=record)
    tables = tables_of(tmp_path)
    data = tables["verdicts"].data
    lora = data[data["method"] == "lora"].set_index(["role", "split", "resample", "average"])
    assert lora.loc[("primary", "clean"), "examples"].tolist() == [360]
    full = lora.loc[("sensitivity", "full")]
    assert full["examples"].tolist() == [400]
    assert "40 of 400 scored items left out" in tables["verdicts"].markdown()
    bootstrap = tables["paired_bootstrap"].data
    assert set(bootstrap["examples"]) == {360}
    mcnemar = tables["paired_examples"].data
    assert set(mcnemar["n"]) == {360}


# ---------------------------------------------------------------------------- plan
def test_the_plan_defaults_are_conf_config_yamls():
    declared = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())["analysis"]["primary"]
    defaults = Plan()
    assert {k: getattr(defaults, k) for k in declared} == declared


def test_the_plan_block_leaves_the_run_identity_alone():
    base = {"seed": 0, "optim": {"lr": 1e-4}}
    assert config_hash(base) == config_hash({**base, "analysis": {"primary": {"margin_pp": 1}}})


def test_plan_read_from_the_runs_config_and_an_error_when_they_disagree(tmp_path):
    for seed, margin in ((0, 1.0), (1, 1.0)):
        write_run(tmp_path, f"a{seed}", seed=seed, config={
            "analysis.primary.margin_pp": margin, "analysis.primary.resample": "questions"})  # fmt: skip
    plan = read_plan(collect(tmp_path).runs)
    assert (plan.margin_pp, plan.resample, plan.source) == (1.0, "questions", "runs")
    with pytest.raises(PlanError, match="contradicts"):
        read_plan(collect(tmp_path).runs, {"margin_pp": 2.0})
    # The preset's own values, as experiments.reproduce passes them, agree with the runs'.
    agreed = read_plan(collect(tmp_path).runs, {"margin_pp": 1.0, "resample": "questions"})
    assert (agreed.margin_pp, agreed.source) == (1.0, "runs")
    write_run(tmp_path, "a2", seed=2, config={
        "analysis.primary.margin_pp": 0.5, "analysis.primary.resample": "questions"})  # fmt: skip
    with pytest.raises(PlanError, match="2 different analysis plans"):
        read_plan(collect(tmp_path).runs)
    with pytest.raises(SystemExit, match="^analysis.report: the runs declare 2"):
        report_main([str(tmp_path), "--out", str(tmp_path / "r"), "--tables", "verdicts",
                     "--no-plots"])  # fmt: skip


def test_plan_given_at_report_time_is_said_to_come_after_the_runs(tmp_path):
    write_family(tmp_path, n=300)
    options = ["margin_pp=1.0", "declared=after_results", "margin_rule=the MDD it was powered for"]
    out = tmp_path / "report"
    report_main([str(tmp_path), "--out", str(out), "--tables", "verdicts", "--no-plots",
                 "--plan", *options])  # fmt: skip
    text = (out / "tables" / "verdicts.md").read_text()
    assert "Declared AFTER the results were seen (not in the runs' config.yaml" in text
    assert "margin ±1 pp (rule: the MDD it was powered for)" in text
    assert parse_plan_options(["margin_pp=null"]) == {"margin_pp": None}
    with pytest.raises(PlanError):
        parse_plan_options(["margin=1"])
    with pytest.raises(PlanError, match="resample"):
        read_plan(collect(tmp_path).runs, {"resample": "runs"})


def test_the_tuned_study_declares_its_margin_after_the_results():
    options = dict(o.split("=", 1) for o in plan_options("tuned_final", "cpu"))
    assert options["margin_pp"] == "1.0" and options["declared"] == '"after_results"'
    assert "0.96" in options["margin_rule"]
    plan = read_plan(collect(ROOT / "results/cpu/cpu_tuned_final/runs").runs,
                     parse_plan_options([f"{k}={v}" for k, v in options.items()]))  # fmt: skip
    assert plan.source == "report" and plan.margin_pp == 1.0
