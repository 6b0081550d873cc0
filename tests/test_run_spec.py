"""One frozen run spec: the config check returns it (stablelora.config.spec.RunSpec), and the
run is built (runner.setup.build_run) and a failure recorded (runner.job) from it, so that a
config is turned into call arguments once, in one place."""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import SMOKE, compose_config

from stablelora.config.check import check_config
from stablelora.config.spec import RunSpec, optimizer_arguments, plain_config, run_spec
from stablelora.lora import adapter_arguments
from stablelora.optim.adamw_settings import ADAMW_SETTINGS, AdamWSettings
from stablelora.tasks.data import TaskConfig


def test_the_check_returns_the_runs_arguments_resolved_once():
    cfg = compose_config([*SMOKE, "method=stable_lora", "adapter=adalora"])
    spec = check_config(cfg)
    plain = plain_config(cfg)
    assert isinstance(spec, RunSpec) and spec == run_spec(plain)
    assert spec.config == plain
    assert spec.adapter == adapter_arguments(plain["adapter"], cfg.trainer.max_steps)
    assert spec.adapter["adalora"]["total_step"] == cfg.trainer.max_steps
    assert (spec.optimizer, spec.optimizer_options) == optimizer_arguments(plain["optimizer"])
    assert spec.optimizer_options["shrink_ratio"] == cfg.optimizer.shrink_ratio
    assert spec.adamw == AdamWSettings(
        **{name: plain["optim"][name] for name in ADAMW_SETTINGS} | {"betas": (0.9, 0.999)}
    )
    assert spec.task == TaskConfig.from_any(cfg.task)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.optimizer = "lora"  # type: ignore[misc]


def test_build_run_builds_from_the_spec(tmp_path):
    """A spec that differs from its config wins: build_run reads nothing of the adapter,
    optimizer or task groups a second time."""
    from stablelora.records.recorder import RunRecorder
    from stablelora.runner.setup import Distributed, build_run, seed_everything

    cfg = compose_config([*SMOKE, "method=stable_lora"])
    spec = check_config(cfg)
    changed = dataclasses.replace(
        spec,
        adapter={**spec.adapter, "rank": 3},
        optimizer_options={**spec.optimizer_options, "shrink_ratio": 0.25},
        adamw=dataclasses.replace(spec.adamw, lr=0.125, weight_decay=0.5),
        task=dataclasses.replace(spec.task, max_train_examples=7),
    )
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    recorder = RunRecorder(tmp_path, {}, cfg.logger, "unused", enabled=False)
    run = build_run(cfg, Distributed("cpu"), recorder, changed)
    assert run.spec is changed
    group = run.optimizer.param_groups[0]
    assert (group["initial_lr"], group["weight_decay"]) == (0.125, 0.5)
    assert run.optimizer.shrink_ratio == 0.25
    assert {pair.A.shape[0] for pair in run.optimizer.lora_pairs} == {3}
    assert run.task.num_train_examples == 7


def test_a_failure_is_recorded_from_the_checked_spec(tmp_path, monkeypatch):
    """run_job hands the spec its check returned to the failure record (not the config again);
    a spec and its config record the same failure."""
    import stablelora.runner.job as job

    cfg = compose_config([*SMOKE, "task=chatterbot"])
    spec = check_config(cfg)
    job._record_failure(spec, tmp_path / "spec", "boom")
    job._record_failure(cfg, tmp_path / "cfg", "boom")
    by_spec, by_cfg = (
        json.loads((tmp_path / name / "summary.json").read_text()) for name in ("spec", "cfg")
    )
    assert by_spec == by_cfg and by_spec["task_kind"] == "dialogue"

    marked = dataclasses.replace(spec, config={**spec.config, "seed": 99})
    monkeypatch.setattr(job, "check_config", lambda cfg: marked)

    def failing_train(cfg, run_dir, given):
        assert given is marked  # the check is not run twice
        raise RuntimeError("the run failed")

    monkeypatch.setattr(job, "train", failing_train)
    assert job.run_job(cfg, tmp_path / "run", multirun=True) is None
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["seed"] == 99
    assert summary["error"] == "RuntimeError: the run failed"
