"""experiments/: every experiment at every scale composes, its sweep composes the runs it
always did, and every experiment runs end to end at smoke scale.

An experiment is ``conf/experiment/<name>.yaml`` (what it compares, the sweep under
``hydra.sweeper.params``), its settings at a scale where it has any
(``conf/experiment/<name>/<scale>.yaml``) and its row in ``experiments.common.EXPERIMENTS``
(``python -m experiments <name> --scale paper|cpu|smoke``: sweep, then
``python -m analysis.report``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import CONF, ROOT, check_latex, compose_config, run_cli
from omegaconf import OmegaConf

from analysis import published
from experiments.catalog import EXPERIMENTS as ARTEFACTS
from experiments.catalog import (
    OWN_COMMAND,
    RENAMED,
    experiments_at,
    sweep_jobs,
    sweep_params,
)
from experiments.common import main, picked_lrs
from experiments.reproduce import selection_args
from stablelora.config.identity import HASH_LENGTH, computed_config, config_hash

EXPERIMENTS = list(ARTEFACTS)
PAPER = [name for name, e in ARTEFACTS.items() if e.scale == "paper"]
CPU = experiments_at("cpu")
#: Every run each sweep composed before the presets were restructured (issue 23).
PRESET_RUNS = json.loads((ROOT / "tests" / "fixtures" / "preset_runs.json").read_text())["runs"]


def folder(name: str) -> str:
    """The experiment whose sweep folder ``name`` runs into (its own, or that of the
    experiment it is a part of)."""
    return ARTEFACTS[name].part_of or name


def exists(group: str, option: str) -> bool:
    return (CONF / group / f"{option}.yaml").exists()


def jobs(name: str, scale: str) -> list[list[str]]:
    """The whole command-line overrides of every job of the experiment's sweep at ``scale``."""
    return [[f"experiment={name}", f"scale={scale}", *job] for job in sweep_jobs(name, scale)]


def committed_cpu_jobs(name: str) -> list[list[str]]:
    """The jobs of the experiment's CPU sweep; a final stage (``lr_from``) runs each method at
    the lr its committed selection picked, as ``python -m experiments.reproduce`` does."""
    found = jobs(name, "cpu")
    selection = selection_args(name, "cpu", ROOT / "results" / "cpu")  # ["--lr-selection", FILE]
    if not selection:
        return found
    lrs = picked_lrs(Path(selection[1]), sweep_params(name, "cpu")["method"], "committed_cpu_jobs")

    def at_pick(job: list[str]) -> list[str]:
        method = next(p[len("method=") :] for p in job if p.startswith("method="))
        return [*(p for p in job if not p.startswith("optim.lr=")), f"optim.lr={lrs[method]!r}"]

    return [at_pick(job) for job in found]


def variant_method(variant: str) -> str:
    """The method preset a variant selects: its one ``override /method`` defaults entry."""
    defaults = yaml.safe_load((CONF / "variant" / f"{variant}.yaml").read_text())["defaults"]
    (method,) = [
        entry["override /method"]
        for entry in defaults
        if isinstance(entry, dict) and "override /method" in entry
    ]
    return method


# ---------------------------------------------------------------------------- presets
def test_added_keys_at_their_neutral_value_and_renamed_values_keep_the_hash(monkeypatch):
    """The migration hooks: a key added later at the value that computes what old runs did,
    and a value renamed later, hash as the recorded config did; any other value moves it."""
    from stablelora.config import identity

    recorded = {"seed": 0, "optimizer": {"builder": "old"}, "trainer": {"max_steps": 5}}
    monkeypatch.setattr(identity, "NEUTRAL_DEFAULTS", {"trainer.new_flag": False})
    monkeypatch.setattr(identity, "RECORDED_NAMES", {"optimizer.builder": {"new": "old"}})
    now = {
        "seed": 0,
        "optimizer": {"builder": "new"},
        "trainer": {"max_steps": 5, "new_flag": False},
    }
    assert config_hash(now) == config_hash(recorded)
    assert config_hash({**now, "trainer": {"max_steps": 5, "new_flag": True}}) != config_hash(
        recorded
    )
    assert config_hash({**now, "optimizer": {"builder": "other"}}) != config_hash(recorded)


def test_a_run_recorded_under_the_old_names_keeps_its_folder_and_is_read_by_todays_names(tmp_path):
    """Renames since the committed runs were recorded (``optim.*`` out of a group of its own,
    AdamW's builder ``lora`` -> ``adamw``, duplicate variants removed, the CPU scale stated by
    the catalog alone) keep their folders: a committed LoRA run's recorded config (``builder:
    lora``) hashes as today's composed config, the runner's folder check takes the folder as
    today's configuration's (a rerun resumes it) and refuses another optimizer, and the
    library and the analysis read the old name as the new one."""
    from analysis.labels import current_names
    from stablelora.optim import optimizer_options
    from stablelora.runner.folder import RunFolderError, check_run_folder

    run = ROOT / "results/cpu/cpu_main/runs/lora-bbc_news-smollm2_135m-s0-4f633a0ae1"
    recorded = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    assert recorded["optimizer"]["builder"] == "lora" and "packing" not in recorded["trainer"]
    today = compose_config(["experiment=main", "scale=cpu", "variant=lora", "seed=0"])
    assert today.optimizer.builder == "adamw"
    assert config_hash(recorded) == config_hash(today) == run.name[-HASH_LENGTH:]
    folder = tmp_path / run.name
    folder.mkdir()
    (folder / "config.yaml").write_text((run / "config.yaml").read_text())
    resolved = OmegaConf.to_container(today, resolve=True)
    check_run_folder(folder, resolved)  # the same configuration: no error
    other = {**resolved, "optimizer": {"name": "adamw", "builder": "riemann"}}
    with pytest.raises(RunFolderError, match=r"differs in optimizer\.builder"):
        check_run_folder(folder, other)
    assert optimizer_options("lora") == optimizer_options("adamw") == {}
    runs = pd.DataFrame({"optimizer.builder": ["lora", "adamw", "riemann"]})
    assert list(current_names(runs)["optimizer.builder"]) == ["adamw", "adamw", "riemann"]


@pytest.mark.parametrize("key", sorted(PRESET_RUNS))
def test_each_sweep_composes_the_runs_it_always_did(key):
    """A run's folder is the hash of its configuration: the restructured presets must compose
    the very runs the old ones did (same count, and a sample of jobs hashed), or committed
    records and half-done sweeps would lose their folders."""
    name, scale = key.split("@")
    expected = set(PRESET_RUNS[key])
    every = jobs(name, scale)
    deliberate = "a deliberate change of what runs compute: python scripts/preset_runs.py"
    assert len(every) == len(expected), f"{key}: {len(every)} jobs ({deliberate})"
    step = max(1, len(every) // 4)
    for overrides in [*every[::step], every[-1]]:
        assert config_hash(compose_config(overrides)) in expected, f"{overrides} ({deliberate})"


def test_committed_cpu_runs_are_runs_of_their_experiment():
    """A committed run recorded under today's configuration keys (not before a key was added,
    e.g. trainer.length_grouping) holds the configuration its folder name hashes, and that is
    a configuration its experiment's CPU sweep composes with the data_root it was run with."""

    def keys(tree: dict, prefix: str = "") -> set[str]:
        return {f"{prefix}{k}" for k in tree} | {
            key for k, v in tree.items() if isinstance(v, dict) for key in keys(v, f"{prefix}{k}.")
        }

    def common(tree: dict) -> set[str]:  # the keys every method has (optimizers differ)
        # display-only keys (e.g. the analysis plan) are no part of what a run computes
        return {key for key in keys(computed_config(tree)) if not key.startswith("optimizer.")}

    every: dict[tuple[str, str], list[list[str]]] = {}
    first: dict[tuple[str, str], set[str]] = {}
    hashes: dict[tuple[str, str], set[str]] = {}
    checked = members = 0
    for config in sorted((ROOT / "results" / "cpu").glob("cpu_*/runs/*/config.yaml")):
        run_dir, recorded = config.parent, OmegaConf.to_container(OmegaConf.load(config))
        digest = run_dir.name[-HASH_LENGTH:]
        checked += 1
        sweep = run_dir.parents[1].name.removeprefix("cpu_"), recorded["data_root"]
        if sweep not in first:
            every[sweep] = [[*job, f"data_root={sweep[1]}"] for job in committed_cpu_jobs(sweep[0])]
            first[sweep] = common(OmegaConf.to_container(compose_config(every[sweep][0])))
        if common(recorded) != first[sweep]:
            continue  # recorded before a configuration key was added (task.split_rule...)
        if sweep not in hashes:
            hashes[sweep] = {config_hash(compose_config(job)) for job in every[sweep]}
        assert config_hash(recorded) == digest, run_dir
        assert digest in hashes[sweep], run_dir
        members += 1
    # Every committed run predates task.split_rule and the model configs without the tiny
    # block; runs recorded since are held to their experiment's sweep above.
    assert checked >= 90


@pytest.mark.parametrize("name", PAPER)
def test_paper_scale_declares_three_seeds_and_the_papers_models(name):
    cfg = compose_config([f"experiment={name}"])
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.experiment_name == cfg.sweep_name == name
    params = sweep_params(name, "paper")
    assert params.get("seed") == ["0", "1", "2"], "the paper's protocol: three seeds"
    assert cfg.model.name in published.PAPER_MODELS or "model" in params


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_swept_value_composes(name):
    """Each value of each swept key composes into a job config (one key at a time)."""
    scale = ARTEFACTS[name].scale
    for key, values in sweep_params(name, scale).items():
        for value in values:
            if key in ("model", "task", "method", "variant"):
                assert exists(key, value), f"{name}: no conf/{key}/{value}.yaml"
            cfg = compose_config([f"experiment={name}", f"scale={scale}", f"{key}={value}"])
            OmegaConf.to_container(cfg, resolve=True)
            if key == "variant":  # a method preset with options: the preset exists
                assert exists("method", cfg.method.preset), value


@pytest.mark.parametrize("name", CPU)
def test_cpu_scale_runs_the_shipped_model_on_fixed_eval_examples(name):
    for overrides in jobs(name, "cpu")[:1]:
        cfg = compose_config(overrides)
        OmegaConf.to_container(cfg, resolve=True)
        assert cfg.sweep_name == f"cpu_{folder(name)}"
        assert cfg.model.name == "smollm2_135m" and cfg.model.source == "gguf"  # no Hub/GPU
        # Every run of a table is scored on the same examples, by one process using both cores.
        assert cfg.trainer.max_eval_examples and cfg.trainer.num_threads == 2
        assert cfg.trainer.batch_size == 8 and cfg.logger.mode == "disabled"
        assert cfg.task.name in ("arc_easy", "obqa", "bbc_news", "chatterbot", "arc_bbc")


def test_paper_presets_use_the_papers_settings():
    table1 = sweep_params("table1", "paper")
    assert set(table1["model"]) == set(published.PAPER_MODELS)
    assert set(table1["task"]) == set(published.QA_TASKS)
    assert set(table1["method"]) == set(published.PAPER_METHODS)
    gsm8k = compose_config(["experiment=gsm8k"])
    assert gsm8k.task.name == "metamath_gsm8k" and gsm8k.trainer.max_steps == 5000
    assert 5000 % gsm8k.trainer.eval_every == 0 and gsm8k.trainer.eval_every <= 1000
    stop = sweep_params("ablation_stop_rule", "paper")
    assert set(stop["optimizer.stop_rule"]) == {"norm", "never"}
    assert compose_config(["experiment=ablation_stop_rule"]).task.name == "merged_qa"
    modules = sweep_params("ablation_target_modules", "paper")["adapter.target_modules"]
    assert len(modules) == 3 and "gate_proj" in modules[-1]
    overhead = compose_config(["experiment=overhead"])
    assert (overhead.model.name, overhead.task.name) == ("qwen2_0.5b", "hellaswag")
    assert not overhead.probe.enabled
    assert set(sweep_params("overhead", "paper")["method"]) == set(published.PAPER_METHODS)
    assert set(sweep_params("init_scale", "paper")["adapter.init_scale"]) == {"0", "0.25", "1", "4"}
    controls = set(sweep_params("reviewer_controls", "paper")["variant"])
    assert {"lora", "stable_lora", "large_wd_a", "large_wd_ab"} <= controls
    assert any(c.startswith("shrink_steps_") for c in controls)
    # at CPU scale Table 1 keeps the paper's columns on the offline tasks
    cpu = sweep_params("table1", "cpu")
    assert set(cpu["method"]) == set(published.PAPER_METHODS)
    assert cpu["model"] == ["smollm2_135m"] and cpu["probe"] == ["off"]


def swept_variants(path: str) -> list[str]:
    """The variants ``conf/experiment/<path>`` sweeps, as written in the file."""
    params = yaml.safe_load((CONF / "experiment" / path).read_text())["hydra"]["sweeper"]["params"]
    return params["variant"].split(",")


#: The variants experiment=reviewer_controls sweeps (at the paper's scale and in CI).
REVIEWER_CONTROLS = sorted(
    {*swept_variants("reviewer_controls.yaml"), *swept_variants("reviewer_controls/smoke.yaml")}
)


@pytest.mark.parametrize("variant", REVIEWER_CONTROLS)
def test_reviewer_control_variants(variant):
    cfg = compose_config(["experiment=reviewer_controls", f"variant={variant}"])
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.method.name == variant_method(variant)
    if variant.startswith("shrink_steps_"):  # at the paper's lambda
        assert cfg.method.name == "shrink_fixed_steps" and cfg.optimizer.shrink_ratio == 5e-4
        assert cfg.optimizer.stop_rule == f"steps:{variant.removeprefix('shrink_steps_')}"
    if variant.startswith("large_wd_"):
        assert cfg.optimizer.builder == "adamw_large_wd" and cfg.optimizer.large_weight_decay == 5
        assert cfg.optimizer.large_wd_on == variant.removeprefix("large_wd_").upper()


def test_no_two_variants_compose_the_same_and_old_names_say_the_new_one():
    """A variant is a method preset with its options, named for what it sets, whichever
    experiments sweep it: no two compose the same configuration (they were named per
    experiment, five repeating another's content), and a name they had before is one line
    naming today's."""
    from stablelora.config.groups import RENAMED_OPTIONS
    from stablelora.config.hydra_guards import check_command_line

    variants = sorted(path.stem for path in (CONF / "variant").glob("*.yaml"))
    seen: dict[str, str] = {}
    for variant in variants:
        composed = json.dumps(computed_config(compose_config([f"variant={variant}"])))
        assert composed not in seen, f"variant={variant} composes as variant={seen[composed]}"
        seen[composed] = variant
    assert set(RENAMED_OPTIONS["variant"].values()) <= set(variants)
    for old, new in RENAMED_OPTIONS["variant"].items():
        assert old not in variants
        with pytest.raises(ValueError, match=f"^variant={old} is now variant={new}\\.$"):
            check_command_line([f"variant={old}"], CONF)


# ---------------------------------------------------------------------------- smoke scale
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_smoke_scale_is_ci_sized_and_uses_existing_configs(name):
    every = jobs(name, "smoke")
    assert len(every) <= 8, name
    for overrides in every:
        cfg = compose_config(overrides)
        assert cfg.sweep_name == f"{folder(name)}_smoke" and cfg.model.name == "tiny_llama"
        assert cfg.task.name in ("bbc_news", "arithmetic", "chatterbot")  # offline tasks
        assert cfg.trainer.max_steps <= 8 and cfg.trainer.max_eval_examples <= 16
        assert exists("method", cfg.method.name.split("+")[0]) or "+" in cfg.method.name


def test_every_experiment_has_one_preset_and_no_preset_lacks_an_entry():
    root = CONF / "experiment"
    presets = {p.stem for p in root.glob("*.yaml") if not p.stem.startswith("_")}
    presets -= {"tiny_run"}  # the single tiny run of the runner's tests
    assert presets == set(ARTEFACTS) | set(OWN_COMMAND)
    # a scale's own settings belong to an experiment and name an existing scale
    for path in root.glob("*/*.yaml"):
        assert path.parent.name in presets and path.stem in ("paper", "cpu", "smoke"), path


def test_unknown_or_renamed_experiment_is_one_line(capsys):
    assert main(["table_one"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "unknown experiment 'table_one'" in error
    assert all(name in error for name in EXPERIMENTS)
    for old, new in RENAMED.items():
        assert main([old]) == 2
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and f"{old} is now {new}" in error


def test_experiment_entry_builds_the_sweep_and_report_commands(tmp_path):
    from experiments.common import commands

    args = argparse.Namespace(
        scale="smoke", output_root=tmp_path, seeds="best", overrides=["trainer.max_steps=2"]
    )
    sweep, report, sweep_dir = commands(ARTEFACTS["ablation_stop_rule"], args)
    assert sweep[1:] == [
        "run.py",
        "-m",
        "experiment=ablation_stop_rule",
        "scale=smoke",
        f"output_root={tmp_path.resolve()}",
        "trainer.max_steps=2",
    ]
    assert sweep_dir == tmp_path.resolve() / "sweeps" / "ablation_stop_rule_smoke"
    assert report[1:5] == ["-m", "analysis.report", str(sweep_dir), "--seeds"]
    assert "ablation_stop_rule" in report[report.index("--tables") :]
    # the report at each scale: CPU's own tables where they differ, all of them in CI
    table1 = ARTEFACTS["table1"]
    assert "paired_difference" not in table1.report("paper")[0]
    assert "paired_difference" in table1.report("cpu")[0] and "eval" not in table1.report("cpu")[1]
    assert set(table1.report("smoke")[0]) == set(table1.report("paper")[0]) | set(
        table1.report("cpu")[0]
    )
    args.scale = "cpu"
    assert commands(table1, args)[2].name == "cpu_table1"


def test_process_per_method_gives_one_sweep_command_per_value(tmp_path):
    from experiments.common import commands, sweep_commands

    experiment = ARTEFACTS["overhead"]
    assert experiment.process_per == "method"
    for overrides, methods in (
        (["seed=0"], sweep_params("overhead", "cpu")["method"]),  # the preset's values
        (["method=riemann,lora", "seed=0"], ["riemann", "lora"]),  # the command line's
    ):
        args = argparse.Namespace(scale="cpu", output_root=tmp_path, seeds="mean",
                                  overrides=overrides)  # fmt: skip
        sweep, _, _ = commands(experiment, args)
        split = sweep_commands(experiment, args, sweep)
        assert [command[-1] for command in split] == [f"method={m}" for m in methods]
        assert all(sum(part.startswith("method=") for part in c) == 1 for c in split)
        assert all("seed=0" in command and "scale=cpu" in command for command in split)
    assert len(methods) == 2 and len(sweep_params("overhead", "cpu")["method"]) == 5
    no_split = ARTEFACTS["table1"]
    args.overrides = []
    assert sweep_commands(no_split, args, ["x"]) == [["x"]]


def test_sweeps_and_reports_run_in_the_drivers_process_but_per_process_measures_do_not(
    tmp_path, monkeypatch
):
    """``python -m experiments`` runs a sweep (Hydra's multirun) and the report in its own
    process, except the sweeps of an experiment with ``process_per`` (peak memory per method);
    a sweep stopped by a signal (exit code 128 + n) ends it: no next sweep, no report."""
    import experiments.common as common

    calls = []

    def fake_call(command, quiet=False, own_process=False):
        calls.append((command[1:3], own_process))
        if command[1] == "run.py":  # what the sweep would leave: its folder
            (tmp_path / "sweeps" / f"{command[3].split('=')[1]}_smoke").mkdir(parents=True,
                                                                             exist_ok=True)  # fmt: skip
        return 0

    monkeypatch.setattr(common, "call", fake_call)
    assert main(["overhead", "--scale", "smoke", "--output-root", str(tmp_path)]) == 0
    assert [own for (script, _), own in calls if script == "run.py"] == [True, True]
    assert calls[-1] == (["-m", "analysis.report"], False)
    calls.clear()
    assert main(["lr_range", "--scale", "smoke", "--output-root", str(tmp_path)]) == 0
    assert [c for c in calls] == [(["run.py", "-m"], False)] * 2 + [
        (["-m", "analysis.report"], False)
    ]
    # a stop signal ends the first sweep: its code, nothing after it
    calls.clear()
    monkeypatch.setattr(common, "call", lambda command, **_: calls.append(command) or 143)
    assert main(["lr_range", "--scale", "smoke", "--output-root", str(tmp_path)]) == 143
    assert len(calls) == 1


def test_call_runs_the_analysis_and_sweeps_in_process_with_the_codes_of_a_process(tmp_path):
    """experiments.common.call, in a process of its own (Hydra configures that process's
    logging): the exit codes a process would give, and a second sweep composes anew."""
    script = f"""
import sys
from experiments.common import call
python, out = sys.executable, {str(tmp_path)!r}
bad = [python, "run.py", "-m", "experiment=tiny_run", "logger.mode=disabled", "adapter.rank=0",
       "output_root=" + out]
good = [*bad[:5], "trainer.max_steps=2", "output_root=" + out, "seed=3,4"]
codes = [
    call([python, "-m", "analysis.report", "--no-such-option"]),  # argparse: 2
    call([python, "-m", "analysis.report", out]),  # SystemExit with a message: 1
    call(bad),  # a config error of a sweep: 2
    call(good),  # the next sweep in the same process
    call([python, "-c", "import sys; sys.exit(5)"]),  # anything else: a process of its own
]
print("codes", codes)
"""
    result = run_cli("-c", script, wandb_mode="disabled", expect=0)
    assert result.stdout.strip().splitlines()[-1] == "codes [2, 1, 2, 0, 5]"
    assert "analysis.report: no runs under" in result.stderr
    assert "adapter.rank must be a positive integer" in result.stderr
    assert "stablelora sweep: 2 completed" in result.stdout
    assert len(list((tmp_path / "sweeps" / "tiny_run").glob("*/summary.json"))) == 2


def test_tuned_final_runs_each_method_at_its_pick_and_passes_the_horizon_on(tmp_path):
    from analysis.tables.tuned_lr import PICKS_FILE as ANALYSIS_PICKS_FILE
    from analysis.tables.tuned_lr import PICKS_METRIC as ANALYSIS_PICKS_METRIC
    from experiments.common import (
        PICKS_FILE,
        PICKS_METRIC,
        commands,
        selection_command,
        selection_file,
        sweep_commands,
    )

    assert PICKS_FILE == ANALYSIS_PICKS_FILE
    assert PICKS_METRIC == ANALYSIS_PICKS_METRIC
    final = ARTEFACTS["tuned_final"]
    assert final.lr_from == "tuned_select" and final.scale == "cpu"
    picks = tmp_path / PICKS_FILE
    setting = {"model": "smollm2_135m", "task": "arc_bbc"}  # the CPU study's
    lrs = {"lora": 0.000316, "rslora": 0.001, "loraplus": 0.0001, "stable_lora": 0.001}
    record = {"metric": PICKS_METRIC, "picks": [
        {**setting, "method": m, "lr": lr} for m, lr in lrs.items()]}  # fmt: skip
    picks.write_text(json.dumps(record))
    overrides = ["data_root=/data", "trainer.max_steps=2000", "seed=1", "optim.lr=9"]
    args = argparse.Namespace(scale="cpu", output_root=tmp_path, seeds="mean",
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
    # the selection stage gets the scale, the horizon and data, not the final stage's seeds or lr
    selection = selection_command(final, args)
    assert selection[3:6] == ["tuned_select", "--scale", "cpu"]
    assert selection[-2:] == ["data_root=/data", "trainer.max_steps=2000"]
    args.lr_selection = None
    expected = tmp_path.resolve() / "sweeps" / "cpu_tuned_select" / "report" / PICKS_FILE
    assert selection_file(final, args) == expected
    args.lr_selection = picks
    args.overrides = ["method=lora,lora_rite"]
    with pytest.raises(SystemExit, match="no pick for method lora_rite"):
        sweep_commands(final, args, sweep)
    args.lr_selection = tmp_path / "missing.json"
    with pytest.raises(SystemExit, match="no picked learning rates at .*missing.json"):
        sweep_commands(final, args, sweep)


COMMITTED_PICKS = ROOT / "results" / "cpu" / "cpu_tuned_select" / "report" / "tuned_lr.json"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"metric": "score", "picks": [', r"json cannot be read \(Expecting value: line 1"),
        ('["lora", 0.001]', "is not a picks file \\(no list of picks\\)"),
        ('{"metric": "best/eval/acc", "picks": []}', "holds picks ranked on 'best/eval/acc'"),
        ('{"metric": M, "picks": [{"method": "lora", "lr": 0.01}]}', "pick 0 has no model"),
        ('{"metric": M, "picks": [{"model": "tiny_llama", "task": "bbc_news", '
         '"method": "lora", "lr": "1e-3"}]}', "pick 0 has lr '1e-3', not a positive number"),
        ('{"metric": M, "picks": [{"model": "tiny_llama", "task": "bbc_news", '
         '"method": "lora", "lr": NaN}]}', "pick 0 has lr nan, not a positive number"),
        (None, "holds picks for smollm2_135m on arc_bbc, not for this experiment's tiny_llama "
               "on bbc_news: give the picks of a selection run with the same model and task"),
    ],
)  # fmt: skip
def test_a_picks_file_not_of_this_experiment_is_refused_in_one_line(
    tmp_path, capsys, content, message
):
    """A damaged --lr-selection file, or one whose picks were made for another model and task
    (the CPU study's picks at smoke scale), stops the final stage before any run: one line,
    exit 2 (a usage error), no traceback."""
    from experiments.common import PICKS_METRIC

    picks = COMMITTED_PICKS
    if content is not None:
        picks = tmp_path / "tuned_lr.json"
        picks.write_text(content.replace('"metric": M', f'"metric": {json.dumps(PICKS_METRIC)}'))
    argv = ["tuned_final", "--scale", "smoke", "--output-root", str(tmp_path),
            "--lr-selection", str(picks)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m experiments tuned_final: "), err
    assert re.search(message, err[0]), err[0]
    # no run started: the output root holds nothing but the picks file written above
    assert [p.name for p in tmp_path.iterdir()] == ([] if content is None else [picks.name])


def test_tuned_presets_share_the_setting_and_differ_in_split_and_seeds():
    select = compose_config(jobs("tuned_select", "cpu")[0])
    final = compose_config(jobs("tuned_final", "cpu")[0])
    assert select.task.eval_split == "validation" and final.task.eval_split == "test"
    assert select.task.holdout_validation and final.task.holdout_validation
    assert select.task.name == final.task.name == "arc_bbc"
    assert set(select.task.subtasks) == {"arc_easy", "arc_challenge", "bbc_news"}
    for cfg in (select, final):
        assert cfg.trainer.max_steps >= 1000 and cfg.trainer.batch_size == 8
        assert cfg.adapter.rank == 8 and list(cfg.adapter.target_modules) == ["q_proj", "v_proj"]
        assert cfg.trainer.max_eval_examples >= 2376 and cfg.task.max_eval_examples is None
    grid = [float(lr) for lr in sweep_params("tuned_select", "cpu")["optim.lr"]]
    assert len(grid) >= 3 and min(grid) <= 1e-4 and max(grid) >= 1e-3
    ratios = [b / a for a, b in zip(grid, grid[1:])]
    assert max(ratios) / min(ratios) < 1.01  # log-spaced
    methods = {"lora", "rslora", "loraplus", "stable_lora"}
    assert set(sweep_params("tuned_final", "cpu")["method"]) >= methods
    assert sweep_params("tuned_select", "cpu")["seed"] == ["0"]
    assert sweep_params("tuned_final", "cpu")["seed"] == ["0", "1", "2"]


# ---------------------------------------------------------------------------- end to end
def read_display(report_dir: Path, table: str) -> str:
    return (report_dir / "tables" / f"{table}.md").read_text()


#: Experiments whose smoke sweep and report another's end-to-end run makes in full: a tuned
#: final experiment runs its selection stage (sweep and report) first, and its test checks
#: that stage's report as if it had run alone.
RUN_BY_ANOTHER = {e.lr_from: name for name, e in ARTEFACTS.items() if e.lr_from}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n not in RUN_BY_ANOTHER])
def test_smoke_experiment_end_to_end(name, tmp_path):
    result = run_cli("-m", "experiments", name, "--scale", "smoke", "--output-root", str(tmp_path),
                     wandb_mode="disabled")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[analysis.report]" in result.stdout
    for each in [n for n, by in RUN_BY_ANOTHER.items() if by == name] + [name]:
        check_smoke_report(each, tmp_path)


def check_smoke_report(name: str, output_root: Path) -> None:
    """Every run completed and scored, every table and plot of the report is there and well
    formed, and the artefact's own table shows what its smoke sweep must."""
    import matplotlib.image

    experiment = ARTEFACTS[name]
    sweep = output_root / "sweeps" / f"{folder(name)}_smoke"
    summaries = sorted(sweep.rglob("summary.json"))
    # its own sweep, then those of its parts (the lr range study's A0 axis), into one folder
    assert len(summaries) == sum(len(jobs(n, "smoke")) for n in (name, *experiment.parts))
    runs = pd.read_csv(sweep / "report" / "tables" / "runs.csv")
    assert len(runs) == len(summaries) and set(runs["status"]) == {"completed"}
    assert runs["score"].notna().all()
    report = sweep / "report"
    tables, plots = experiment.report("smoke")
    for table in tables:
        if table == "runs_not_completed":  # every run completed
            assert not (report / "tables" / f"{table}.csv").exists()
            continue
        recorded = any((s.parent / "contamination.json").exists() for s in summaries)
        if table == "contamination" and not recorded:  # a family the overlap check skips
            assert not (report / "tables" / f"{table}.csv").exists()
            continue
        data = pd.read_csv(report / "tables" / f"{table}.csv")
        assert len(data) >= 1 and data.notna().any(axis=None), table
        # the Markdown table: header, rule and rows of one width; the LaTeX one parses
        lines = (report / "tables" / f"{table}.md").read_text().splitlines()
        rows = [line for line in lines if line.startswith("|")]
        assert len(rows) >= 3 and set(rows[1]) == {"|", ":", "-"}, table
        cells = [len(re.findall(r"(?<!\\)\|", row)) for row in rows]
        assert len(set(cells)) == 1 and cells[0] >= 2, table
        check_latex((report / "tables" / f"{table}.tex").read_text())
    for plot in plots:
        assert (report / "plots" / f"{plot}.pdf").read_bytes().startswith(b"%PDF-"), plot
        pixels = matplotlib.image.imread(report / "plots" / f"{plot}.png")
        assert pixels.shape[0] > 100 and pixels.reshape(-1, pixels.shape[-1]).std(0).max() > 0.05
    check_artefact(name, report)


def check_artefact(name: str, report: Path) -> None:
    """What each artefact's table must show for its smoke sweep."""
    tables = report / "tables"
    if name == "table1":
        main = pd.read_csv(tables / "table1.csv")
        assert sorted(main["method"]) == ["lora", "loraplus", "stable_lora"]
        assert (main["bbc_news_n"] == 2).all() and main["avg"].notna().all()
        paired = pd.read_csv(tables / "paired_difference.csv")
        assert set(paired["label"]) == {"loraplus", "stable_lora"}
        assert (paired["pairs"] == 2).all() and paired["ci_low"].notna().all()
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
    elif name == "overhead":  # one process per method: each has its own peak memory
        data = pd.read_csv(tables / "overhead.csv").set_index("method")
        assert set(data.index) == {"lora", "stable_lora"} and (data["memory"] > 0).all()
        assert data.loc["lora", "time_rel"] == 0 and (data["time"] > 0).all()
    elif name in ("figure2", "figure2_compressed"):
        stops = pd.read_csv(tables / "shrink_stops.csv")
        assert stops["layers"].tolist() == [4]  # 2 layers x (q_proj, v_proj) of the tiny Llama
        assert 0 <= stops["stopped"].item() <= 4
        by_layer = pd.read_csv(tables / "shrink_stops_by_layer.csv")
        assert set(by_layer["projection"]) == {"q_proj", "v_proj"}
        assert by_layer["stopped"].sum() == stops["stopped"].item()
        steps = by_layer[["first", "median", "last"]].stack().dropna()
        assert ((steps >= 1) & (steps <= 4)).all()
    elif name == "init_scale":
        assert "A0 × 0" in read_display(report, "init_scale")
        assert "delta1/delta2" in read_display(report, "init_scale_stability")
    elif name == "ablations":
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
    elif name == "tuned_select":
        picks = json.loads((report / "tuned_lr.json").read_text())
        assert picks["split"] == "validation"
        assert {p["method"] for p in picks["picks"]} == {"lora", "loraplus", "stable_lora"}
        data = pd.read_csv(tables / "tuned_lr.csv")
        assert len(data) == 6 and data["picked"].sum() == 3
    elif name == "tuned_final":  # its selection stage ran first, in the same output root
        selection = report.parents[1] / "tuned_select_smoke" / "report" / "tuned_lr.json"
        picked = {p["method"]: p["lr"] for p in json.loads(selection.read_text())["picks"]}
        runs = pd.read_csv(tables / "runs.csv")
        assert all(picked[m] == lr for m, lr in zip(runs["method"], runs["optim.lr"]))
        assert set(runs["task.eval_split"]) == {"test"} and runs["task.holdout_validation"].all()
        mcnemar = pd.read_csv(tables / "paired_examples.csv")
        assert set(mcnemar["method"]) == {"stable_lora"} and sorted(mcnemar["seed"]) == [0, 1]
        assert (mcnemar["n"] == 8).all()
        assert "stable_lora" in set(pd.read_csv(tables / "paired_bootstrap.csv")["method"])
        against = pd.read_csv(tables / "stable_vs_baselines.csv")
        assert set(against["method"]) == {"lora"} and set(against["label"]) == {"stable_lora"}
        sides = pd.read_csv(tables / "side_by_side.csv").set_index("label")
        assert sorted(sides.index) == ["lora", "stable_lora"] and (sides["runs"] == 2).all()
        assert (sides["delta_ratio_mid"] > 0).all() and math.isnan(sides.loc["lora", "layers"])
    elif name == "dialogue":
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
    elif name == "main":
        data = pd.read_csv(tables / "side_by_side.csv").set_index("label")
        assert sorted(data.index) == ["lora", "stable_lora"] and (data["runs"] == 1).all()
        assert data[["before", "after", "norm_A_first", "norm_A_last"]].notna().all().all()
        assert data.loc["lora", "before"] == data.loc["stable_lora", "before"]  # same model
        assert math.isnan(data.loc["lora", "layers"])  # AdamW has no shrink
        stable = data.loc["stable_lora"]
        assert 1 <= stable["stopped"] <= stable["layers"] and stable["median_stop_step"] >= 1
        assert (data["delta_ratio_mid"] > 0).all()
    elif name in ("lr_range", "lr_range_a0"):
        check_lr_range(tables, parts=name == "lr_range")
    else:
        raise AssertionError(f"no check for {name}: add what its smoke report must show")


def check_lr_range(tables: Path, parts: bool) -> None:
    """The lr range study: a verdict per setting (both lrs and A0 x4 when the A0 axis ran with
    it), the mechanism per setting and method, per-task accuracies per (method, lr)."""
    settings = (
        {"init_scale=1, lr=0.01", "init_scale=1, lr=0.05", "init_scale=4, lr=0.05"}
        if parts
        else {""}
    )
    verdicts = pd.read_csv(tables / "verdicts.csv", keep_default_na=False)
    primary = verdicts[verdicts["role"] == "primary"]
    if "setting" not in primary:  # one setting per method: the column is left out
        primary = primary.assign(setting="")
    assert set(primary["setting"]) == settings and len(primary) == len(settings)
    assert (primary["seeds"] == 2).all() and (primary["examples"] == 8).all()
    assert set(verdicts["role"]) == {"primary", "sensitivity"}
    mechanism = pd.read_csv(tables / "lr_mechanism.csv", keep_default_na=False)
    assert len(mechanism) == 2 * len(settings) and set(mechanism["method"]) == {"lora",
                                                                                "stable_lora"}  # fmt: skip
    assert (pd.to_numeric(mechanism["runs"]) == 2).all()
    stable = mechanism[mechanism["method"] == "stable_lora"]
    assert (pd.to_numeric(stable["q_proj_layers"]) == 4).all()  # 2 layers x 2 seeds
    assert (pd.to_numeric(mechanism["delta_ratio_mid"]) > 0).all()
    table1 = pd.read_csv(tables / "table1.csv")
    assert len(table1) == 2 * len(settings) and (table1["bbc_news_n"] == 2).all()
