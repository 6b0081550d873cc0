"""The lr range study (issue 31): the verdicts per setting (each lr, and A0 x4, its own
comparison, Holm across them), the mechanism table and the figure on hand-built runs; the
catalog runs both of its sweeps into one folder; the tuned study and this one compose at the
paper's scale; and the GPU-hour cost of each protocol."""

from __future__ import annotations

import argparse

import matplotlib.image
import numpy as np
import pytest
from helpers import flipped, tables_of, write_examples, write_run

from analysis.collect import collect
from analysis.labels import setting_labels
from analysis.plots import build_plots
from analysis.plots.lr_range import difference_points, ratio_points, verdict_kind
from analysis.tables.equivalence import adjust
from experiments import cost
from experiments.catalog import EXPERIMENTS, compose, sweep_jobs, sweep_name, sweep_params
from experiments.common import PICKS_METRIC, all_sweep_commands, commands, sweep_commands

LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
PLAN = {"analysis.primary.margin_pp": 1.0, "analysis.primary.resample": "seeds_and_questions"}


def history(ratio: float, stable: bool) -> list[dict]:
    """Probe rows at steps 2..10: delta1/delta2 = ``ratio``; ||A||_F per layer rising under
    AdamW, falling under the shrink."""
    rows = []
    for step in range(2, 11, 2):
        row = {
            "step": step,
            "feat/delta1": ratio * 0.01,
            "feat/delta2": 0.01,
            "lora/norm_A": 1.0 + (-0.01 if stable else 0.01) * step,
        }
        for layer in LAYERS:
            row[f"lora/{layer}/norm_A"] = row["lora/norm_A"]
        rows.append(row)
    return rows


def write_lr_study(root, n=2000) -> None:
    """LoRA and Stable-LoRA x 3 seeds at lr 1e-4 (equal up to 5 + 5 flips: equivalent), 1e-3
    (Stable-LoRA 300 questions behind: different) and A0 x4 at 1e-3 (equal: equivalent); the
    runs of one seed share LoRA's answers only within their setting."""
    rng = np.random.default_rng(5)
    settings = {
        (1e-4, 1.0): (n // 400, n // 400, 2.0),
        (1e-3, 1.0): (0, 3 * n // 20, 0.5),
        (1e-3, 4.0): (n // 400, n // 400, 3.0),
    }
    for (lr, scale), (gained, lost, ratio) in settings.items():
        for seed in (0, 1, 2):
            lora = [bool(h) for h in rng.random(n) < 0.5]
            runs = {"lora": lora, "stable_lora": flipped(lora, gained, lost, rng)}
            for method, hits in runs.items():
                stable = method == "stable_lora"
                stops = {
                    LAYERS[0]: {"shrinking": False, "stop_step": 4},
                    LAYERS[1]: {"shrinking": True, "stop_step": None},
                }
                run = write_run(
                    root,
                    f"{method}-{lr}-{scale}-{seed}",
                    method=method,
                    seed=seed,
                    acc=float(np.mean(hits)),
                    config={"optim.lr": lr, "adapter.init_scale": scale, **PLAN},
                    metrics=history(ratio, stable),
                    shrink=stops if stable else None,
                )
                write_examples(run, {"bbc_news": hits})


def test_each_setting_is_its_own_comparison_with_holm_across_the_settings(tmp_path):
    write_lr_study(tmp_path)
    runs = collect(tmp_path, history=False).runs
    assert set(setting_labels(runs)) == {
        "init_scale=1, lr=0.0001",
        "init_scale=1, lr=0.001",
        "init_scale=4, lr=0.001",
    }
    tables = tables_of(tmp_path)
    data = tables["verdicts"].data
    primary = data[data["role"] == "primary"].set_index("setting")
    assert primary["verdict"].to_dict() == {
        "init_scale=1, lr=0.0001": "equivalent within ±1 pp",
        "init_scale=1, lr=0.001": "different",
        "init_scale=4, lr=0.001": "equivalent within ±1 pp",
    }
    # paired within its setting: LoRA's run at another lr would give ~0 or noise, not -15
    assert primary.loc["init_scale=1, lr=0.001", "diff"] == pytest.approx(-15.0)
    assert (primary["seeds"] == 3).all() and (primary["examples"] == 2000).all()
    # the family: the three settings
    assert primary["p_adjusted"].to_numpy() == pytest.approx(
        adjust(primary["p_value"].to_numpy(), "holm")
    )
    display = tables["verdicts"].display
    assert "setting" in display and set(display["method"]) == {"stable_lora"}
    assert "3 settings" in tables["verdicts"].markdown()
    # the other paired tables pair within the setting too
    boot = tables["paired_bootstrap"].data.set_index("label")
    assert boot.loc["stable_lora, init_scale=1, lr=0.001", "diff"] == pytest.approx(-15.0)
    assert set(tables["paired_examples"].data["n"]) == {2000}


def test_mechanism_table_per_setting(tmp_path):
    write_lr_study(tmp_path, n=200)
    table = tables_of(tmp_path)["lr_mechanism"]
    data = table.data.set_index(["setting", "method"])
    assert len(data) == 6
    stable = data.loc[("init_scale=1, lr=0.001", "stable_lora")]
    assert (stable["q_proj_stopped"], stable["q_proj_layers"]) == (3, 3)
    assert stable["q_proj_median_stop"] == 4 and stable["v_proj_stopped"] == 0
    assert stable["q_proj_below"] == 3 and stable["v_proj_below"] == 3  # the shrink
    lora = data.loc[("init_scale=1, lr=0.001", "lora")]
    assert lora["q_proj_below"] == 0 and lora["q_proj_norm_layers"] == 3
    assert np.isnan(lora["q_proj_layers"])  # no shrink: no stop
    # the median of delta1/delta2 over steps (2.5, 7.5] of 10: the constant ratio
    assert data.loc[("init_scale=1, lr=0.0001", "lora"), "delta_ratio_mid"] == pytest.approx(2.0)
    assert data.loc[("init_scale=4, lr=0.001", "lora"), "delta_ratio_mid"] == pytest.approx(3.0)
    assert lora["norm_A_first"] == pytest.approx(1.02) and lora["norm_A_last"] == pytest.approx(1.1)
    shown = table.display.set_index(["setting", "method"])
    assert shown.loc[("init_scale=1, lr=0.001", "lora"), "q_proj stopped"] == "—"
    assert shown.loc[("init_scale=1, lr=0.001", "stable_lora"), "q_proj stopped"] == "3/3"


def test_the_lr_range_figure(tmp_path):
    write_lr_study(tmp_path, n=400)
    coll = collect(tmp_path)
    points, margin = difference_points(coll)
    assert margin == 1.0 and len(points) == 3
    assert set(points["optim.lr"]) == {1e-4, 1e-3} and set(points["adapter.init_scale"]) == {1, 4}
    assert {verdict_kind(v) for v in points["verdict"]} <= {
        "different",
        "equivalent",
        "inconclusive",
    }
    ratios = ratio_points(coll).set_index(["method", "optim.lr", "adapter.init_scale"])
    assert ratios.loc[("lora", 1e-3, 4.0), "value"] == pytest.approx(3.0)
    paths = build_plots(coll, tmp_path / "plots", ["lr_range"])
    assert {p.name for p in paths} == {"lr_range.png", "lr_range.pdf"}
    pixels = matplotlib.image.imread(tmp_path / "plots" / "lr_range.png")
    assert pixels.shape[0] > 300
    # no pairs and no probes: no figure
    alone = collect(tmp_path / "lora-0.0001-1.0-0", history=False)
    assert build_plots(alone, tmp_path / "none", ["lr_range"]) == []


# ---------------------------------------------------------------------------- catalog
def test_lr_range_runs_both_sweeps_into_one_folder_then_one_report(tmp_path):
    experiment = EXPERIMENTS["lr_range"]
    assert experiment.parts == ("lr_range_a0",) and experiment.scale == "cpu"
    assert EXPERIMENTS["lr_range_a0"].part_of == "lr_range"
    for scale in ("smoke", "cpu", "paper"):
        assert sweep_name("lr_range", scale) == sweep_name("lr_range_a0", scale)
    args = argparse.Namespace(
        scale="cpu", output_root=tmp_path, seeds="mean", overrides=["data_root=/data"]
    )
    sweep, report, sweep_dir = commands(experiment, args)
    found = all_sweep_commands(experiment, args, sweep)
    assert [c[3] for c in found] == ["experiment=lr_range", "experiment=lr_range_a0"]
    assert all("data_root=/data" in c and "scale=cpu" in c for c in found)
    assert sweep_dir.name == "cpu_lr_range"
    tables = report[report.index("--tables") + 1 : report.index("--plots")]
    assert {"verdicts", "lr_mechanism", "table1", "shrink_stops_by_layer"} <= set(tables)
    assert "lr_range" in report[report.index("--plots") :]


def test_cpu_lr_range_is_the_tuned_setting_at_four_lrs_and_a0_x4():
    params = sweep_params("lr_range", "cpu")
    assert [float(v) for v in params["optim.lr"]] == [1e-4, 3.16e-4, 1e-3, 3.16e-3]
    assert params["method"] == ["lora", "stable_lora"] and params["seed"] == ["0", "1", "2"]
    assert len(sweep_jobs("lr_range", "cpu")) == 24 and len(sweep_jobs("lr_range_a0", "cpu")) == 6
    a0 = compose("lr_range_a0", "cpu", tuple(sweep_jobs("lr_range_a0", "cpu")[0]))
    assert (a0.adapter.init_scale, a0.optim.lr) == (4.0, 3.16e-3)
    for cfg in (compose("lr_range", "cpu", tuple(sweep_jobs("lr_range", "cpu")[0])), a0):
        assert cfg.task.name == "arc_bbc" and cfg.task.split_rule == "content"
        assert cfg.probe.every == 50 and cfg.probe.per_layer and cfg.trainer.max_steps == 1000
        assert cfg.analysis.primary.margin_pp == 1.0
        assert cfg.analysis.primary.declared == "before_runs"


# ---------------------------------------------------------------------------- paper scale
PAPER_MODELS = {"qwen2_0.5b", "llama3.2_1b", "qwen2_1.5b", "llama3.2_3b"}
PAPER_TASKS = {"hellaswag", "siqa", "obqa", "arc_easy", "arc_challenge"}


@pytest.mark.parametrize(
    ("name", "runs", "methods", "seeds"),
    [
        ("tuned_select", 4 * 5 * 5 * 4, 4, 1),
        ("tuned_final", 4 * 5 * 4 * 3, 4, 3),
        ("lr_range", 4 * 5 * 4 * 2 * 3, 2, 3),
        ("lr_range_a0", 4 * 5 * 2 * 3, 2, 3),
    ],
)
def test_the_protocols_compose_at_the_papers_scale(name, runs, methods, seeds):
    jobs = sweep_jobs(name, "paper")
    assert len(jobs) == runs
    params = sweep_params(name, "paper")
    assert set(params["model"]) == PAPER_MODELS and set(params["task"]) == PAPER_TASKS
    assert len(params["method"]) == methods and len(params["seed"]) == seeds
    assert params.get("optim.lr") == sweep_params(name, "cpu").get("optim.lr")  # the same grid
    split = "validation" if name == "tuned_select" else None
    for job in (jobs[0], jobs[-1]):
        cfg = compose(name, "paper", tuple(job))
        assert cfg.sweep_name == sweep_name(name, "paper") and cfg.model.name in PAPER_MODELS
        assert cfg.model.source != "gguf" and cfg.trainer.batch_size == 16
        assert cfg.task.hub_id and cfg.data_root is None  # from the Hub (nothing read here)
        assert cfg.task.holdout_validation and cfg.trainer.max_eval_examples is None
        assert cfg.task.eval_split == (
            split or ("validation" if cfg.task.name in ("hellaswag", "siqa") else "test")
        )
    # the CPU scale is unchanged: SmolLM2 on the arc_bbc mixture
    cpu = compose(name, "cpu", tuple(sweep_jobs(name, "cpu")[0]))
    assert (cpu.model.name, cpu.task.name, cpu.trainer.batch_size) == ("smollm2_135m", "arc_bbc", 8)


def test_paper_tuned_final_runs_each_model_task_and_method_at_its_pick(tmp_path):
    import json

    picks = [
        {"model": m, "task": t, "method": k, "lr": 1e-4 * (1 + i)}
        for i, (m, t, k) in enumerate(
            (m, t, k)
            for m in sorted(PAPER_MODELS)
            for t in sorted(PAPER_TASKS)
            for k in ("lora", "rslora", "loraplus", "stable_lora")
        )
    ]
    path = tmp_path / "tuned_lr.json"
    path.write_text(json.dumps({"metric": PICKS_METRIC, "picks": picks}))
    final = EXPERIMENTS["tuned_final"]
    args = argparse.Namespace(
        scale="paper", output_root=tmp_path, seeds="mean", overrides=[], lr_selection=path
    )
    split = sweep_commands(final, args, commands(final, args)[0])
    assert len(split) == 4 * 5 * 4
    lrs = {(p["model"], p["task"], p["method"]): p["lr"] for p in picks}
    for command in split:
        values = dict(part.split("=", 1) for part in command if "=" in part)
        key = (values["model"], values["task"], values["method"])
        assert float(values["optim.lr"]) == lrs[key] and values["scale"] == "paper"
        assert sum(part.startswith("model=") for part in command) == 1
    path.write_text(json.dumps({"metric": PICKS_METRIC, "picks": picks[1:]}))
    with pytest.raises(SystemExit, match="no pick for model"):
        sweep_commands(final, args, commands(final, args)[0])


# ---------------------------------------------------------------------------- cost
def test_step_flops_are_four_n_t_and_scoring_two_n_per_token():
    assert cost.train_flops(1e9, 16, 100, 10) == 4e9 * 1600 * 10
    assert cost.eval_flops(1e9, 10, 4, 50) == 2e9 * 2000
    assert cost.gpu_hours(0.4 * 989e12 * 3600) == pytest.approx(1.0)


def test_protocol_costs_price_every_run_of_the_paper_sweep():
    priced = cost.protocol_cost("lr_range")
    assert priced.runs == len(sweep_jobs("lr_range", "paper")) and priced.steps == 2000
    per_model_task = sum(
        cost.train_flops(cost.MODEL_PARAMS[m], 16, cost.TASKS[t].tokens, 2000)
        for m in PAPER_MODELS
        for t in PAPER_TASKS
    )
    assert priced.train_flops == pytest.approx(per_model_task * 4 * 2 * 3)
    text = cost.table()
    assert "| `lr_range` | 480 |" in text and "| `tuned_final` | 240 |" in text


def test_cost_command_prints_the_table(capsys):
    assert cost.main(["--utilisation", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "4 N T" in out and "llama3.2_3b" in out


def test_the_docs_show_the_cost_table_the_script_prints():
    from experiments.catalog import ROOT

    assert cost.table() in (ROOT / "docs" / "experiments.md").read_text()
