"""experiments/: every artefact's smoke variant end to end, and every full preset composes.

An experiment is ``conf/experiment/<name>.yaml`` (the paper's settings, the sweep under
``hydra.sweeper.params``), ``conf/experiment/<name>_smoke.yaml`` (CI-sized) and its row in
``experiments.common.EXPERIMENTS`` (``python -m experiments <name>``: sweep, then
``python -m analysis.report``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from analysis import published
from experiments.common import EXPERIMENTS as ARTEFACTS
from experiments.common import OWN_COMMAND, main, sweep_params

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
EXPERIMENTS = list(ARTEFACTS)
#: The paper's artefacts at the paper's scale, and their CPU-scale reproductions (cpu/<name>).
PAPER_SCALE = [name for name in EXPERIMENTS if not name.startswith("cpu/")]
CPU_SCALE = [name for name in EXPERIMENTS if name.startswith("cpu/")]
CONTROLS_GROUP = "+experiment/controls"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def exists(group: str, option: str) -> bool:
    return (CONF / group / f"{option}.yaml").exists()


def override(key: str, value: str) -> str:
    return f"{key}={value}"


# ---------------------------------------------------------------------------- full presets
@pytest.mark.parametrize("name", PAPER_SCALE)
def test_full_preset_composes_and_declares_its_sweep(name):
    cfg = compose_config([f"experiment={name}"])
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.experiment_name == name and cfg.sweep_name == name
    params = sweep_params(name)
    assert params.get("seed") == ["0", "1", "2"], "the paper's protocol: three seeds"
    assert cfg.model.name in published.PAPER_MODELS or "model" in params


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_swept_value_composes(name):
    """Each value of each swept key composes into a job config (one key at a time); method
    configs that other work has not added yet are reported as a skip, after the rest passed."""
    pending = []
    for key, values in sweep_params(name).items():
        for value in values:
            if key == "method" and not exists("method", value):
                pending.append(value)
                continue
            if key == CONTROLS_GROUP:
                variant = (CONF / "experiment" / "controls" / f"{value}.yaml").read_text()
                method = variant.split("override /method: ")[1].split()[0]
                if not exists("method", method):
                    pending.append(f"{method} (controls/{value})")
                    continue
            for group in ("model", "task"):
                if key == group:
                    assert exists(group, value), f"{name}: no conf/{group}/{value}.yaml"
            cfg = compose_config([f"experiment={name}", override(key, value)])
            OmegaConf.to_container(cfg, resolve=True)
    if pending:
        pytest.skip(f"{name}: method configs not in conf/method yet: {sorted(set(pending))}")


@pytest.mark.parametrize("name", CPU_SCALE)
def test_cpu_preset_runs_the_shipped_model_on_fixed_eval_examples(name):
    cfg = compose_config([f"experiment={name}"])
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.experiment_name == cfg.sweep_name == name.replace("/", "_")
    assert cfg.model.name == "smollm2_135m" and cfg.model.source == "gguf"  # no Hub, no GPU
    # Every run of a table is scored on the same examples, by one process using both cores.
    assert cfg.trainer.max_eval_examples and cfg.trainer.num_threads == 2
    assert cfg.logger.mode == "disabled" and sweep_params(name).get("seed")


def test_full_presets_use_the_papers_settings():
    table1 = sweep_params("table1_qa")
    assert set(table1["model"]) == set(published.PAPER_MODELS)
    assert set(table1["task"]) == set(published.QA_TASKS)
    assert set(table1["method"]) == set(published.PAPER_METHODS)
    gsm8k = compose_config(["experiment=gsm8k"])
    assert gsm8k.task.name == "metamath_gsm8k" and gsm8k.trainer.max_steps == 5000
    assert 5000 % gsm8k.trainer.eval_every == 0 and gsm8k.trainer.eval_every <= 1000
    stop = sweep_params("ablation_stop_rule")
    assert set(stop["optimizer.stop_rule"]) == {"norm", "never"}
    assert compose_config(["experiment=ablation_stop_rule"]).task.name == "merged_qa"
    modules = sweep_params("ablation_target_modules")["adapter.target_modules"]
    assert len(modules) == 3 and "gate_proj" in modules[-1]
    overhead = compose_config(["experiment=overhead"])
    assert (overhead.model.name, overhead.task.name) == ("qwen2_0.5b", "hellaswag")
    assert not overhead.probe.enabled
    assert set(sweep_params("overhead")["method"]) == set(published.PAPER_METHODS)
    assert set(sweep_params("init_scale")["adapter.init_scale"]) == {"0", "0.25", "1", "4"}
    controls = set(sweep_params("reviewer_controls")[CONTROLS_GROUP])
    assert {"lora", "stable_lora", "large_wd_a", "large_wd_ab"} <= controls
    assert any(c.startswith("shrink_steps_") for c in controls)


@pytest.mark.parametrize(
    "variant", sorted(p.stem for p in (CONF / "experiment" / "controls").glob("*.yaml"))
)
def test_reviewer_control_variants(variant):
    text = (CONF / "experiment" / "controls" / f"{variant}.yaml").read_text()
    method = text.split("override /method: ")[1].split()[0]
    if not exists("method", method):
        pytest.skip(f"conf/method/{method}.yaml is not there yet")
    cfg = compose_config(["experiment=reviewer_controls", f"{CONTROLS_GROUP}={variant}"])
    OmegaConf.to_container(cfg, resolve=True)
    if variant.startswith("shrink_steps_"):
        assert cfg.method.name == "shrink_fixed_steps" and cfg.optimizer.shrink_ratio > 0
        assert cfg.optimizer.stop_rule == f"steps:{variant.removeprefix('shrink_steps_')}"
    if variant.startswith("large_wd_"):
        assert cfg.optimizer.builder == "adamw_large_wd"
        assert cfg.optimizer.large_wd_on == variant.removeprefix("large_wd_").upper()


# ---------------------------------------------------------------------------- smoke presets
def job_count(params: dict[str, list[str]]) -> int:
    return len(list(itertools.product(*params.values())))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_smoke_preset_is_ci_sized_and_uses_existing_configs(name):
    cfg = compose_config([f"experiment={name}_smoke"])
    assert cfg.experiment_name == f"{name.replace('/', '_')}_smoke"
    assert cfg.model.name == "tiny_llama"
    assert cfg.task.name in ("bbc_news", "arithmetic", "chatterbot")  # offline tasks
    assert cfg.trainer.max_steps <= 8 and cfg.trainer.max_eval_examples <= 16
    params = sweep_params(f"{name}_smoke")
    assert job_count(params) <= 6
    for method in params.get("method", []):
        assert exists("method", method), method
    for variant in params.get(CONTROLS_GROUP, []):
        text = (CONF / "experiment" / "controls" / f"{variant}.yaml").read_text()
        assert exists("method", text.split("override /method: ")[1].split()[0]), variant


def test_every_preset_pair_has_an_entry_and_no_entry_lacks_one():
    root = CONF / "experiment"
    presets = {p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*_smoke.yaml")}
    presets -= {"_smoke"}  # the smoke presets' shared base
    named = {name.removesuffix("_smoke") for name in presets}
    assert named == set(ARTEFACTS) | set(OWN_COMMAND)
    for name in named:
        assert (CONF / "experiment" / f"{name}.yaml").exists(), name


def test_unknown_experiment_is_one_line_naming_the_choices(capsys):
    assert main(["table_one"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "unknown experiment 'table_one'" in error
    assert all(name in error for name in EXPERIMENTS)


def test_experiment_entry_builds_the_sweep_and_report_commands(tmp_path):
    from experiments.common import commands

    args = argparse.Namespace(
        smoke=True, output_root=tmp_path, seeds="best", overrides=["trainer.max_steps=2"]
    )
    sweep, report, sweep_dir = commands(ARTEFACTS["ablation_stop_rule"], args)
    assert sweep[1:] == [
        "run.py",
        "-m",
        "experiment=ablation_stop_rule_smoke",
        f"output_root={tmp_path.resolve()}",
        "trainer.max_steps=2",
    ]
    assert sweep_dir == tmp_path.resolve() / "sweeps" / "ablation_stop_rule_smoke"
    assert report[1:5] == ["-m", "analysis.report", str(sweep_dir), "--seeds"]
    assert "ablation_stop_rule" in report[report.index("--tables") :]


def test_process_per_method_gives_one_sweep_command_per_value(tmp_path):
    from experiments.common import commands, sweep_commands

    experiment = ARTEFACTS["cpu/overhead"]
    assert experiment.process_per == "method"
    for overrides, methods in (
        (["seed=0"], sweep_params("cpu/overhead")["method"]),  # the preset's values
        (["method=riemann,lora", "seed=0"], ["riemann", "lora"]),  # the command line's
    ):
        args = argparse.Namespace(smoke=False, output_root=tmp_path, seeds="mean",
                                  overrides=overrides)  # fmt: skip
        sweep, _, _ = commands(experiment, args)
        split = sweep_commands(experiment, args, sweep)
        assert [command[-1] for command in split] == [f"method={m}" for m in methods]
        assert all(sum(part.startswith("method=") for part in c) == 1 for c in split)
        assert all("seed=0" in command for command in split)
    assert len(methods) == 2 and len(sweep_params("cpu/overhead")["method"]) == 5
    no_split = ARTEFACTS["cpu/table1"]
    args.overrides = []
    assert sweep_commands(no_split, args, ["x"]) == [["x"]]


def test_tuned_final_runs_each_method_at_its_pick_and_passes_the_horizon_on(tmp_path):
    from analysis.tables.tuned_lr import PICKS_FILE as ANALYSIS_PICKS_FILE
    from experiments.common import PICKS_FILE, commands, selection_command, sweep_commands

    assert PICKS_FILE == ANALYSIS_PICKS_FILE
    final = ARTEFACTS["cpu/tuned_final"]
    assert final.lr_from == "cpu/tuned_select"
    picks = tmp_path / PICKS_FILE
    picks.write_text(
        '{"picks": [{"method": "lora", "lr": 0.000316}, {"method": "rslora", "lr": 0.001},'
        ' {"method": "loraplus", "lr": 0.0001}, {"method": "stable_lora", "lr": 0.001}]}'
    )
    overrides = ["data_root=/data", "trainer.max_steps=2000", "seed=1", "optim.lr=9"]
    args = argparse.Namespace(smoke=False, output_root=tmp_path, seeds="mean",
                              overrides=overrides, lr_selection=picks)  # fmt: skip
    sweep, _, _ = commands(final, args)
    split = sweep_commands(final, args, sweep)
    assert [c[-2:] for c in split] == [
        ["method=lora", "optim.lr=0.000316"],
        ["method=rslora", "optim.lr=0.001"],
        ["method=loraplus", "optim.lr=0.0001"],
        ["method=stable_lora", "optim.lr=0.001"],
    ]
    assert all("optim.lr=9" not in c and "trainer.max_steps=2000" in c for c in split)
    # the selection stage gets the horizon and data, not the final stage's seeds or lr
    selection = selection_command(final, args)
    assert selection[3] == "cpu/tuned_select"
    assert selection[-2:] == ["data_root=/data", "trainer.max_steps=2000"]
    args.overrides = ["method=lora,lora_rite"]
    with pytest.raises(SystemExit, match="no pick for method lora_rite"):
        sweep_commands(final, args, sweep)
    args.lr_selection = tmp_path / "missing.json"
    with pytest.raises(SystemExit, match="no picked learning rates at .*missing.json"):
        sweep_commands(final, args, sweep)


def test_tuned_presets_share_the_setting_and_differ_in_split_and_seeds():
    select = compose_config(["experiment=cpu/tuned_select"])
    final = compose_config(["experiment=cpu/tuned_final"])
    assert select.task.eval_split == "validation" and final.task.eval_split == "test"
    assert select.task.holdout_validation and final.task.holdout_validation
    assert select.task.name == final.task.name == "arc_bbc"
    assert set(select.task.subtasks) == {"arc_easy", "arc_challenge", "bbc_news"}
    for cfg in (select, final):
        assert cfg.trainer.max_steps >= 1000 and cfg.trainer.batch_size == 8
        assert cfg.adapter.rank == 8 and list(cfg.adapter.target_modules) == ["q_proj", "v_proj"]
        assert cfg.trainer.max_eval_examples >= 2376 and cfg.task.max_eval_examples is None
    grid = [float(lr) for lr in sweep_params("cpu/tuned_select")["optim.lr"]]
    assert len(grid) >= 3 and min(grid) <= 1e-4 and max(grid) >= 1e-3
    ratios = [b / a for a, b in zip(grid, grid[1:])]
    assert max(ratios) / min(ratios) < 1.01  # log-spaced
    methods = {"lora", "rslora", "loraplus", "stable_lora"}
    assert set(sweep_params("cpu/tuned_select")["method"]) >= methods
    assert set(sweep_params("cpu/tuned_final")["method"]) >= methods
    assert sweep_params("cpu/tuned_select")["seed"] == ["0"]
    assert sweep_params("cpu/tuned_final")["seed"] == ["0", "1", "2"]


# ---------------------------------------------------------------------------- end to end
def read_display(report_dir: Path, table: str) -> str:
    return (report_dir / "tables" / f"{table}.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_smoke_experiment_end_to_end(name, tmp_path):
    experiment = ARTEFACTS[name]
    result = subprocess.run(
        [sys.executable, "-m", "experiments", name, "--smoke", "--output-root", str(tmp_path)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweep = tmp_path / "sweeps" / f"{name.replace('/', '_')}_smoke"
    summaries = sorted(sweep.rglob("summary.json"))
    assert len(summaries) == job_count(sweep_params(f"{name}_smoke"))
    runs = pd.read_csv(sweep / "report" / "tables" / "runs.csv")
    assert len(runs) == len(summaries) and set(runs["status"]) == {"completed"}
    report = sweep / "report"
    for table in experiment.tables:
        if table == "runs_not_completed":  # every run completed
            continue
        for ext in ("md", "tex", "csv"):
            assert (report / "tables" / f"{table}.{ext}").stat().st_size > 0, (table, ext)
    for plot in experiment.plots:
        for ext in ("png", "pdf"):
            assert (report / "plots" / f"{plot}.{ext}").stat().st_size > 1000, (plot, ext)
    assert "[analysis.report]" in result.stdout
    check_artefact(name, report)


def check_artefact(name: str, report: Path) -> None:
    """What each artefact's table must show for its smoke sweep."""
    tables = report / "tables"
    if name == "table1_qa":
        main = pd.read_csv(tables / "table1.csv")
        assert sorted(main["method"]) == ["lora", "stable_lora"]
        assert (main["bbc_news_n"] == 2).all() and main["avg"].notna().all()
    elif name == "gsm8k":
        data = pd.read_csv(tables / "gsm8k.csv")
        assert sorted(set(data["step"])) == [2, 4] and (data["n"] == 1).all()
    elif name == "ablation_stop_rule":
        data = pd.read_csv(tables / "ablation_stop_rule.csv")
        assert sorted(data["stop_rule"]) == ["never", "norm"]
        stops = pd.read_csv(tables / "shrink_stops.csv").set_index("label")
        assert stops.loc["stable_lora, stop_rule=never", "stopped"] == 0
    elif name == "ablation_target_modules":
        text = read_display(report, "ablation_target_modules")
        assert "| q,v |" in text and "| q,k,v,o |" in text
    elif name == "overhead":
        data = pd.read_csv(tables / "overhead.csv").set_index("method")
        assert set(data.index) == {"lora", "loraplus", "stable_lora"}
        assert data.loc["lora", "time_rel"] == 0 and (data["time"] > 0).all()
    elif name == "figure2_norms":
        assert pd.read_csv(tables / "shrink_stops.csv")["layers"].tolist() == [4]
    elif name == "init_scale":
        assert "A0 × 0" in read_display(report, "init_scale")
        assert "delta1/delta2" in read_display(report, "init_scale_stability")
    elif name == "cpu/table1":
        paired = pd.read_csv(tables / "paired_difference.csv")
        assert set(paired["label"]) == {"loraplus", "stable_lora"}
        assert (paired["pairs"] == 2).all() and paired["ci_low"].notna().all()
    elif name == "cpu/ablations":
        controls = pd.read_csv(tables / "reviewer_controls.csv").set_index("label")
        lora = controls.loc["lora, init_scale=1", "value"]
        assert controls.loc["lora, init_scale=1", "diff_lora"] == 0
        assert controls.loc["adamw_large_wd", "diff_lora"] == pytest.approx(
            controls.loc["adamw_large_wd", "value"] - lora
        )
        scales = pd.read_csv(tables / "init_scale.csv")
        assert set(scales["adapter.init_scale"]) == {1.0, 4.0}
        rules = set(pd.read_csv(tables / "ablation_stop_rule.csv")["stop_rule"])
        assert rules == {"norm", "never", "steps:50"}
    elif name == "cpu/overhead":  # one process per method: each has its own peak memory
        data = pd.read_csv(tables / "overhead.csv").set_index("method")
        assert set(data.index) == {"lora", "stable_lora"} and (data["memory"] > 0).all()
    elif name == "cpu/tuned_select":
        picks = json.loads((report / "tuned_lr.json").read_text())
        assert picks["split"] == "validation"
        assert {p["method"] for p in picks["picks"]} == {"lora", "loraplus", "stable_lora"}
        data = pd.read_csv(tables / "tuned_lr.csv")
        assert len(data) == 6 and data["picked"].sum() == 3
    elif name == "cpu/tuned_final":  # its selection stage ran first, in the same output root
        selection = report.parents[1] / "cpu_tuned_select_smoke" / "report" / "tuned_lr.json"
        picked = {p["method"]: p["lr"] for p in json.loads(selection.read_text())["picks"]}
        runs = pd.read_csv(tables / "runs.csv")
        assert all(picked[m] == lr for m, lr in zip(runs["method"], runs["optim.lr"]))
        assert set(runs["task.eval_split"]) == {"test"} and runs["task.holdout_validation"].all()
        mcnemar = pd.read_csv(tables / "paired_examples.csv")
        assert set(mcnemar["method"]) == {"stable_lora"} and sorted(mcnemar["seed"]) == [0, 1]
        assert (mcnemar["n"] == 8).all()
        assert "stable_lora" in set(pd.read_csv(tables / "paired_bootstrap.csv")["method"])
    elif name == "cpu/dialogue":
        data = pd.read_csv(tables / "dialogue.csv").set_index("label")
        assert list(data.index) == ["before training", "lora", "stable_lora"]
        assert (data.loc[["lora", "stable_lora"], ["loss_n", "rougeL_n"]] == 2).all().all()
        assert (data["loss"] > 0).all() and (data["ppl"] >= 1).all()
        assert data["rougeL"].between(0, 100).all()
        # ppl = exp(loss) run by run, so the mean ppl is at least exp(mean loss)
        assert (data["ppl"] >= data["loss"].map(math.exp) * (1 - 1e-9)).all()
        assert "ROUGE-L (%)" in read_display(report, "dialogue")
    elif name == "reviewer_controls":
        data = pd.read_csv(tables / "reviewer_controls.csv")
        assert set(data["label"]) == {"lora", "stable_lora", "shrink_fixed_steps", "adamw_large_wd"}
        assert (data["method"] == "shrink_fixed_steps").sum() == 1
    elif name == "cpu/main":
        data = pd.read_csv(tables / "side_by_side.csv").set_index("label")
        assert sorted(data.index) == ["lora", "stable_lora"] and (data["runs"] == 1).all()
        assert data[["before", "after", "norm_A_first", "norm_A_last"]].notna().all().all()
        assert data.loc["lora", "before"] == data.loc["stable_lora", "before"]  # same model
        assert math.isnan(data.loc["lora", "layers"])  # AdamW has no shrink
        stable = data.loc["stable_lora"]
        assert 1 <= stable["stopped"] <= stable["layers"] and stable["median_stop_step"] >= 1
        assert (data["delta_ratio_mid"] > 0).all()
