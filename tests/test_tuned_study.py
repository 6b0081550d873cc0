"""The analysis of a tuned study: lr selection on validation (``tuned_lr`` and its record),
and the example-level paired tests (``paired_examples``, ``paired_bootstrap``) checked against
scipy on hand-built tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tables_of, write_examples, write_run
from scipy.stats import binomtest, chi2

from analysis.collect import collect
from analysis.report import main as report_main
from analysis.tables.paired_examples import (
    BOOTSTRAP_SAMPLES,
    bootstrap_differences,
    mcnemar_test,
    mdd_factor,
)
from analysis.tables.tuned_lr import PICKS_FILE, TIE_RULE, pick_learning_rates


def discordant(n: int, b: int, c: int, both: int) -> tuple[list[bool], list[bool]]:
    """(method, reference) correctness of n examples with b, c discordant and ``both`` right."""
    method = [True] * b + [False] * c + [True] * both
    reference = [False] * b + [True] * c + [True] * both
    rest = n - len(method)
    return method + [False] * rest, reference + [False] * rest


# ---------------------------------------------------------------------------- McNemar
@pytest.mark.parametrize(("b", "c"), [(3, 9), (0, 7), (12, 12), (30, 14), (61, 40)])
def test_mcnemar_equals_scipy_exact_binomial_or_corrected_chi_square(tmp_path, b, c):
    n = 200
    method, reference = discordant(n, b, c, both=90)
    for name, hits, acc in (("lora", reference, 0.5), ("stable_lora", method, 0.6)):
        run = write_run(tmp_path, name, task="bbc_news", method=name, acc=acc)
        write_examples(run, {"bbc_news": hits})
    table = tables_of(tmp_path)["paired_examples"]
    row = table.data.iloc[0]
    assert (row["b"], row["c"], row["n"]) == (b, c, n)
    if b + c < 25:
        expected = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
        assert row["test"] == "exact"
    else:
        expected = chi2.sf((abs(b - c) - 1) ** 2 / (b + c), 1)
        assert row["test"] == "chi2"
    assert row["p_value"] == pytest.approx(expected, rel=1e-9)
    assert row["diff"] == pytest.approx(100 * (b - c) / n)
    assert row["acc"] - row["acc_reference"] == pytest.approx(row["diff"])
    se = np.sqrt(((b + c) / n - ((b - c) / n) ** 2) / n)
    assert row["mdd"] == pytest.approx(100 * 2.8016 * se, rel=1e-4)
    assert "MDD" in table.markdown()


def test_no_discordant_example_has_no_mdd(tmp_path):
    for name in ("lora", "stable_lora"):
        write_examples(write_run(tmp_path, name, method=name), {"bbc_news": [True, False] * 5})
    tables = tables_of(tmp_path)
    row = tables["paired_examples"].data.iloc[0]
    assert (row["b"], row["c"], row["p_value"]) == (0, 0, 1.0) and np.isnan(row["mdd"])
    assert tables["paired_examples"].display["MDD (pp)"].tolist() == ["–"]
    assert np.isnan(tables["paired_bootstrap"].data.iloc[0]["mdd"])


def test_mcnemar_helper_and_mdd_factor():
    assert mcnemar_test(0, 0)[0] == 1.0
    assert mcnemar_test(2, 10) == (pytest.approx(binomtest(2, 12, 0.5).pvalue), "exact")
    assert mdd_factor() == pytest.approx(1.959964 + 0.841621, abs=1e-5)


# ---------------------------------------------------------------------------- bootstrap
def test_paired_bootstrap_over_seeds_and_examples(tmp_path):
    rng = np.random.default_rng(1)
    sets = {"arc_easy": 120, "bbc_news": 80}
    truth = {}
    for seed in (0, 1, 2):
        reference = {name: list(rng.random(n) < 0.5) for name, n in sets.items()}
        method = {
            name: [h or (rng.random() < 0.2) for h in hits] for name, hits in reference.items()
        }
        for name, hits in (("lora", reference), ("stable_lora", method)):
            run = write_run(tmp_path, f"{name}-{seed}", task="arc_bbc", method=name, seed=seed,
                            final={"eval/acc": 0.5, **{f"eval/acc/{k}": 0.5 for k in sets}})  # fmt: skip
            write_examples(run, hits)
        for name in sets:
            truth.setdefault(name, []).append(np.mean(method[name]) - np.mean(reference[name]))
    data = tables_of(tmp_path)["paired_bootstrap"].data.set_index("eval_set")
    assert list(data.index) == ["arc_easy", "bbc_news", "Avg", "Avg over questions"]
    for name in sets:
        assert data.loc[name, "diff"] == pytest.approx(100 * np.mean(truth[name]))
        assert data.loc[name, "seeds"] == 3 and data.loc[name, "examples"] == sets[name]
    average = np.mean([np.mean(truth[name]) for name in sets])
    assert data.loc["Avg", "diff"] == pytest.approx(100 * average)
    pooled = sum(n * np.mean(truth[name]) for name, n in sets.items()) / sum(sets.values())
    assert data.loc["Avg over questions", "diff"] == pytest.approx(100 * pooled)
    for name in data.index:  # the method only ever gains: a positive interval
        row = data.loc[name]
        assert 0 < row["ci_low"] < row["diff"] < row["ci_high"] and row["p_value"] < 0.01
        assert row["mdd"] == pytest.approx(mdd_factor() * row["se"])
    mcnemar = tables_of(tmp_path)["paired_examples"].data
    assert len(mcnemar) == 6 and (mcnemar["c"] == 0).all()  # per task and seed


def test_stable_lora_against_each_baseline(tmp_path):
    # Stable-LoRA gains over LoRA on both tasks and equals LoRA+ example for example; rsLoRA
    # has seed 0 only, so its comparison rests on that seed.
    rng = np.random.default_rng(3)
    sets = {"arc_easy": 150, "bbc_news": 60}
    gains = []
    for seed in (0, 1):
        lora = {name: list(rng.random(n) < 0.5) for name, n in sets.items()}
        stable = {name: [h or (rng.random() < 0.3) for h in hits] for name, hits in lora.items()}
        gains.append({name: np.mean(stable[name]) - np.mean(lora[name]) for name in sets})
        methods = {"lora": lora, "loraplus": stable, "stable_lora": stable}
        if seed == 0:
            methods["rslora"] = lora
        for name, hits in methods.items():
            run = write_run(tmp_path, f"{name}-{seed}", task="arc_bbc", method=name, seed=seed,
                            final={"eval/acc": 0.5, **{f"eval/acc/{k}": 0.5 for k in sets}})  # fmt: skip
            write_examples(run, hits)
    table = tables_of(tmp_path)["stable_vs_baselines"]
    data = table.data.set_index(["method", "eval_set"])
    assert list(table.display["against"].unique()) == ["lora", "rslora", "loraplus"]
    assert set(table.data["label"]) == {"stable_lora"}
    for name in sets:
        assert data.loc[("lora", name), "diff"] == pytest.approx(
            100 * np.mean([g[name] for g in gains])
        )
        assert data.loc[("rslora", name), "diff"] == pytest.approx(100 * gains[0][name])
        assert data.loc[("rslora", name), "seeds"] == 1
        assert data.loc[("loraplus", name), "diff"] == 0
        assert np.isnan(data.loc[("loraplus", name), "mdd"])
    avg = data.loc[("lora", "Avg")]
    assert 0 < avg["ci_low"] < avg["diff"] < avg["ci_high"] and avg["p_value"] < 0.01
    # against LoRA it is paired_bootstrap's comparison, number for number
    bootstrap = tables_of(tmp_path)["paired_bootstrap"].data
    mine = bootstrap[bootstrap["method"] == "stable_lora"].set_index("eval_set")
    for column in ("diff", "ci_low", "ci_high", "p_value", "mdd"):
        assert data.xs("lora")[column].to_dict() == pytest.approx(mine[column].to_dict())
    # no Stable-LoRA, or no baseline: no table
    alone = tmp_path / "alone"
    write_examples(write_run(alone, "s", method="stable_lora"), {"bbc_news": [True, False]})
    assert "stable_vs_baselines" not in tables_of(alone)


def test_bootstrap_of_identical_methods_is_zero_and_reproducible():
    hits = np.array([[1, 0, 1, 1], [0, 0, 1, 1]], dtype=float)
    draws = bootstrap_differences({"a": (hits, hits)})
    assert draws.shape == (BOOTSTRAP_SAMPLES,) and not draws.any()
    better = np.ones_like(hits)
    first = bootstrap_differences({"a": (better, hits)}, samples=200)
    again = bootstrap_differences({"a": (better, hits)}, samples=200)
    assert np.array_equal(first, again) and first.min() >= 0
    assert first.mean() == pytest.approx(1 - hits.mean(), abs=0.05)


# ---------------------------------------------------------------------------- lr selection
def test_tuned_lr_picks_the_best_mean_validation_score_smaller_lr_on_ties(tmp_path):
    grid = (1e-4, 3e-4, 1e-3)
    scores = {
        "lora": {1e-4: (0.60, 0.62), 3e-4: (0.70, 0.72), 1e-3: (0.65, 0.65)},
        "rslora": {1e-4: (0.70, 0.70), 3e-4: (0.69, 0.71), 1e-3: (0.60, 0.60)},  # a tie
        "stable_lora": {1e-4: (0.50, 0.50), 3e-4: (0.55, 0.55), 1e-3: (0.90, None)},
    }
    for method, by_lr in scores.items():
        for lr in grid:
            for seed, acc in enumerate(by_lr[lr]):
                status = "completed" if acc is not None else "diverged"
                write_run(tmp_path, f"{method}-{lr}-{seed}", method=method, seed=seed,
                          acc=acc or 0.0, status=status,
                          config={"optim.lr": lr, "task.eval_split": "validation"})  # fmt: skip
    write_run(tmp_path, "loraplus-x", method="loraplus", acc=0.1, status="failed",
              config={"optim.lr": 1e-4, "task.eval_split": "validation"})  # fmt: skip
    data = pick_learning_rates(collect(tmp_path).runs)
    picks = dict(zip(data.loc[data["picked"], "method"], data.loc[data["picked"], "optim.lr"]))
    # lora: the best mean; rslora: 0.70 at 1e-4 and 3e-4, the smaller wins; stable_lora: the
    # diverged seed leaves 0.90 over one completed run; loraplus: nothing completed, no pick
    assert picks == {"lora": 3e-4, "rslora": 1e-4, "stable_lora": 1e-3}
    assert len(data) == 10 and data["picked"].sum() == 3
    edges = dict(zip(data.loc[data["picked"], "method"], data.loc[data["picked"], "edge"]))
    assert edges == {"lora": False, "rslora": True, "stable_lora": True}

    out = tmp_path / "report"
    report_main([str(tmp_path), "--out", str(out), "--tables", "tuned_lr", "--no-plots"])
    record = json.loads((out / PICKS_FILE).read_text())
    assert record["split"] == "validation" and record["tie_rule"] == TIE_RULE
    assert {p["method"]: p["lr"] for p in record["picks"]} == picks
    stable = next(p for p in record["picks"] if p["method"] == "stable_lora")
    assert stable["seeds"] == 1 and stable["on_grid_edge"] and stable["score"] == 0.9
    markdown = (out / "tables" / "tuned_lr.md").read_text()
    assert TIE_RULE in markdown and "yes (grid edge)" in markdown


def test_tuned_lr_picks_the_lowest_mean_of_a_loss_like_main_metric(tmp_path):
    # A dialogue task scored by its held-out loss: the best lr is the one with the lowest
    # mean loss (the highest would be the worst), next to an accuracy task in the same sweep.
    losses = {1e-4: (2.0, 2.2), 1e-3: (1.5, 1.7), 1e-2: (3.0, 3.4)}
    for lr, values in losses.items():
        for seed, loss in enumerate(values):
            write_run(tmp_path, f"chat-{lr}-{seed}", task="chatterbot", seed=seed, acc=loss,
                      main_metric="eval/loss",
                      config={"optim.lr": lr, "task.eval_split": "validation"})  # fmt: skip
        write_run(tmp_path, f"bbc-{lr}", acc={1e-4: 0.5, 1e-3: 0.6, 1e-2: 0.7}[lr],
                  config={"optim.lr": lr, "task.eval_split": "validation"})  # fmt: skip
    data = pick_learning_rates(collect(tmp_path).runs)
    picked = data[data["picked"]]
    assert dict(zip(picked["task"], picked["optim.lr"])) == {"chatterbot": 1e-3, "bbc_news": 1e-2}
    assert picked.set_index("task").loc["chatterbot", "value"] == pytest.approx(1.6)
    assert "sign" not in data


def test_lr_sweep_plot_draws_each_methods_selection_curve_with_its_pick(tmp_path, monkeypatch):
    from analysis.plots import build_plots
    from analysis.plots.selection import lr_sweep_points

    scores = {
        "lora": {1e-4: (0.60, 0.64), 1e-3: (0.70, 0.70)},
        "loraplus": {1e-4: (0.8,), 1e-3: (0.5,)},
    }
    for method, by_lr in scores.items():
        for lr, values in by_lr.items():
            for seed, acc in enumerate(values):
                write_run(tmp_path, f"{method}-{lr}-{seed}", method=method, seed=seed, acc=acc,
                          config={"optim.lr": lr, "task.eval_split": "validation"})  # fmt: skip
    points = lr_sweep_points(collect(tmp_path)).set_index(["method", "optim.lr"])
    assert points["value"].to_dict() == pytest.approx(
        {
            ("lora", 1e-4): 62.0,
            ("lora", 1e-3): 70.0,
            ("loraplus", 1e-4): 80.0,
            ("loraplus", 1e-3): 50.0,
        }
    )  # accuracies in %
    assert points.loc[("lora", 1e-4), "std"] == pytest.approx(100 * np.std([0.60, 0.64], ddof=1))
    assert points.index[points["picked"]].tolist() == [("lora", 1e-3), ("loraplus", 1e-4)]
    from matplotlib.collections import PathCollection

    from analysis.plots import drawing

    drawn, save = [], drawing._save

    def keep_the_figure(plt, fig, *args, **kwargs):
        drawn.append(fig)
        return save(plt, fig, *args, **kwargs)

    monkeypatch.setattr(drawing, "_save", keep_the_figure)
    paths = build_plots(collect(tmp_path), tmp_path / "plots", ["lr_sweep"])
    assert [p.name for p in paths] == ["lr_sweep.png", "lr_sweep.pdf"]
    assert paths[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert paths[1].read_bytes().startswith(b"%PDF-")
    # what the figure shows: a curve per method through its mean scores, the pick ringed
    (fig,) = drawn
    (ax,) = [ax for ax in fig.axes if ax.has_data()]
    assert ax.get_xscale() == "log"
    curves = {
        bar.get_label(): list(zip(bar.lines[0].get_xdata(), bar.lines[0].get_ydata()))
        for bar in ax.containers
    }
    assert curves == {
        "lora": [(1e-4, pytest.approx(62.0)), (1e-3, pytest.approx(70.0))],
        "loraplus": [(1e-4, pytest.approx(80.0)), (1e-3, pytest.approx(50.0))],
    }
    rings = [c.get_offsets().tolist() for c in ax.collections if isinstance(c, PathCollection)]
    assert rings == [[[1e-3, pytest.approx(70.0)]], [[1e-4, pytest.approx(80.0)]]]
    # a sweep at one lr has no selection curve
    one_lr = tmp_path / "one"
    write_run(one_lr, "a", acc=0.5)
    write_run(one_lr, "b", method="stable_lora", acc=0.6)
    assert lr_sweep_points(collect(one_lr)).empty
    assert build_plots(collect(one_lr), one_lr / "plots", ["lr_sweep"]) == []


def test_a_method_gets_no_pick_until_it_has_run_at_every_lr_of_the_grid(tmp_path):
    # A selection over several sittings: lora ran the whole grid, stable_lora two of its lrs
    # so far (the one it has not run would not be picked by the mean alone anyway).
    runs = {"lora": {1e-4: 0.60, 1e-3: 0.70}, "stable_lora": {1e-3: 0.90}}
    for method, by_lr in runs.items():
        for lr, acc in by_lr.items():
            write_run(tmp_path, f"{method}-{lr}", method=method, acc=acc,
                      config={"optim.lr": lr, "task.eval_split": "validation"})  # fmt: skip
    data = pick_learning_rates(collect(tmp_path).runs)
    picked = dict(zip(data["method"], data["picked"]))
    incomplete = dict(zip(data["method"], data["incomplete"]))
    assert picked == {"lora": True, "stable_lora": False}
    assert incomplete == {"lora": False, "stable_lora": True}
    out = tmp_path / "report"
    report_main([str(tmp_path), "--out", str(out), "--tables", "tuned_lr", "--no-plots"])
    record = json.loads((out / PICKS_FILE).read_text())
    assert [p["method"] for p in record["picks"]] == ["lora"]
    assert "not yet (grid incomplete)" in (out / "tables" / "tuned_lr.md").read_text()


def test_a_diverged_run_completes_the_grid_but_is_never_picked(tmp_path):
    # The largest lr diverged for lora+ (a result: too large), and only failed for lora (no
    # result yet: the run is to be redone); rslora diverged everywhere.
    runs = {
        "loraplus": {1e-4: ("completed", 0.6), 1e-3: ("completed", 0.7), 1e-2: ("diverged", 0)},
        "lora": {1e-4: ("completed", 0.6), 1e-3: ("completed", 0.7), 1e-2: ("failed", 0)},
        "rslora": {1e-4: ("diverged", 0), 1e-3: ("diverged", 0), 1e-2: ("diverged", 0)},
    }
    for method, by_lr in runs.items():
        for lr, (status, acc) in by_lr.items():
            write_run(tmp_path, f"{method}-{lr}", method=method, acc=acc, status=status,
                      config={"optim.lr": lr, "task.eval_split": "validation"})  # fmt: skip
    data = pick_learning_rates(collect(tmp_path).runs)
    picked = data[data["picked"]]
    assert dict(zip(picked["method"], picked["optim.lr"])) == {"loraplus": 1e-3}
    assert not picked["edge"].any()  # 1e-3 lies inside loraplus's grid: 1e-2 was tried
    incomplete = data.groupby("method")["incomplete"].all().to_dict()
    assert incomplete == {"lora": True, "loraplus": False, "rslora": False}
    assert "ended" not in data
