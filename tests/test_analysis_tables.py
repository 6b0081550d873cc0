"""analysis/ on small synthetic records: every table's numbers and its published
comparison, seed protocols, lr selection and width fits, without training anything."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import check_latex, tables_of, write_run

from analysis import published
from analysis.collect import collect
from analysis.plots import build_plots
from analysis.tables import build_tables, latex_escape, select_learning_rate


# ---------------------------------------------------------------------------- synthetic
def test_table1_published_average_and_difference(tmp_path):
    accuracies = {"lora": [0.60, 0.62, 0.61], "stable_lora": [0.64, 0.66, 0.65]}
    for method, values in accuracies.items():
        for seed, acc in enumerate(values):
            for offset, task in enumerate(published.QA_TASKS):
                write_run(
                    tmp_path,
                    f"{method}-{task}-{seed}",
                    model="qwen2_0.5b",
                    task=task,
                    method=method,
                    seed=seed,
                    acc=acc + offset / 100,
                )
    for mode in ("mean", "best"):
        table = tables_of(tmp_path, mode)["table1"]
        data = table.data.set_index("method")
        for method, values in accuracies.items():
            per_seed = pd.Series(values) * 100 + 2  # the tasks' mean offset is 2 points
            ours = per_seed.max() if mode == "best" else per_seed.mean()
            assert data.loc[method, "avg"] == pytest.approx(ours)
            paper = published.TABLE1_QA_AVERAGE["qwen2_0.5b"][method]
            assert data.loc[method, "paper"] == paper
            assert data.loc[method, "diff"] == pytest.approx(ours - paper)
        assert list(table.display.columns[-2:]) == ["Paper", "Δ"]
    layout = tables_of(tmp_path)["table1_avg"].display
    assert list(layout["source"]) == ["ours", "paper", "Δ"]
    assert layout.loc[1, "stable_lora"] == "64.01"


def test_table1_best_is_the_best_seed_per_task_beside_a_mean_report(tmp_path):
    # The best seed differs by task: best-of averages 70 (bbc) and 50 (obqa), no single seed.
    for seed, (bbc, obqa) in enumerate([(0.70, 0.40), (0.60, 0.50)]):
        write_run(tmp_path, f"bbc-{seed}", task="bbc_news", seed=seed, acc=bbc)
        write_run(tmp_path, f"obqa-{seed}", task="obqa", seed=seed, acc=obqa)
    tables = tables_of(tmp_path, "mean")
    best = tables["table1_best"].data.iloc[0]
    mean = tables["table1"].data.iloc[0]
    assert best["bbc_news"] == pytest.approx(70.0) and best["obqa"] == pytest.approx(50.0)
    assert best["avg"] == pytest.approx(60.0)
    assert mean["avg"] == pytest.approx(55.0) and mean["bbc_news"] == pytest.approx(65.0)
    assert "best" in tables["table1_best"].title


def test_seeds_spread_is_the_sample_std(tmp_path):
    accuracies = [0.60, 0.62, 0.67]
    for seed, acc in enumerate(accuracies):
        write_run(tmp_path, f"lora-{seed}", seed=seed, acc=acc)
    row = tables_of(tmp_path)["table1"].data.iloc[0]
    percent = [100 * acc for acc in accuracies]
    mean = sum(percent) / 3
    sample_std = math.sqrt(sum((v - mean) ** 2 for v in percent) / (3 - 1))
    assert row["bbc_news"] == pytest.approx(mean) and row["bbc_news_n"] == 3
    assert row["bbc_news_std"] == pytest.approx(sample_std)


def test_a_seed_missing_a_task_has_no_average(tmp_path):
    # Seed 0 has both tasks, seed 1 only hellaswag: the average is seed 0's alone, counted as
    # one of two, never the mean of seed 1's single task.
    write_run(tmp_path, "hs-0", task="hellaswag", seed=0, acc=0.40)
    write_run(tmp_path, "siqa-0", task="siqa", seed=0, acc=0.60)
    write_run(tmp_path, "hs-1", task="hellaswag", seed=1, acc=0.90)
    for mode, hellaswag in (("mean", 65.0), ("best", 90.0)):
        table = tables_of(tmp_path, mode)["table1"]
        row = table.data.iloc[0]
        assert row["hellaswag"] == pytest.approx(hellaswag) and row["hellaswag_n"] == 2
        if mode == "mean":
            assert row["avg"] == pytest.approx(50.0)
            assert (row["avg_n"], row["avg_runs"]) == (1, 2)
            assert table.display.iloc[0]["Avg"] == "50.00 (n=1/2)"
        else:  # the best of each task: siqa has one run of the two seeds
            assert row["avg"] == pytest.approx((90.0 + 60.0) / 2)


def test_merged_mixture_and_stop_rule_ablation(tmp_path):
    subtasks = {f"eval/acc/{t}": 0.5 + i / 100 for i, t in enumerate(published.QA_TASKS)}
    for rule, acc in (("norm", 0.63), ("never", 0.62)):
        for seed in (0, 1):
            write_run(
                tmp_path,
                f"{rule}-{seed}",
                model="qwen2_0.5b",
                task="merged_qa",
                method="stable_lora",
                seed=seed,
                config={"optimizer.stop_rule": rule},
                final={"eval/acc": acc + seed / 100, **subtasks},
            )
    tables = tables_of(tmp_path)
    main = tables["table1"].data.set_index("label")
    assert main.loc["stable_lora, stop_rule=norm", "avg"] == pytest.approx(63.5)
    assert main.loc["stable_lora, stop_rule=norm", "hellaswag"] == pytest.approx(50.0)
    assert math.isnan(main.loc["stable_lora, stop_rule=norm", "paper"])  # not per-task training
    ablation = tables["ablation_stop_rule"].data.set_index("stop_rule")
    for rule, expected in (("norm", 63.5), ("never", 62.5)):
        assert ablation.loc[rule, "value"] == pytest.approx(expected)
        paper = published.STOP_RULE_ABLATION["qwen2_0.5b"][rule]
        assert ablation.loc[rule, "paper"] == paper
        assert ablation.loc[rule, "diff"] == pytest.approx(expected - paper)
    check_latex(tables["ablation_stop_rule"].latex())


def test_target_modules_ablation_with_published(tmp_path):
    sets = {
        "q_proj,v_proj": 0.80,
        "q_proj,k_proj,v_proj,o_proj": 0.82,
        ",".join(published.ALL_PROJECTIONS): 0.84,
    }
    for modules, acc in sets.items():
        for method in ("lora", "stable_lora"):
            write_run(
                tmp_path,
                f"{method}-{len(modules)}",
                model="llama3.2_3b",
                task="merged_qa",
                method=method,
                acc=acc,
                config={"adapter.target_modules": modules.split(",")},
            )
    table = tables_of(tmp_path)["ablation_target_modules"]
    data = table.data.set_index(["modules", "label"])
    paper = published.TARGET_MODULES_ABLATION[("llama3.2_3b", "merged_qa")]
    assert (
        data.loc[("q_proj,v_proj", "stable_lora"), "paper"]
        == paper[("q_proj", "v_proj")]["stable_lora"]
    )
    assert data.loc[("q_proj,v_proj", "lora"), "diff"] == pytest.approx(80 - 83.79)
    assert list(table.display["modules"].loc[lambda s: s != ""]) == [
        "q,v",
        "q,k,v,o",
        "q,k,v,o,gate,up,down",
    ]


def test_gsm8k_by_step_budget(tmp_path):
    for method, accs in (("lora", (0.40, 0.50, 0.58)), ("stable_lora", (0.42, 0.52, 0.60))):
        metrics = [{"step": s, "eval/acc": a} for s, a in zip((1000, 2000, 5000), accs)]
        write_run(
            tmp_path,
            method,
            model="llama3.2_3b",
            task="metamath_gsm8k",
            method=method,
            acc=accs[-1],
            metrics=[{"step": 0, "eval/acc": 0.1}, *metrics],
            config={"task.protocol": "generate"},
        )
    write_run(
        tmp_path,
        "failed",
        model="llama3.2_3b",
        task="metamath_gsm8k",
        method="lora",
        seed=1,
        status="failed",
        config={"task.protocol": "generate"},
    )
    tables = tables_of(tmp_path)
    assert "table1" not in tables  # generation runs are not QA accuracy
    data = tables["gsm8k"].data.set_index(["label", "step"])
    assert data.loc[("stable_lora", 5000), "value"] == pytest.approx(60.0)
    assert data.loc[("stable_lora", 5000), "paper"] == 59.44
    assert data.loc[("lora", 2000), "n"] == 1 and data.loc[("lora", 2000), "runs"] == 2
    assert list(tables["gsm8k"].display.columns[-3:]) == ["step 1000", "step 2000", "step 5000"]


def test_dialogue_table_loss_ppl_rouge_by_method(tmp_path):
    dialogue = {"task.family": "chatterbot", "task.protocol": "generate"}
    results = {  # (loss, rougeL) per seed
        "lora": [(2.0, 0.10), (2.2, 0.20), (2.4, 0.30)],
        "stable_lora": [(1.9, 0.20), (2.0, 0.25), (2.1, 0.30)],
    }
    for method, values in results.items():
        for seed, (loss, rouge) in enumerate(values):
            write_run(
                tmp_path,
                f"{method}-{seed}",
                model="smollm2_135m",
                task="chatterbot",
                method=method,
                seed=seed,
                main_metric="eval/loss",
                final={"eval/loss": loss, "eval/ppl": math.exp(loss), "eval/rougeL": rouge},
                initial={"eval/loss": 3.0, "eval/ppl": math.exp(3.0), "eval/rougeL": 0.05},
                config=dialogue,
            )
    write_run(tmp_path, "failed", model="smollm2_135m", task="chatterbot",
              method="stable_lora", seed=3, status="failed", main_metric="eval/loss",
              config=dialogue)  # fmt: skip
    write_run(tmp_path, "bbc", model="smollm2_135m", acc=0.7)  # not a dialogue run
    tables = tables_of(tmp_path)
    assert "gsm8k" not in tables  # dialogue runs generate, but are not GSM8K-like
    assert not any("chatterbot" in str(c) for c in tables["table1"].data.columns)
    assert "chatterbot" not in tables["table1"].markdown()
    table = tables["dialogue"]
    data = table.data.set_index("label")
    assert list(data.index) == ["before training", "lora", "stable_lora"]
    # lora: loss 2.2 ± 0.2, ppl the mean of e^2, e^2.2, e^2.4, ROUGE-L 20 ± 10 (in %)
    lora = data.loc["lora"]
    assert lora["loss"] == pytest.approx(2.2) and lora["loss_std"] == pytest.approx(0.2)
    assert lora["ppl"] == pytest.approx((math.exp(2.0) + math.exp(2.2) + math.exp(2.4)) / 3)
    assert lora["rougeL"] == pytest.approx(20.0) and lora["rougeL_std"] == pytest.approx(10.0)
    stable = data.loc["stable_lora"]
    assert stable["loss"] == pytest.approx(2.0) and stable["loss_std"] == pytest.approx(0.1)
    assert (stable["loss_n"], stable["loss_runs"]) == (3, 4)  # the failed run counts as missing
    assert stable["rougeL"] == pytest.approx(25.0) and stable["rougeL_std"] == pytest.approx(5.0)
    before = data.loc["before training"]
    assert before["loss"] == pytest.approx(3.0) and before["loss_n"] == 6
    assert before["rougeL"] == pytest.approx(5.0)
    shown = table.display.set_index("method")
    assert list(shown.columns) == ["model", "task", "loss", "ppl", "ROUGE-L (%)"]
    assert shown.loc["lora", "loss"] == "2.200 ± 0.200 (n=3)"
    assert shown.loc["lora", "ROUGE-L (%)"] == "20.00 ± 10.00 (n=3)"
    assert shown.loc["stable_lora", "loss"] == "2.000 ± 0.100 (n=3/4)"
    check_latex(table.latex())
    # best of seeds: the lowest loss and ppl, the highest ROUGE-L, each on its own
    best = tables_of(tmp_path, "best")["dialogue"].data.set_index("label")
    assert best.loc["lora", "loss"] == pytest.approx(2.0)
    assert best.loc["lora", "ppl"] == pytest.approx(math.exp(2.0))
    assert best.loc["lora", "rougeL"] == pytest.approx(30.0)


def test_tables_route_runs_on_what_they_recorded_not_on_names(tmp_path):
    """A task family and a method the analysis has never heard of reach their tables: a
    dialogue family by the kind its runs recorded, a QA family and a new method appended
    after the paper's, never dropped."""
    chat = {"task_family": "my_chat", "task_kind": "dialogue", "protocol": "generate"}
    qa = {"task_family": "my_qa", "task_kind": "multiple_choice", "protocol": "loglik"}
    for method in ("lora", "my_method"):
        for seed in (0, 1):
            write_run(
                tmp_path, f"chat-{method}-{seed}", task="my_chat", method=method, seed=seed,
                main_metric="eval/rougeL", final={"eval/rougeL": 0.2 + seed / 10},
                initial={"eval/rougeL": 0.1}, recorded=chat,
                config={"task.family": "my_chat", "task.protocol": "generate"},
            )  # fmt: skip
            write_run(tmp_path, f"qa-{method}-{seed}", task="my_qa", method=method, seed=seed,
                      acc=0.6, recorded=qa)  # fmt: skip
            write_run(tmp_path, f"bbc-{method}-{seed}", method=method, seed=seed, acc=0.7)
    coll = collect(tmp_path)
    assert set(coll.runs["task_kind"]) == {"dialogue", "multiple_choice"}  # bbc: derived
    tables = {t.name: t for t in build_tables(coll)}
    dialogue = tables["dialogue"].data
    assert set(dialogue["task"]) == {"my_chat"}
    assert set(dialogue["label"]) == {"before training", "lora", "my_method"}
    assert dialogue.set_index("label").loc["my_method", "rougeL"] == pytest.approx(25.0)
    table1 = tables["table1"].data
    assert "my_chat" not in table1.columns and "my_chat" not in tables["table1"].markdown()
    assert list(table1["method"]) == ["lora", "my_method"]  # the unknown method after LoRA
    assert table1.set_index("method").loc["my_method", "my_qa"] == pytest.approx(60.0)
    assert table1.columns.get_loc("bbc_news") < table1.columns.get_loc("my_qa")
    assert "gsm8k" not in tables  # a dialogue family generates, but has a table of its own
    assert set(tables["paired_difference"].data["method"]) == {"my_method"}


def test_a_table_is_one_registered_function(tmp_path, monkeypatch):
    """``@register_table`` alone makes a table: built by the report (after the others), one of
    ``--tables``' choices, listed in ``--help``; with ``owns``, its runs leave the shared
    tables. The same for a plot and ``@register_plot``."""
    from analysis import plots, report, tables
    from analysis.tables import registry

    monkeypatch.setattr(registry, "TABLES", dict(registry.TABLES))  # undone after the test
    monkeypatch.setattr(tables, "TABLES", registry.TABLES)
    monkeypatch.setattr(registry, "OWNED", {k: set(v) for k, v in registry.OWNED.items()})
    monkeypatch.setattr(plots, "PLOTS", dict(plots.PLOTS))
    monkeypatch.setattr(plots.drawing, "PLOTS", plots.PLOTS)

    @tables.register_table(owns={"task_family": "my_family"})
    def my_table(coll, seeds="mean"):
        """My table. Not the first sentence."""
        runs = coll.runs[coll.runs["task_family"] == "my_family"]
        return tables.Table("my_table", "Mine", runs[["run"]], runs[["run"]])

    @plots.register_plot(name="my_plot")
    def draw(coll, out_dir):
        """My plot."""
        return []

    write_run(tmp_path, "mine", task="my_task", recorded={"task_family": "my_family"})
    write_run(tmp_path, "bbc", acc=0.7)
    built = {t.name: t for t in build_tables(collect(tmp_path))}
    assert list(built)[-1] == "my_table" and list(built["my_table"].display["run"]) == ["mine"]
    assert "my_task" not in built["table1"].data.columns  # owned: left to my_table
    assert list(tables.TABLES)[-1] == "my_table" and list(plots.PLOTS)[-1] == "my_plot"
    assert report.parse_args([str(tmp_path), "--tables", "my_table"]).tables == ["my_table"]
    assert report.parse_args([str(tmp_path), "--plots", "my_plot"]).plots == ["my_plot"]
    parser_help = report._listing("tables", tables.TABLES) + report._listing("plots", plots.PLOTS)
    assert "  my_table                  My table" in parser_help  # the first sentence
    assert (
        "Not the first" not in parser_help and "  my_plot                   My plot" in parser_help
    )
    my_table.__name__ = "summary"  # a second table of that name, from another module
    with pytest.raises(ValueError, match="two tables are named 'summary'"):
        tables.register_table(my_table)


def test_legacy_kinds_are_the_families_own():
    """Records written before summary.json held ``task_kind`` get it from LEGACY_KINDS."""
    from analysis.collect import LEGACY_KINDS
    from stablelora.tasks import TaskConfig, families, task_record

    assert set(LEGACY_KINDS) <= set(families())
    for family, kind in LEGACY_KINDS.items():
        assert task_record(TaskConfig(name="t", family=family))["task_kind"] == kind, family


def test_overhead_relative_to_lora(tmp_path):
    for method, seconds in (("lora", (100.0, 110.0)), ("stable_lora", (105.0, 115.5))):
        for seed, time_s in enumerate(seconds):
            write_run(
                tmp_path,
                f"{method}-{seed}",
                model="qwen2_0.5b",
                task="hellaswag",
                method=method,
                seed=seed,
                train_time=time_s,
            )
    data = tables_of(tmp_path)["overhead"].data.set_index("method")
    assert data.loc["stable_lora", "time_rel"] == pytest.approx((110.25 / 105 - 1) * 100)
    assert data.loc["lora", "time_rel"] == 0
    assert data.loc["stable_lora", "paper_time_rel"] == 0.6


def test_init_scale_tables_from_histories(tmp_path):
    for scale in (0.0, 4.0):
        for method in ("lora", "stable_lora"):
            ratio = 10.0 if method == "lora" and scale else 1.0
            metrics = [
                {
                    "step": s,
                    "feat/delta1": ratio * s,
                    "feat/delta2": float(s),
                    "lora/norm_A": 2.0 + s,
                }
                for s in (1, 2)
            ]
            write_run(
                tmp_path,
                f"{method}-{scale}",
                method=method,
                metrics=metrics,
                config={"adapter.init_scale": scale},
            )
    tables = tables_of(tmp_path)
    assert list(tables["init_scale"].display.columns[-2:]) == ["A0 × 0", "A0 × 4"]
    stability = tables["init_scale_stability"].data.set_index(
        ["label", "quantity", "adapter.init_scale"]
    )
    assert stability.loc[("lora", "delta1/delta2 (last probe)", 4.0), "value"] == pytest.approx(10)
    assert stability.loc[("lora", "||A|| last/first", 4.0), "value"] == pytest.approx(4 / 3)
    paths = build_plots(collect(tmp_path), tmp_path / "plots", ["init_scale", "delta_ratio"])
    assert {p.name for p in paths} >= {"init_scale.png", "init_scale.pdf", "delta_ratio.png"}


def test_reviewer_controls_and_shrink_stops(tmp_path):
    stops = {
        "layer.0.q_proj": {"shrinking": False, "stop_step": 30},
        "layer.0.v_proj": {"shrinking": True, "stop_step": None},
    }
    write_run(tmp_path, "lora", acc=0.60)
    write_run(tmp_path, "stable", method="stable_lora", acc=0.64, shrink=stops)
    write_run(
        tmp_path,
        "steps",
        method="stable_lora",
        acc=0.62,
        shrink=stops,
        config={"optimizer.stop_rule": "steps:20"},
    )
    write_run(tmp_path, "wd", method="adamw_large_wd", acc=0.61)
    tables = tables_of(tmp_path)
    controls = tables["reviewer_controls"].data.set_index("label")
    assert controls.loc["stable_lora, stop_rule=steps:20", "diff_lora"] == pytest.approx(2.0)
    assert controls.loc["adamw_large_wd", "diff_stable_lora"] == pytest.approx(-3.0)
    shrink = tables["shrink_stops"].data.set_index("label")
    assert shrink.loc["stable_lora, stop_rule=norm", "stopped"] == 1
    assert shrink.loc["stable_lora, stop_rule=norm", "median"] == 30


def test_every_table_gives_the_runs_median_stop_step(tmp_path):
    # Two stopped layers: the median is their mean (35), in every table and in summary.json
    # (the report once took the upper one, 40, in reviewer_controls only).
    stops = {
        f"layer.{i}.v_proj": {"shrinking": False, "stop_step": s} for i, s in enumerate((30, 40))
    }
    stops["layer.2.v_proj"] = {"shrinking": True, "stop_step": None}
    write_run(tmp_path, "lora", acc=0.60)
    write_run(tmp_path, "stable", method="stable_lora", acc=0.64, shrink=stops)
    write_run(tmp_path, "wd", method="adamw_large_wd", acc=0.61)
    tables = tables_of(tmp_path)
    controls = tables["reviewer_controls"].data.set_index("label")
    assert controls.loc["stable_lora", "median_stop_step"] == 35
    assert tables["shrink_stops"].data.set_index("label").loc["stable_lora", "median"] == 35
    runs = collect(tmp_path).runs.set_index("run_id")
    assert runs.filter(like="stable", axis=0)["shrink/stop_step_max"].iloc[0] == 40


def test_select_learning_rate_keeps_the_best_lr_per_method(tmp_path):
    for lr, acc in ((1e-4, 0.60), (2e-4, 0.70), (4e-4, 0.65)):
        for seed in (0, 1):
            write_run(tmp_path, f"lora-{lr}-{seed}", acc=acc, seed=seed, config={"optim.lr": lr})
    write_run(tmp_path, "stable-1", method="stable_lora", acc=0.5, config={"optim.lr": 1e-4})
    write_run(tmp_path, "stable-4", method="stable_lora", acc=0.9, config={"optim.lr": 4e-4})
    coll = collect(tmp_path)
    assert set(coll.runs["label"]) == {
        f"{m}, lr={lr:g}"
        for m, lr in [
            ("lora", 1e-4),
            ("lora", 2e-4),
            ("lora", 4e-4),
            ("stable_lora", 1e-4),
            ("stable_lora", 4e-4),
        ]
    }
    kept, table = select_learning_rate(coll.runs)
    assert dict(zip(kept["method"], kept["optim.lr"])) == {"lora": 2e-4, "stable_lora": 4e-4}
    assert len(kept) == 3 and set(kept["label"]) == {"lora", "stable_lora"}
    assert table.display["chosen"].tolist().count("yes") == 2


def test_select_learning_rate_keeps_the_lowest_loss(tmp_path):
    # A dialogue task scored by held-out loss: the best lr has the lowest mean loss, whether
    # the selection reads the main metric (score) or names the loss column.
    for lr, loss in ((1e-4, 2.0), (1e-3, 1.5), (1e-2, 3.0)):
        write_run(tmp_path, f"chat-{lr}", task="chatterbot", acc=loss, main_metric="eval/loss",
                  config={"optim.lr": lr})  # fmt: skip
    runs = collect(tmp_path).runs
    for metric in ("score", "final/eval/loss"):
        kept, table = select_learning_rate(runs, metric)
        assert kept["optim.lr"].tolist() == [1e-3], metric
    # beside an accuracy task of the same method, the mean over tasks means nothing
    for lr, acc in ((1e-4, 0.5), (1e-3, 0.6), (1e-2, 0.7)):
        write_run(tmp_path, f"bbc-{lr}", acc=acc, config={"optim.lr": lr})
    with pytest.raises(ValueError, match="mixes loss-like and accuracy metrics"):
        select_learning_rate(collect(tmp_path).runs)
    from analysis.report import main as report_main

    with pytest.raises(SystemExit, match="^analysis.report: cannot select the lr for"):
        report_main([str(tmp_path), "--out", str(tmp_path / "out"), "--select-lr", "--no-plots"])


def test_select_learning_rate_compares_lrs_on_the_tasks_every_lr_was_run_on(tmp_path):
    # lr 1e-4 ran bbc_news only (0.125); lr 1e-2 ran bbc_news (0.25) and twice arc_easy (0.0).
    # Over every run 1e-4 wins (0.125 against 0.083); on the one shared task 1e-2 does.
    write_run(tmp_path, "a", acc=0.125, config={"optim.lr": 1e-4})
    write_run(tmp_path, "b", acc=0.25, config={"optim.lr": 1e-2})
    for seed in (0, 1):
        write_run(tmp_path, f"c{seed}", task="arc_easy", acc=0.0, seed=seed,
                  config={"optim.lr": 1e-2})  # fmt: skip
    with pytest.warns(UserWarning, match="unbalanced lr grid, the lrs are compared on bbc_news"):
        kept, table = select_learning_rate(collect(tmp_path).runs)
    assert set(kept["optim.lr"]) == {1e-2} and len(kept) == 3  # arc_easy's runs kept too
    assert sorted(kept["task"]) == ["arc_easy", "arc_easy", "bbc_news"]
    stats = table.data.set_index("optim.lr")
    assert stats.loc[1e-2, "score"] == pytest.approx(0.25) and stats.loc[1e-2, "n"] == 1
    assert any("arc_easy left out of the comparison" in note for note in table.notes)


def test_select_learning_rate_says_which_tasks_leave_the_tables(tmp_path):
    write_run(tmp_path, "a", acc=0.5, config={"optim.lr": 1e-4})
    write_run(tmp_path, "b", acc=0.25, config={"optim.lr": 1e-2})
    write_run(tmp_path, "c", task="arc_easy", acc=0.9, config={"optim.lr": 1e-2})
    with pytest.warns(UserWarning) as caught:  # the grid is unbalanced too
        kept, table = select_learning_rate(collect(tmp_path).runs)
    assert any("arc_easy has no run at the chosen lr 0.0001" in str(w.message) for w in caught)
    assert kept["optim.lr"].tolist() == [1e-4]
    assert any("its 1 run(s) at other lrs enter no other table" in n for n in table.notes)
    # no task run at every lr: nothing to compare, one line
    shutil.rmtree(tmp_path / "a")
    write_run(tmp_path, "d", task="obqa", acc=0.5, config={"optim.lr": 1e-4})
    with pytest.raises(ValueError, match=r"no task was run at every candidate lr \(lr 0.0001: "):
        select_learning_rate(collect(tmp_path).runs)


def test_unfinished_run_without_summary_is_incomplete(tmp_path):
    run_dir = write_run(tmp_path, "running", metrics=[{"step": 3, "train/loss": 1.0}])
    (run_dir / "summary.json").unlink()
    coll = collect(tmp_path)
    assert coll.runs.loc[0, "status"] == "incomplete" and coll.runs.loc[0, "steps"] == 3
    assert tables_of(tmp_path)["runs_not_completed"].display.loc[0, "status"] == "incomplete"


def test_symlinked_run_folders_are_read_once_and_what_is_left_out_is_said(tmp_path):
    # A sweep of 3 copied lora runs and 3 stable_lora runs linked from where they were run
    # (the runner follows such links): the analysis once read 3 runs and lost a method.
    sweep, elsewhere = tmp_path / "sweep" / "runs", tmp_path / "elsewhere"
    for seed in range(3):
        write_run(sweep, f"lora-s{seed}", seed=seed, acc=0.6)
        target = write_run(elsewhere, f"stable-s{seed}", method="stable_lora", seed=seed)
        (sweep / f"stable-s{seed}").symlink_to(target, target_is_directory=True)
    (sweep / "again").symlink_to(sweep / "lora-s0", target_is_directory=True)  # read once
    (sweep / "cycle").symlink_to(tmp_path / "sweep", target_is_directory=True)
    (sweep / "broken").symlink_to(tmp_path / "gone", target_is_directory=True)
    (sweep / "job-s3" / ".hydra").mkdir(parents=True)  # a sweep stopped before this job
    (sweep / "job-s3" / ".hydra" / "config.yaml").write_text("seed: 3\n")
    with pytest.warns(UserWarning) as caught:
        coll = collect(tmp_path / "sweep")
    assert len(coll.runs) == 6 and sorted(coll.runs["method"].value_counts()) == [3, 3]
    assert sorted(coll.runs["run"]) == sorted(
        [f"runs/lora-s{s}" for s in range(3)] + [f"runs/stable-s{s}" for s in range(3)]
    )
    said = [str(w.message) for w in caught]
    assert len(coll.notes) == 4 and set(coll.notes) <= set(said)
    again = f"{sweep / 'again'} is {sweep / 'lora-s0'} again (a symlink, or a folder given twice)"
    assert f"{again}: read once" in coll.notes
    assert any("cycle is " in n and "read once" in n for n in coll.notes)
    assert any(f"{sweep / 'broken'} links to {tmp_path / 'gone'}, which does not exist" in n
               for n in coll.notes)  # fmt: skip
    assert any(n.startswith(f"{sweep / 'job-s3'} never started") for n in coll.notes)

    from analysis.report import main as report_main

    with pytest.warns(UserWarning):
        report_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out"), "--no-plots",
                     "--tables", "summary"])  # fmt: skip
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Left out of every table:" in text and "job-s3 never started" in text


def test_width_exponents_are_delegated_to_width_fit(tmp_path):
    for width in (128, 256, 512):
        for seed in (0, 1):
            # delta1 ~ n^0, gAZ ~ n^1: the fits must find the exponents.
            metrics = [
                {
                    "step": s,
                    "feat/delta1": 0.1 * (1 + seed / 10),
                    "feat/gAZ": width * (1 + seed / 10),
                    "feat/Z": 1.0,
                }
                for s in (2, 10)
            ]
            write_run(
                tmp_path,
                f"w{width}-{seed}",
                model="toy_width",
                task="toy_teacher",
                seed=seed,
                metrics=metrics,
                config={"model.width": width},
            )
    coll = collect(tmp_path)
    (table,) = build_tables(coll, names=["gamma_width"])
    files = build_plots(coll, tmp_path / "out" / "plots", ["gamma_width"])
    fits = table.data.set_index(["quantity", "step"])
    assert fits.loc[("gAZ", 10), "exponent"] == pytest.approx(1.0)
    assert fits.loc[("delta1", 10), "exponent"] == pytest.approx(0.0, abs=1e-9)
    assert any(p.name == "gamma_width.png" for p in files)


def test_a_width_sweeps_records_beside_the_runs_are_fitted_by_the_report(tmp_path):
    """A width sweep's ``records.jsonl`` in a collected directory: the ``gamma_width`` table
    fits it, the ``gamma_width`` plot copies width_fit's figures and leaves its own report in
    ``width_sweep/``; a report restricted to other tables and plots leaves it alone."""
    from analysis.report import main as report_main

    lines = [
        {
            "method": "lora",
            "lr_mode": "fixed",
            "width": width,
            "seed": seed,
            "metrics": [
                {"step": s, "feat/delta1": 0.1 * (1 + seed / 10), "feat/gAZ": width * (1 + seed)}
                for s in (2, 10)
            ],
        }
        for width in (64, 128, 256)
        for seed in (0, 1)
    ]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    write_run(
        tmp_path, "lora-s0", acc=0.7, metrics=[{"step": 5, "train/loss": 1.0, "eval/acc": 0.7}]
    )
    result = report_main([str(tmp_path), "--out", str(tmp_path / "out")])
    tables = {t.name: t for t in result["tables"]}
    fits = tables["gamma_width"].data.set_index(["quantity", "step"])
    assert fits.loc[("gAZ", 10), "exponent"] == pytest.approx(1.0)
    assert str(tmp_path / "records.jsonl") in tables["gamma_width"].title
    out = tmp_path / "out"
    for name in ("gamma_width_fit", "gamma_exponents_vs_step"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 0
        assert f"[{name}.png](plots/{name}.png)" in (out / "report.md").read_text()
    assert (out / "width_sweep" / "exponents.md").is_file()
    assert (out / "tables" / "gamma_width.md").is_file()

    other = tmp_path / "other"
    result = report_main([str(tmp_path), "--out", str(other), "--tables", "summary",
                          "--plots", "loss"])  # fmt: skip
    assert [t.name for t in result["tables"]] == ["summary"]
    assert not (other / "width_sweep").exists() and not list(other.glob("plots/gamma_*"))


def test_width_fit_interval_is_t_times_the_standard_error():
    from analysis.width_fit import fit_slope, t_quantile

    log_width = np.log(np.repeat([128.0, 256, 512, 1024], 3))
    noise = np.tile([0.13, -0.07, 0.02], 4) + np.repeat([0.0, 0.05, -0.04, 0.01], 3)
    log_value = 0.5 * log_width + 1.0 + noise
    fit = fit_slope(log_width, log_value)
    # The standard error of a least-squares slope, by hand.
    points = len(log_width)
    slope, intercept = np.polyfit(log_width, log_value, 1)
    residuals = log_value - (slope * log_width + intercept)
    sxx = ((log_width - log_width.mean()) ** 2).sum()
    stderr = math.sqrt((residuals**2).sum() / (points - 2) / sxx)
    half = t_quantile(0.975, points - 2) * stderr
    assert fit["exponent"] == pytest.approx(slope)
    assert fit["ci_high"] - fit["exponent"] == pytest.approx(half, rel=1e-9)
    assert fit["exponent"] - fit["ci_low"] == pytest.approx(half, rel=1e-9)
    assert t_quantile(0.975, points - 2) == pytest.approx(2.228, abs=2e-3)  # t table, 10 dof


def test_latex_escape_specials():
    assert latex_escape("a_b & 5% ± Δ") == r"a\_b \& 5\% $\pm$ $\Delta$"


def test_shrink_stops_by_projection_and_depth(tmp_path):
    def layer(depth, projection):
        return f"model.layers.{depth}.self_attn.{projection}"

    # 8 layers: v_proj stops early everywhere, q_proj only in the first half of the depth.
    stops = {layer(d, "v_proj"): {"shrinking": False, "stop_step": 10 + d} for d in range(8)}
    stops |= {
        layer(d, "q_proj"): {"shrinking": d >= 4, "stop_step": 50 + d if d < 4 else None}
        for d in range(8)
    }
    for seed in (0, 1):
        write_run(tmp_path, f"stable-{seed}", method="stable_lora", seed=seed, shrink=stops)
    table = tables_of(tmp_path)["shrink_stops_by_layer"].data
    rows = table.set_index(["projection", "depth_band"])
    assert list(rows.loc["v_proj"].index) == ["0-1", "2-3", "4-5", "6-7"]
    assert rows.loc[("v_proj", "0-1"), "stopped"] == 4  # 2 layers x 2 seeds
    assert rows.loc[("v_proj", "6-7"), "median"] == 16.5
    assert rows.loc[("q_proj", "2-3"), "first"] == 52 and rows.loc[("q_proj", "2-3"), "last"] == 53
    assert rows.loc[("q_proj", "4-5"), "stopped"] == 0
    assert rows.loc[("q_proj", "4-5"), "layer_runs"] == 4


def test_paired_difference_against_lora_by_seed(tmp_path):
    # Two tasks, three seeds; stable_lora is lora + (task, seed)-specific offsets, so every
    # pair's difference is known. Seed 2 of stable_lora lacks obqa: it has no Avg pair.
    lora = {("arc_easy", 0): 0.50, ("arc_easy", 1): 0.52, ("arc_easy", 2): 0.54,
            ("obqa", 0): 0.30, ("obqa", 1): 0.34, ("obqa", 2): 0.32}  # fmt: skip
    offsets = {("arc_easy", 0): 0.02, ("arc_easy", 1): -0.01, ("arc_easy", 2): 0.05,
               ("obqa", 0): 0.01, ("obqa", 1): 0.03}  # fmt: skip
    for (task, seed), acc in lora.items():
        write_run(tmp_path, f"lora-{task}-{seed}", task=task, seed=seed, acc=acc)
    for (task, seed), offset in offsets.items():
        write_run(
            tmp_path,
            f"stable-{task}-{seed}",
            task=task,
            seed=seed,
            method="stable_lora",
            acc=lora[task, seed] + offset,
        )
    write_run(tmp_path, "riemann-obqa-1", task="obqa", seed=1, method="riemann", acc=0.20,
              status="failed")  # fmt: skip
    table = tables_of(tmp_path)["paired_difference"]
    data = table.data.set_index(["task", "label"])
    arc = np.array([2.0, -1.0, 5.0])
    row = data.loc[("arc_easy", "stable_lora")]
    assert row["pairs"] == 3 and row["diff_mean"] == pytest.approx(arc.mean())
    assert row["diff_std"] == pytest.approx(arc.std(ddof=1))
    half = 4.302653 * arc.std(ddof=1) / math.sqrt(3)  # t(0.975, 2) from tables
    assert row["ci_low"] == pytest.approx(arc.mean() - half, abs=1e-3)
    assert row["ci_high"] == pytest.approx(arc.mean() + half, abs=1e-3)
    assert (row["ahead"], row["behind"]) == (2, 1)
    assert row["per_seed"] == "s0: +2.0, s1: -1.0, s2: +5.0"
    # Avg pairs: seeds 0 and 1 only (the mean over both tasks of each seed's difference).
    avg = data.loc[("Avg", "stable_lora")]
    per_seed_avg = np.array([(2.0 + 1.0) / 2, (-1.0 + 3.0) / 2])
    assert avg["pairs"] == 2 and avg["diff_mean"] == pytest.approx(per_seed_avg.mean())
    # The paper's task order, the average last; the failed riemann run has no pair.
    assert list(table.data["task"]) == ["obqa", "arc_easy", "Avg"]
    assert table.display.iloc[0]["95% CI"].startswith("[")


def test_reviewer_controls_reference_is_at_the_default_init_scale(tmp_path):
    # One sweep that also varies the scale of A0 (experiment=ablations): the Δ columns
    # compare with LoRA and Stable-LoRA at peft's A0, never with a mean over the scales.
    for method, accs in (("lora", (0.60, 0.30)), ("stable_lora", (0.64, 0.20))):
        for scale, acc in zip((1.0, 4.0), accs):
            write_run(tmp_path, f"{method}-{scale}", method=method, acc=acc,
                      config={"adapter.init_scale": scale})  # fmt: skip
    write_run(tmp_path, "wd", method="adamw_large_wd", acc=0.61)
    controls = tables_of(tmp_path)["reviewer_controls"].data.set_index("label")
    assert controls.loc["adamw_large_wd", "diff_lora"] == pytest.approx(1.0)
    assert controls.loc["adamw_large_wd", "diff_stable_lora"] == pytest.approx(-3.0)
    assert controls.loc["lora, init_scale=4", "diff_lora"] == pytest.approx(-30.0)


def test_overhead_elsewhere_shows_the_papers_ratios_for_orientation(tmp_path):
    for method, seconds in (("lora", 100.0), ("lora_rite", 150.0)):
        write_run(tmp_path, method, model="smollm2_135m", method=method, train_time=seconds)
    table = tables_of(tmp_path)["overhead"]
    data = table.data.set_index("method")
    assert data.loc["lora_rite", "time_rel"] == pytest.approx(50.0)
    assert data.loc["lora_rite", "paper_time_rel"] == 46.0  # Qwen2-0.5B, HellaSwag
    assert "paper Δ time (qwen2_0.5b, hellaswag, GPU)" in table.display.columns


def test_width_predictions_follow_the_gamma_rules():
    from analysis.width_fit import predicted_exponent, theory_table

    # Fixed lr: every delta grows like n; lr ~ n^-1/2 is the self-stable rate: all Theta(1).
    for q in ("delta1", "delta2", "delta3", "dY"):
        assert predicted_exponent(q, "fixed", 50) == 1.0
        assert predicted_exponent(q, "scaled", 50) == 0.0
    assert predicted_exponent("AZ", "scaled", 50) == 0.5 and predicted_exponent("gAZ", "x", 9) != 1
    # Step 1: A = A0 (gamma[A0 Z] = 0) and B = 0, so delta2 has no exponent; A's gradient is
    # zero while B = 0, so on step 2 delta1 still sees A0 Z while delta2 already has its rate.
    assert predicted_exponent("delta1", "scaled", 1) == -0.5
    assert math.isnan(predicted_exponent("delta2", "fixed", 1))
    assert predicted_exponent("delta1", "fixed", 2) == 0.0
    assert predicted_exponent("delta2", "fixed", 2) == 1.0
    assert predicted_exponent("delta1", "fixed", 3) == 1.0
    fits = pd.DataFrame(
        [
            {"method": "lora", "lr_mode": "scaled", "step": 10, "quantity": "delta1",
             "exponent": 0.05, "ci_low": -0.1, "ci_high": 0.2},
            {"method": "lora", "lr_mode": "scaled", "step": 10, "quantity": "delta2",
             "exponent": 0.4, "ci_low": 0.3, "ci_high": 0.5},
        ]
    )  # fmt: skip
    row = theory_table(fits).iloc[0]
    assert row["delta1"] == "+0.0 ok" and row["delta2"] == "+0.0 off by +0.40"


def test_llm_adapters_benchmarks_per_dataset_and_average(tmp_path):
    from analysis.tables.llm_adapters import BENCHMARKS

    commonsense = BENCHMARKS["commonsense8"][1]
    maths = BENCHMARKS["maths7"][1]

    def adapters_run(name, task, datasets, accs, *, method="lora", seed=0, status="completed"):
        final = {f"eval/acc/{d}": a for d, a in zip(datasets, accs)}
        final["eval/acc"] = sum(accs) / len(accs)
        config = {
            "task.family": "llm_adapters",
            "task.protocol": "generate",
            "task.eval_datasets": list(datasets),
            "task.train_file": "math_10k.json" if task == "maths7" else "commonsense_15k.json",
        }
        metrics = [{"step": 10, "eval/acc": final["eval/acc"]}]
        write_run(
            tmp_path, name, task=task, method=method, seed=seed, status=status, config=config,
            final=final, metrics=metrics,
        )  # fmt: skip

    # Commonsense-8: dataset i scores 50 + i (lora) or 60 + i (stable_lora), +10 on seed 1.
    for method, base in (("lora", 0.50), ("stable_lora", 0.60)):
        for seed in (0, 1):
            accs = [base + i / 100 + seed / 10 for i in range(8)]
            adapters_run(
                f"{method}-cs-{seed}", "commonsense8", commonsense, accs, method=method, seed=seed
            )
    adapters_run("lora-cs-2", "commonsense8", commonsense, [0.9] * 8, seed=2, status="failed")
    # Maths-7, one run; and a run evaluated on one dataset of each benchmark.
    adapters_run("m-0", "maths7", maths, [0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70])
    adapters_run("mixed-0", "mixed", ("boolq", "gsm8k"), [0.80, 0.40])
    write_run(tmp_path, "other", task="bbc_news", acc=0.5)  # not an LLM-Adapters run

    for mode in ("mean", "best"):
        tables = tables_of(tmp_path, mode)
        cs = tables["commonsense8"].data.set_index(["task", "method"])
        lora, stable = cs.loc[("commonsense8", "lora")], cs.loc[("commonsense8", "stable_lora")]
        # per dataset over seeds: (50 + i, 60 + i) -> mean 55 + i, best 60 + i
        shift = 5.0 if mode == "mean" else 10.0
        for i, dataset in enumerate(commonsense):
            assert lora[dataset] == pytest.approx(50 + i + shift)
            assert stable[dataset] == pytest.approx(60 + i + shift)
        # Avg: per run the mean of its 8 datasets (50 + 3.5, + 10 on seed 1), then over seeds
        assert lora["avg"] == pytest.approx(53.5 + shift)
        assert (lora["avg_n"], lora["avg_runs"]) == (2, 3)  # the failed run counts as missing
        if mode == "mean":
            assert lora["avg_std"] == pytest.approx(math.sqrt(50.0))  # sample std of 53.5, 63.5
        mixed = cs.loc[("mixed", "lora")]
        assert mixed["boolq"] == pytest.approx(80.0) and mixed["avg"] == pytest.approx(80.0)
        assert math.isnan(mixed["piqa"])
        ms = tables["maths7"].data.set_index("task")
        assert ms.loc["maths7", "gsm8k"] == pytest.approx(20.0)
        assert ms.loc["maths7", "avg"] == pytest.approx(40.0)
        assert ms.loc["mixed", "gsm8k"] == pytest.approx(40.0)
        assert ms.loc["mixed", "avg"] == pytest.approx(40.0)
        assert set(ms.index) == {"maths7", "mixed"}
        assert set(cs.reset_index()["task"]) == {"commonsense8", "mixed"}
    display = tables_of(tmp_path)["commonsense8"].display
    assert list(display.columns) == [
        "model", "task", "training", "method", "BoolQ", "PIQA", "SIQA", "HellaSwag",
        "WinoGrande", "ARC-e", "ARC-c", "OBQA", "Avg",
    ]  # fmt: skip
    row = display[(display["task"] == "commonsense8") & (display["method"] == "lora")].iloc[0]
    assert row["Avg"] == "58.50 ± 7.07 (n=2/3)" and row["training"] == "commonsense_15k.json"
    assert display[display["task"] == "mixed"].iloc[0]["PIQA"] == "—"
    table = tables_of(tmp_path)["maths7"]
    assert list(table.display.columns)[-8:] == [
        "MultiArith", "GSM8K", "AddSub", "AQuA", "SingleEq", "SVAMP", "MAWPS", "Avg",
    ]  # fmt: skip
    check_latex(table.latex())
    assert any("did not complete" in note for note in tables_of(tmp_path)["commonsense8"].notes)
    assert "gsm8k" not in tables_of(tmp_path)  # their own tables, not GSM8K's by step budget


def test_best_of_table1_has_no_average_for_a_method_missing_a_task(tmp_path):
    for seed in (0, 1):
        for task in ("bbc_news", "obqa"):
            write_run(tmp_path, f"lora-{task}-{seed}", task=task, seed=seed, acc=0.5 + seed / 10)
        write_run(tmp_path, f"stable-bbc-{seed}", task="bbc_news", method="stable_lora", seed=seed)
    for mode in ("best", "mean"):
        data = tables_of(tmp_path, mode)["table1"].data.set_index("method")
        assert data.loc["lora", "avg"] == pytest.approx(60.0 if mode == "best" else 55.0)
        assert math.isnan(data.loc["stable_lora", "avg"]), mode


def test_aggregate_best_of_seeds_follows_each_groups_sign_also_as_a_key():
    from analysis.tables.aggregation import aggregate, metric_sign

    frame = pd.DataFrame(
        {
            "task": ["qa", "qa", "chat", "chat"],
            "value": [0.6, 0.8, 2.5, 1.5],
            "status": ["completed"] * 4,
            "sign": metric_sign(pd.Series(["eval/acc", "eval/acc", "eval/loss", "eval/loss"])),
        }
    )
    best = aggregate(frame, ["task"], "best").set_index("task")["value"]
    assert best.to_dict() == {"qa": 0.8, "chat": 1.5}
    keyed = aggregate(frame, ["task", "sign"], "best").set_index("task")
    assert keyed["value"].to_dict() == {"qa": 0.8, "chat": 1.5}
    assert keyed["sign"].to_dict() == {"qa": 1.0, "chat": -1.0}
    assert aggregate(frame, ["task", "sign"], "mean").set_index("task")["value"].to_dict() == (
        pytest.approx({"qa": 0.7, "chat": 2.0})
    )
