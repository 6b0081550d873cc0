"""Damaged records and stop signals: a garbled metrics line, a corrupt per-layer file, a
damaged summary, a stop during evaluation. Every case ends in one line naming the file (or a
warning and a fallback), never in silently wrong records or an overwritten summary."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import warnings
from pathlib import Path

import pandas as pd
import pytest
from helpers import (
    SMOKE,
    Interrupted,
    compose_config,
    rows_without_timing,
    run_job_signalled_at_batch,
    tables_of,
    train_killed_at_batch,
    write_examples,
    write_run,
)

from stablelora.records.layers import RecordsError
from stablelora.records.recorder import RunRecorder
from stablelora.records.rows import read_jsonl
from stablelora.records.summary import parse_summary, read_summary
from stablelora.runner.folder import RunFolderError
from stablelora.runner.job import run_job
from stablelora.runner.train import train

FAST = SMOKE + ["probe=off", "model.config.num_hidden_layers=1"]
#: With the probe: per-layer records in layers.parquet / layers.parts.
PROBED = SMOKE + ["model.config.num_hidden_layers=1", "probe.first_steps=6"]


def signalled_at_batch(cfg, run_dir, batch_number, monkeypatch, signum=signal.SIGTERM):
    """``run_job`` with ``signum`` sent to this process while batch ``batch_number`` is read;
    returns the exit code."""
    with pytest.raises(SystemExit) as exit_info:
        run_job_signalled_at_batch(cfg, run_dir, batch_number, signum, monkeypatch)
    return exit_info.value.code


def one_line_exit(cfg, run_dir) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_job(cfg, run_dir)
    message = exit_info.value.code
    assert isinstance(message, str) and "\n" not in message, message
    return message


# ---------------------------------------------------------------------------- metrics.jsonl
def test_a_garbled_metrics_line_stops_the_resume_naming_file_and_line(tmp_path, monkeypatch):
    cfg = compose_config(FAST + ["trainer.checkpoint_every=4", "trainer.log_every=1"])
    with pytest.raises(Interrupted):
        train_killed_at_batch(cfg, tmp_path, 6, monkeypatch)  # checkpoint at step 4
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) > 4
    lines[2] = '{"step": 2, "train/loss": 0.0GARBAGE\n'
    path.write_text("".join(lines))
    with pytest.raises(RecordsError, match=r"metrics.jsonl line 3 is damaged \(not JSON\)"):
        train(cfg, tmp_path)
    message = one_line_exit(cfg, tmp_path)
    assert "line 3" in message and "trainer.resume=false" in message
    assert path.read_text() == "".join(lines)  # left as found, to be repaired
    assert not (tmp_path / "summary.json").exists()
    # Restored, the run resumes and holds every row once.
    lines[2] = json.dumps(json.loads(lines[1]) | {"step": 2}) + "\n"
    path.write_text("".join(lines))
    assert train(cfg, tmp_path)["status"] == "completed"
    steps = [row["step"] for row in read_jsonl(path) if "train/loss" in row]
    assert steps == list(range(1, 7))


def test_a_deleted_metrics_line_is_found_by_the_rows_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    steps = [1, 2, 4, 5, 6, 7, 8]  # the step-3 row was deleted
    path.write_text("".join(json.dumps({"step": s, "x": 1.0}) + "\n" for s in steps))
    recorder = RunRecorder(tmp_path, {}, compose_config(FAST).logger, "run")
    with pytest.raises(RecordsError, match="line 4 is damaged .a row of step 5, after the check"):
        recorder.keep_rows(4, step=4)  # its 4 rows reach step 5
    text = "".join(json.dumps({"step": s, "x": 1.0}) + "\n" for s in range(1, 7))
    path.write_text(text + '{"step": 7, "x"')  # a torn last line is no damage
    recorder.keep_rows(6, step=6)
    assert recorder.rows == 6 and path.read_text() == text


def test_resume_counts_the_rows_it_kept_not_the_rows_it_found(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 9)))
    recorder = RunRecorder(tmp_path, {}, compose_config(FAST).logger, "run")
    recorder.keep_rows(5, step=5)
    assert recorder.rows == 5 and len(read_jsonl(path)) == 5
    recorder.log(6, {"x": 1.0})
    assert recorder.rows == 6  # what the next checkpoint records


def test_the_analysis_warns_about_a_garbled_metrics_line():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "metrics.jsonl"
        path.write_text('{"step": 1}\n{"step": 2, GARBAGE\n{"step": 3}\n{"step": 4')
        with pytest.warns(UserWarning, match=r"metrics.jsonl line 2 cannot be read"):
            rows = read_jsonl(path)
        assert [row["step"] for row in rows] == [1, 3]


# ---------------------------------------------------------------------------- per-layer files
def test_a_corrupt_layers_file_stops_the_resume_and_keeps_the_interrupted_summary(
    tmp_path, monkeypatch
):
    cfg = compose_config(PROBED + ["trainer.checkpoint_every=100"])
    assert signalled_at_batch(cfg, tmp_path, 3, monkeypatch) == 128 + signal.SIGTERM
    assert read_summary(tmp_path)["status"] == "interrupted"
    layers = tmp_path / "layers.parquet"
    layers.write_bytes(layers.read_bytes()[:200])
    message = one_line_exit(cfg, tmp_path)
    assert message.startswith(f"stablelora: {layers} cannot be read (") and "restore it" in message
    assert read_summary(tmp_path)["status"] == "interrupted"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from analysis.collect import collect

        runs = collect(tmp_path).runs
    assert len(runs) == 1 and any(str(layers) in str(w.message) for w in caught)
    layers.unlink()  # the way out the message gives: resume without those values
    assert train(cfg, tmp_path)["status"] == "completed"


def test_a_corrupt_layer_part_after_the_checkpoint_is_dropped_before_it_is_fatal(
    tmp_path, monkeypatch, capsys
):
    cfg = compose_config(PROBED + ["trainer.checkpoint_every=2"])
    with pytest.raises(Interrupted):
        train_killed_at_batch(cfg, tmp_path, 5, monkeypatch)  # checkpoints at steps 2 and 4
    (tmp_path / "layers.parts").mkdir(exist_ok=True)  # as a kill -9 leaves them: unmerged
    earlier = tmp_path / "layers.parts" / "steps-00000003-00000004.parquet"
    later = tmp_path / "layers.parts" / "steps-00000005-00000005.parquet"
    later.write_bytes(os.urandom(3000))
    earlier.write_bytes(os.urandom(3000))  # steps up to the checkpoint: cannot be rebuilt
    message = one_line_exit(cfg, tmp_path)
    assert str(earlier) in message and "cannot be rebuilt" in message
    assert not (tmp_path / "summary.json").exists()
    earlier.unlink()
    capsys.readouterr()
    assert train(cfg, tmp_path)["status"] == "completed"
    assert f"{later} cannot be read" in capsys.readouterr().err


# ---------------------------------------------------------------------------- examples.parquet
@pytest.mark.parametrize("damage", ["random bytes", "truncated", "deleted", "step 0 rows lost"])
def test_damaged_examples_stop_the_resume_and_keep_the_interrupted_summary(
    tmp_path, monkeypatch, damage
):
    from stablelora.records.examples import ExampleRecords, read_examples

    cfg = compose_config(FAST + ["trainer.checkpoint_every=100"])
    assert signalled_at_batch(cfg, tmp_path, 3, monkeypatch) == 128 + signal.SIGTERM
    assert read_summary(tmp_path)["status"] == "interrupted"
    path = tmp_path / "examples.parquet"
    original = path.read_bytes()  # the initial evaluation's rows, which the checkpoint holds
    assert set(read_examples(tmp_path)["step"]) == {0}
    if damage == "random bytes":
        path.write_bytes(os.urandom(3000))
    elif damage == "truncated":
        path.write_bytes(original[:200])
    elif damage == "deleted":
        path.unlink()
    else:  # a whole file, holding only a later evaluation (as a copy from elsewhere may)
        path.unlink()
        ExampleRecords(tmp_path).write(5, [{"eval_set": "x", "example_id": "a", "correct": True}])
    damaged = path.read_bytes() if path.exists() else None
    message = one_line_exit(cfg, tmp_path)
    assert message.startswith(f"stablelora: {path} ") and "restore it" in message, message
    if damage in ("deleted", "step 0 rows lost"):
        assert "the evaluations at steps 0" in message
    assert read_summary(tmp_path)["status"] == "interrupted"  # not rewritten as failed
    assert (path.read_bytes() if path.exists() else None) == damaged  # left as found
    path.write_bytes(original)  # restored, the run resumes and keeps every evaluation
    assert train(cfg, tmp_path)["status"] == "completed"
    assert set(read_examples(tmp_path)["step"]) == {0, 6}


def test_a_damaged_examples_file_of_later_evaluations_only_is_dropped_on_resume(
    tmp_path, monkeypatch, capsys
):
    from stablelora.records.examples import read_examples

    # The checkpoint at step 3 precedes every evaluation (none before training): a kill after
    # the one at step 4 leaves a file holding only rows the resume evaluates again.
    overrides = ["trainer.eval_before=false", "trainer.eval_every=4", "trainer.checkpoint_every=3"]
    cfg = compose_config(FAST + overrides)
    with pytest.raises(Interrupted):
        train_killed_at_batch(cfg, tmp_path, 5, monkeypatch)
    path = tmp_path / "examples.parquet"
    assert set(read_examples(tmp_path)["step"]) == {4}
    path.write_bytes(os.urandom(3000))
    capsys.readouterr()
    assert train(cfg, tmp_path)["status"] == "completed"
    assert f"{path} cannot be read" in capsys.readouterr().err
    assert set(read_examples(tmp_path)["step"]) == {4, 6}


@pytest.mark.parametrize("damage", ["random bytes", "deleted", "step 0 rows only"])
def test_the_paired_tables_leave_out_a_run_with_damaged_examples_and_say_so(tmp_path, damage):
    import numpy as np

    from stablelora.records.examples import ExampleRecords

    rng = np.random.default_rng(0)
    for seed in (0, 1, 2):
        for method in ("lora", "stable_lora"):
            run = write_run(tmp_path, f"{method}-{seed}", method=method, seed=seed)
            write_examples(run, {"bbc_news": [bool(h) for h in rng.random(100) < 0.5]})
    path = tmp_path / "stable_lora-2" / "examples.parquet"  # rows of steps 0 and 10 (final)
    if damage == "random bytes":
        path.write_bytes(os.urandom(3000))
        why = "examples.parquet cannot be read"
    elif damage == "deleted":
        path.unlink()
        why = "no examples.parquet"
    else:  # the trained model's rows lost: step 0's must not stand in for them
        ExampleRecords(path.parent).truncate_after(0)
        why = "examples.parquet has no rows of its final step (10)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tables = tables_of(tmp_path)
    if damage != "deleted":  # a missing file is no damage (older records have none): noted
        assert any(str(path) in str(w.message) for w in caught), [str(w) for w in caught]
    note = (
        "1 of 6 completed runs are left out of the pairs (no per-example records of their "
        f"final evaluation): stable_lora-2 ({why})."
    )
    for name in ("paired_examples", "paired_bootstrap", "stable_vs_baselines", "verdicts"):
        assert note in tables[name].notes, name
    assert tables["paired_bootstrap"].display["seeds × examples"].tolist() == ["2 × 100"]
    assert sorted(set(tables["paired_examples"].data["seed"])) == [0, 1]
    # sound records: no such note
    path.unlink(missing_ok=True)
    write_examples(path.parent, {"bbc_news": [True] * 100})
    tables = tables_of(tmp_path)
    assert not any("left out of the pairs" in n for n in tables["paired_bootstrap"].notes)
    assert tables["paired_bootstrap"].display["seeds × examples"].tolist() == ["3 × 100"]


# ---------------------------------------------------------------------------- divergence
def test_the_stop_tables_leave_out_diverged_runs_and_say_so(tmp_path):
    def stops(step):
        return {f"layer.{i}.v_proj": {"shrinking": False, "stop_step": step} for i in range(2)}

    write_run(tmp_path, "lora", acc=0.60)
    for seed in (0, 1):
        write_run(tmp_path, f"stable-{seed}", method="stable_lora", seed=seed, shrink=stops(30))
    # a diverged run: its norms turn NaN at once, so every layer "stops" at step 2
    write_run(tmp_path, "stable-2", method="stable_lora", seed=2, status="diverged",
              shrink=stops(2))  # fmt: skip
    write_run(tmp_path, "wd", method="adamw_large_wd", acc=0.61)  # makes reviewer_controls
    tables = tables_of(tmp_path)
    note = (
        "Left out: 1 diverged run (a diverged run's stops record its divergence, not the stop "
        "rule): stable-2."
    )
    for name in ("shrink_stops", "shrink_stops_by_layer"):
        data = tables[name].data  # by layer: a row per layer index
        assert data["layer_runs"].sum() == data["stopped"].sum() == 4, name
        assert data["first"].min() == 30, name
        assert note in tables[name].notes, name
    assert tables["shrink_stops"].data.iloc[0]["runs"] == 2
    controls = tables["reviewer_controls"].data.set_index("label")
    assert controls.loc["stable_lora", "median_stop_step"] == 30


# ---------------------------------------------------------------------------- summary.json
@pytest.mark.parametrize("content", [b"[1, 2]", b"\x00\xffnot json"])
def test_a_damaged_summary_is_named_by_the_analysis_and_kept_by_the_runner(tmp_path, content):
    from analysis.collect import collect

    cfg = compose_config(FAST + ["trainer.max_steps=2"])
    assert train(cfg, tmp_path)["status"] == "completed"
    path = tmp_path / "summary.json"
    path.write_bytes(content)
    with pytest.warns(UserWarning, match=f"{path} cannot be read"):
        runs = collect(tmp_path).runs
    assert len(runs) == 1 and runs.loc[0, "status"] == "incomplete"
    with pytest.raises(RunFolderError, match="summary.json cannot be read"):
        train(cfg, tmp_path)
    message = one_line_exit(cfg, tmp_path)
    assert "restore it, or delete it" in message
    assert path.read_bytes() == content  # not overwritten as failed
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "adapter").is_dir()


@pytest.fixture(scope="module")
def completed_in_two_steps(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("completed")
    assert train(compose_config(FAST + ["trainer.max_steps=2"]), run_dir)["status"] == "completed"
    return run_dir


@pytest.mark.parametrize(
    ("fields", "whole", "problem"),
    [
        (
            {"status": 5, "final": [1]},
            False,
            "status is 5, not one of completed, diverged, failed, interrupted",
        ),
        ({"final": {"eval/acc": "abc"}}, False, "final['eval/acc'] is 'abc', not a number"),
        ({"steps": "2"}, False, "steps is '2', not an integer"),
        ({"final": {"eval/acc": "abc"}}, True, "it has no status"),  # the whole file
    ],
)
def test_a_summary_of_wrong_types_is_refused_by_the_runner_and_incomplete_to_the_analysis(
    tmp_path, completed_in_two_steps, fields, whole, problem
):
    from analysis.report import main as report_main

    run_dir = tmp_path / "run"
    shutil.copytree(completed_in_two_steps, run_dir)
    path = run_dir / "summary.json"
    text = json.dumps(fields if whole else json.loads(path.read_text()) | fields)
    path.write_text(text)
    message = one_line_exit(compose_config(FAST + ["trainer.max_steps=2"]), run_dir)
    assert f"{path} cannot be read ({problem}): restore it, or delete it" in message
    assert path.read_text() == text  # not rewritten as failed, no new training
    out = tmp_path / "report"
    with pytest.warns(UserWarning, match=re.escape(f"{path} cannot be read ({problem})")):
        assert report_main([str(run_dir), "--out", str(out), "--no-plots"])["runs"] == 1
    runs = pd.read_csv(out / "tables" / "runs.csv")
    assert runs["status"].tolist() == ["incomplete"]


def test_the_summary_schema_reads_what_the_runner_writes_and_names_what_breaks_it():
    written = {
        "status": "diverged",
        "steps": 3,
        "train_loss_final": "nan",  # JSON has no NaN: the runner's encoding
        "final": {"eval/loss": "inf", "eval/acc": None},
        "best": {"eval/acc": 0.5, "step": 2},
        "wall_time_s": 3,  # an int where a float is usual: a number all the same
        "shrink": {"layer.0.v_proj": {"shrinking": False, "stop_step": 2}},  # the optimizer's
    }
    summary = parse_summary(written)
    assert math.isnan(summary["train_loss_final"]) and summary["final"]["eval/loss"] == math.inf
    assert summary["initial"] == {} and summary["shrink"] == written["shrink"]
    assert parse_summary({})["status"] == "incomplete"  # W&B: a run that wrote none yet
    for fields, problem in [
        ({"status": "running"}, "status is 'running', not one of"),
        ({"steps": True}, "steps is True, not an integer"),
        ({"seed": 1.5}, "seed is 1.5, not an integer"),
        ({"peak_memory_mb": "a lot"}, "peak_memory_mb is 'a lot', not a number"),
        ({"best": {"step": [2]}}, "best['step'] is a list, not a number"),
        ({"initial": "0.5"}, "initial is '0.5', not a mapping of names to numbers"),
        ({"versions": ["torch"]}, "versions is a list, not a mapping"),
        ({"error": {"line": 1}}, "error is a dict, not a string"),
    ]:
        with pytest.raises(RecordsError, match=re.escape(problem)):
            parse_summary({"status": "completed", **fields})


def test_unreadable_config_yaml_is_called_unreadable(tmp_path):
    (tmp_path / "config.yaml").write_text("trainer: [unclosed\n  - :")
    with pytest.raises(RunFolderError, match=r"config.yaml cannot be read \(not a YAML mapping"):
        train(compose_config(FAST), tmp_path)


@pytest.mark.parametrize("content", [b"trainer: [unclosed\n  - :", b"", b"- a list\n", b"\xff\xfe"])
def test_a_damaged_config_yaml_stops_the_runner_and_the_analysis_reads_hydras_copy(
    tmp_path, content
):
    """One reader (records.folder.RunFolder) for both: the runner refuses a folder whose
    config.yaml is not a YAML mapping; the analysis reads the run's config from Hydra's copy."""
    import yaml

    from analysis.collect import collect
    from stablelora.records.folder import RunFolder
    from stablelora.runner.folder import check_run_folder

    hydra = {"seed": 3, "task": {"name": "bbc_news"}, "method": {"name": "lora"}}
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(hydra))
    (tmp_path / "config.yaml").write_bytes(content)
    folder = RunFolder(tmp_path)
    assert folder.config == hydra
    with pytest.raises(RecordsError, match=r"config.yaml cannot be read \(not a YAML mapping\)"):
        _ = folder.stored_config
    with pytest.raises(RunFolderError, match=r"config.yaml cannot be read \(not a YAML mapping"):
        check_run_folder(tmp_path, hydra)
    (run,) = collect(tmp_path).runs.to_dict("records")
    assert (run["seed"], run["method"], run["status"]) == (3, "lora", "incomplete")


def test_the_run_folder_reads_back_the_config_the_runner_writes(tmp_path):
    """The one YAML loader of records reads config.yaml (written by OmegaConf) back to exactly
    the resolved config the runner checks the folder against (1e-8 a float, lists as lists);
    records a folder does not hold yet read as empty."""
    from omegaconf import OmegaConf

    from stablelora.config.spec import plain_config
    from stablelora.records.folder import RunFolder
    from stablelora.runner.folder import check_run_folder

    cfg = compose_config(FAST)
    folder = RunFolder(tmp_path)
    assert folder.stored_config is None and folder.config == {}
    assert (folder.summary, folder.metrics, folder.layers()) == ({}, [], None)
    assert folder.examples().empty
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    folder = RunFolder(tmp_path)
    assert folder.stored_config == folder.config == plain_config(cfg)
    assert isinstance(folder.config["optim"]["eps"], float)
    check_run_folder(tmp_path, plain_config(cfg))  # the same configuration: no error


# ---------------------------------------------------------------------------- stop in evaluation
def signalled_in_evaluation(cfg, run_dir, evaluation_number, monkeypatch) -> int:
    """``run_job`` with SIGTERM sent during the first forward pass of evaluation number
    ``evaluation_number``; returns the exit code and checks that the evaluation stopped
    within one batch (no further forward pass)."""
    import stablelora.tasks as tasks
    from stablelora.runner.lm_head import split_causal_lm

    original_build, evaluations, forwards_after = tasks.build_task, [], []

    def build_with_signal(*args, **kwargs):
        task = original_build(*args, **kwargs)
        evaluate = task.evaluate

        def evaluate_and_signal(model, **options):
            evaluations.append(1)
            if len(evaluations) != evaluation_number:
                return evaluate(model, **options)

            def hook(module, inputs):
                forwards_after.append(1)
                if len(forwards_after) == 1:
                    os.kill(os.getpid(), signal.SIGTERM)

            # The body runs in every evaluation path (the scoring may call it without the
            # model's own forward: stablelora.runner.lm_head).
            parts = split_causal_lm(model)
            handle = (parts.body if parts else model).register_forward_pre_hook(hook)
            try:
                return evaluate(model, **options)
            finally:
                handle.remove()

        task.evaluate = evaluate_and_signal
        return task

    with monkeypatch.context() as patch:
        patch.setattr(tasks, "build_task", build_with_signal)
        with pytest.raises(SystemExit) as exit_info:
            run_job(cfg, run_dir)
    assert len(forwards_after) == 1, "the evaluation went on after the stop signal"
    return exit_info.value.code


#: Evaluations at steps 0, 2, 4 and 6, in 4 batches each (a stop is checked between batches).
EVAL_EVERY_2 = ["trainer.eval_every=2", "trainer.checkpoint_every=100", "trainer.eval_batch_size=2"]


@pytest.fixture(scope="module")
def evaluated_every_2(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    cfg = compose_config(FAST + EVAL_EVERY_2)
    assert train(cfg, run_dir)["status"] == "completed"
    return run_dir


@pytest.mark.parametrize(
    "evaluation,steps",
    [(1, 0), (2, 2), (4, 6)],  # the initial one, one during training (step 2), the final one
)
def test_a_stop_signal_during_evaluation_stops_within_a_batch_and_resumes_it(
    tmp_path, monkeypatch, capsys, evaluated_every_2, evaluation, steps
):
    from helpers import adapter_state

    cfg = compose_config(FAST + EVAL_EVERY_2)
    code = signalled_in_evaluation(cfg, tmp_path, evaluation, monkeypatch)
    assert code == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        f"after step {steps} (checkpoint saved); rerun the same command to resume."
    )
    summary = read_summary(tmp_path)
    assert summary["status"] == "interrupted" and summary["steps"] == steps
    assert not (tmp_path / "adapter").exists()
    resumed = train(cfg, tmp_path)
    assert resumed["status"] == "completed" and resumed["attempts"] == 2
    assert rows_without_timing(tmp_path) == rows_without_timing(evaluated_every_2)
    first, second = adapter_state(evaluated_every_2), adapter_state(tmp_path)
    assert all((first[name] == second[name]).all() for name in first)
    uninterrupted = read_summary(evaluated_every_2)
    for section in ("initial", "final", "best"):
        assert resumed[section] == uninterrupted[section], section


def test_check_stop_does_nothing_outside_a_run():
    from stablelora.runner.folder import StopSignals, check_stop

    check_stop()
    with StopSignals():
        check_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(Exception, match="stopped by signal"):
            check_stop()
    check_stop()  # the flag ends with the run
    # Nested (run_job's context while a job starts, train's own): a signal the outer one
    # caught is the inner one's, and it lasts until the outer one exits.
    with StopSignals() as outer:
        os.kill(os.getpid(), signal.SIGTERM)
        with StopSignals() as inner:
            assert inner.received == outer.received == signal.SIGTERM
        with pytest.raises(Exception, match="stopped by signal 15"):
            check_stop()
    check_stop()


def test_parts_left_by_a_kill_after_the_adapter_save_are_merged_by_the_rerun(tmp_path):
    from stablelora.records.layers import read_layer_table

    cfg = compose_config(PROBED)
    assert train(cfg, tmp_path)["status"] == "completed"
    merged = read_layer_table(tmp_path)
    parts = tmp_path / "layers.parts"
    parts.mkdir()  # as a kill -9 between the adapter save and the merge leaves them
    (tmp_path / "layers.parquet").rename(parts / "steps-00000001-00000006.parquet")
    assert train(cfg, tmp_path)["status"] == "completed"  # nothing to train
    assert not parts.exists() and read_layer_table(tmp_path).equals(merged)
