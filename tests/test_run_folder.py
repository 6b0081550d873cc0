"""Run folders never lie: one folder per resolved configuration, one process per folder,
every metric row once, recoverable checkpoints, stop signals, a full disk, sweep summaries."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from helpers import (
    CONF,
    ROOT,
    SMOKE,
    Interrupted,
    adapter_state,
    compose_config,
    offline_env,
    rows_without_timing,
    run_job_signalled_at_batch,
    train_killed_at_batch,
)
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from stablelora.config.identity import register_resolvers
from stablelora.records.layers import RecordsError
from stablelora.records.recorder import RunRecorder
from stablelora.records.rows import read_jsonl
from stablelora.records.summary import read_summary
from stablelora.runner.folder import RunFolderError, RunLock
from stablelora.runner.job import run_job
from stablelora.runner.sweep import (
    SWEEP_LOG_ENV,
    SweepSummary,
    default_num_threads,
    report_to_sweep,
    sweep_summary_line,
)
from stablelora.runner.train import RunInterrupted, train

FAST = SMOKE + ["probe=off", "model.config.num_hidden_layers=1"]


def run_dirs(overrides, key="hydra.run.dir"):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        return str(OmegaConf.select(cfg, key))


# ---------------------------------------------------------------------------- folder names
def test_run_folder_is_a_function_of_the_resolved_config():
    smoke = run_dirs(["experiment=tiny_run", "seed=1"])
    ablation = run_dirs(["experiment=ablation_stop_rule", "scale=smoke", "seed=1"])
    assert smoke != ablation
    assert run_dirs(["method=lora", "method=stable_lora"]) != run_dirs(
        ["method=stable_lora", "method=lora"]
    )
    # Where and how a run is shown does not move it; what it computes does.
    display = ["logger.mode=disabled", "trainer.device=cpu", "trainer.progress_bar=true"]
    assert run_dirs(["experiment=tiny_run", "seed=1", *display]) == smoke
    assert run_dirs(["experiment=tiny_run", "seed=1", "optim.lr=3e-4"]) != smoke
    name = Path(smoke).name
    assert name.startswith("stable_lora-bbc_news-tiny_llama-s1-")


def test_paths_in_overrides_never_nest_folders():
    for key in ("hydra.run.dir", "hydra.sweep.subdir"):
        folder = run_dirs(["task.data_dir=/data/arc_easy/x", "output_root=/out"], key)
        name = folder.rsplit("/", 1)[-1]
        assert "/" not in name.strip() and "data" not in name
    assert run_dirs(["output_root=/out"]).startswith("/out/runs/")


def test_data_root_names_a_folder_only_through_the_data_a_task_reads():
    # BBC News does not read data_root: one folder with or without it; ARC reads
    # <data_root>/arc_easy, so the copy it reads is part of what it computes.
    assert run_dirs(["data_root=/data"]) == run_dirs([])
    arc = ["task=arc_easy"]
    assert run_dirs([*arc, "data_root=/data"]) != run_dirs([*arc, "data_root=/elsewhere"])


def test_rerun_with_another_config_in_the_same_folder_stops(tmp_path):
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(compose_config(SMOKE), resolve=True))
    with pytest.raises(RunFolderError, match=r"another configuration \(differs in optim.lr\)"):
        train(compose_config(SMOKE + ["optim.lr=0.5"]), tmp_path)
    # Display-only keys may differ.
    cfg = compose_config(SMOKE + ["trainer.max_steps=1", "logger.mode=disabled", "probe=off"])
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    display = ["trainer.progress_bar=true", "trainer.num_threads=1"]
    summary = train(
        compose_config(SMOKE + ["trainer.max_steps=1", "probe=off", *display]), tmp_path
    )
    assert summary["status"] == "completed"


# ---------------------------------------------------------------------------- lock
def test_a_second_process_on_a_run_folder_stops_naming_the_holder(tmp_path, capsys):
    with RunLock(tmp_path):
        with pytest.raises(RunFolderError, match=rf"being run by pid {os.getpid()} on "):
            train(compose_config(FAST), tmp_path)
        with pytest.raises(SystemExit) as exit_info:
            run_job(compose_config(FAST), tmp_path)
        assert "being run by pid" in str(exit_info.value.code)
        assert not (tmp_path / "summary.json").exists()  # nothing written into its folder
    assert train(compose_config(FAST), tmp_path)["status"] == "completed"  # lock released


# ---------------------------------------------------------------------------- exactly once
@pytest.fixture(scope="module")
def uninterrupted_fast_run(tmp_path_factory):
    """The uninterrupted :data:`FAST` run, a checkpoint every 2 steps: (folder, summary), read
    only by the tests that share it."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    summary = train(compose_config(FAST + ["trainer.checkpoint_every=2"]), run_dir)
    return run_dir, summary


@pytest.mark.parametrize("batch", [2, 5])  # before the first checkpoint, after step 4's
def test_resumed_records_hold_every_row_once(tmp_path, monkeypatch, uninterrupted_fast_run, batch):
    cfg = compose_config(FAST + ["trainer.checkpoint_every=4"])
    with pytest.raises(Interrupted):
        train_killed_at_batch(cfg, tmp_path, batch, monkeypatch)
    summary = train(cfg, tmp_path)
    assert rows_without_timing(tmp_path) == rows_without_timing(uninterrupted_fast_run[0])
    assert summary["attempts"] == (2 if batch == 5 else 1)
    assert summary["wall_time_s"] >= summary["train_time_s"] > 0


def test_stop_between_final_evaluation_and_summary_logs_once(
    tmp_path, monkeypatch, uninterrupted_fast_run
):
    cfg = compose_config(FAST + ["trainer.checkpoint_every=2"])

    def killed(self, summary):
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(RunRecorder, "write_summary", killed)
        with pytest.raises(Interrupted):
            train(cfg, tmp_path)
    assert train(cfg, tmp_path)["status"] == "completed"
    assert rows_without_timing(tmp_path) == rows_without_timing(uninterrupted_fast_run[0])


def test_records_shorter_than_the_checkpoint_stop_with_one_line(tmp_path, monkeypatch):
    cfg = compose_config(FAST + ["trainer.checkpoint_every=2"])
    with pytest.raises(Interrupted):
        train_killed_at_batch(cfg, tmp_path, 4, monkeypatch)
    (tmp_path / "metrics.jsonl").unlink()
    with pytest.raises(RecordsError, match="0 rows but the checkpoint at step 2 had written"):
        train(cfg, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_job(cfg, tmp_path)
    assert "trainer.resume=false" in exit_info.value.code and "\n" not in exit_info.value.code


# ---------------------------------------------------------------------------- checkpoints
def test_damaged_newest_checkpoint_falls_back_to_the_older(
    tmp_path, monkeypatch, capsys, uninterrupted_fast_run
):
    cfg = compose_config(FAST + ["trainer.checkpoint_every=2"])
    with pytest.raises(Interrupted):
        train_killed_at_batch(cfg, tmp_path, 5, monkeypatch)  # checkpoints at steps 2 and 4
    assert (tmp_path / "checkpoint.prev.pt").exists()
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    capsys.readouterr()
    assert train(cfg, tmp_path)["status"] == "completed"
    err = capsys.readouterr().err
    assert "checkpoint.pt: " in err and "resuming from checkpoint.prev.pt (step 2)" in err
    first, second = adapter_state(uninterrupted_fast_run[0]), adapter_state(tmp_path)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert rows_without_timing(tmp_path) == rows_without_timing(uninterrupted_fast_run[0])


def test_no_readable_checkpoint_says_what_to_do(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"\x80garbage")
    with pytest.raises(RunFolderError, match="delete checkpoint.pt and checkpoint.prev.pt"):
        train(compose_config(FAST), tmp_path)


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    from stablelora.runner import folder as run_folder

    run_folder.save_checkpoint_file({"state": {"step": 1}}, tmp_path)

    def full_disk(payload, stream):
        stream.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_folder.torch, "save", full_disk)
    with pytest.raises(OSError):
        run_folder.save_checkpoint_file({"state": {"step": 2}}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    monkeypatch.undo()
    assert run_folder.load_checkpoint_file(tmp_path, "cpu")["state"]["step"] == 1


# ---------------------------------------------------------------------------- full disk
def test_full_disk_is_one_line_and_keeps_the_summary_and_checkpoint(tmp_path, monkeypatch):
    from peft import PeftModel

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    cfg = compose_config(FAST + ["trainer.checkpoint_every=3"])
    with monkeypatch.context() as patch:
        patch.setattr(PeftModel, "save_pretrained", full_disk)
        with pytest.raises(SystemExit) as exit_info:
            run_job(cfg, tmp_path)
    message = exit_info.value.code
    assert message.startswith("stablelora: no space left on device") and "\n" not in message
    assert read_summary(tmp_path)["status"] == "failed"  # written before the adapter
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "adapter").exists()
    assert run_job(cfg, tmp_path)["status"] == "completed"  # resumes from the checkpoint
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "code,words",
    [
        (errno.EFBIG, "file too large for this process' file-size limit (ulimit -f)"),
        (errno.EDQUOT, "disk quota exceeded"),
    ],
)
def test_a_write_past_a_limit_names_the_file_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, code, words
):
    from stablelora.runner import folder as run_folder

    saved = []
    real_save = run_folder.torch.save

    def limited(payload, stream):  # the second checkpoint hits the limit mid-write
        if saved:
            stream.write(b"partial")
            raise OSError(code, os.strerror(code))  # as write() raises it: no file name
        saved.append(payload["state"]["step"])
        real_save(payload, stream)

    cfg = compose_config(FAST + ["trainer.max_steps=8", "trainer.checkpoint_every=3"])
    with monkeypatch.context() as patch:
        patch.setattr(run_folder.torch, "save", limited)
        with pytest.raises(SystemExit) as exit_info:
            run_job(cfg, tmp_path)
    message = exit_info.value.code
    assert message == (
        f"stablelora: {words}{' or file system' if code == errno.EFBIG else ''} "
        f"({tmp_path / 'checkpoint.pt'} could not be written): "
        + ("raise the limit (ulimit -f unlimited)" if code == errno.EFBIG else
           "free some space or raise the quota")
        + " and rerun the same command to resume from the last checkpoint."
    )  # fmt: skip
    assert saved == [3] and not (tmp_path / "checkpoint.pt.tmp").exists()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["step"] == 3
    assert run_job(cfg, tmp_path)["status"] == "completed"  # resumes from step 3


@pytest.mark.slow
def test_a_real_file_size_limit_is_one_line_and_the_rerun_completes(tmp_path):
    import resource
    import subprocess
    import sys

    def limit():  # 40 KiB: the tiny model's first checkpoint does not fit
        resource.setrlimit(resource.RLIMIT_FSIZE, (40 * 1024, 40 * 1024))

    command = [sys.executable, "run.py", *SMOKE, f"output_root={tmp_path}"]
    env = offline_env()
    limited = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, preexec_fn=limit
    )
    assert limited.returncode == 1, limited.stderr[-2000:]
    last = limited.stderr.strip().splitlines()[-1]
    assert last.startswith("stablelora: file too large") and "checkpoint.pt could not" in last
    assert not list(tmp_path.rglob("*.tmp"))
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    (summary,) = tmp_path.rglob("summary.json")
    assert json.loads(summary.read_text())["status"] == "completed"


@pytest.mark.skipif(
    not Path("/sys").is_dir() or os.access("/sys", os.W_OK) is False,
    reason="needs /sys, writable by permission bits (root) yet not writable",
)
def test_an_output_root_root_cannot_write_is_a_config_error():
    from stablelora.config.check import check_output_root

    with pytest.raises(ValueError, match=r"^output_root=/sys/x: /sys cannot be written \("):
        check_output_root(Path("/sys/x"))


# ---------------------------------------------------------------------------- signals
def train_signalled_at_batch(cfg, run_dir, batch_number, signum, monkeypatch):
    """Send ``signum`` to this process while batch ``batch_number`` is read."""
    return run_job_signalled_at_batch(cfg, run_dir, batch_number, signum, monkeypatch)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_stop_signal_checkpoints_and_resumes_bit_identically(
    tmp_path, monkeypatch, capsys, uninterrupted_fast_run, signum
):
    cfg = compose_config(FAST + ["trainer.checkpoint_every=100"])  # no regular checkpoint
    handler = signal.getsignal(signum)  # SIG_IGN for SIGINT in a background job
    with pytest.raises(SystemExit) as exit_info:
        train_signalled_at_batch(cfg, tmp_path, 3, signum, monkeypatch)
    assert exit_info.value.code == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("after step 3 (checkpoint saved); rerun the same command to resume.")
    summary = read_summary(tmp_path)
    assert summary["status"] == "interrupted" and summary["steps"] == 3
    assert signal.getsignal(signum) == handler  # the run put its handler back
    assert train(cfg, tmp_path)["status"] == "completed"
    first, second = adapter_state(uninterrupted_fast_run[0]), adapter_state(tmp_path)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert rows_without_timing(tmp_path) == rows_without_timing(uninterrupted_fast_run[0])


def test_interrupted_run_raises_for_the_launcher(tmp_path, monkeypatch):
    import stablelora.tasks as tasks

    cfg = compose_config(FAST)
    original_build = tasks.build_task

    def build_and_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the model loads
        return original_build(*args, **kwargs)

    monkeypatch.setattr(tasks, "build_task", build_and_signal)
    with pytest.raises(RunInterrupted) as info:
        train(cfg, tmp_path)
    # Stopped within the first batch of the initial evaluation: step 0, checkpointed, and
    # the rerun evaluates first.
    assert info.value.step == 0 and (tmp_path / "checkpoint.pt").exists()
    assert read_summary(tmp_path)["status"] == "interrupted"
    monkeypatch.undo()
    summary = train(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["initial"]


# ---------------------------------------------------------------------------- results
def test_diverged_run_keeps_the_non_finite_loss(tmp_path):
    from analysis.collect import collect

    cfg = compose_config(FAST + ["optim.lr=1e30", "trainer.max_steps=20", "trainer.log_every=1"])
    summary = run_job(cfg, tmp_path)  # a result, not a crash: no exit
    assert summary["status"] == "diverged"
    stored = json.loads((tmp_path / "summary.json").read_text())
    assert stored["train_loss_final"] in ("nan", "inf", "-inf")
    loss = read_summary(tmp_path)["train_loss_final"]
    assert isinstance(loss, float) and not torch.isfinite(torch.tensor(loss))
    runs = collect(tmp_path).runs
    assert not torch.isfinite(torch.tensor(float(runs.loc[0, "train_loss_final"])))


def test_throughput_and_optimizer_records_are_logged_under_one_key(uninterrupted_fast_run):
    run_dir, summary = uninterrupted_fast_run
    logged = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row]
    assert all(row["train/tokens_per_s"] > 0 and row["train/steps_per_s"] > 0 for row in logged)
    assert all(0.0 <= row["shrink/fraction_shrinking"] <= 1.0 for row in logged)
    assert not any("lora/shrinking" in row for row in read_jsonl(run_dir / "metrics.jsonl"))
    assert set(summary["shrink"]) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    }


class CountingSGD(torch.optim.SGD):
    """An optimizer the runner cannot know of: SGD that counts its steps and reports them
    through the records protocol (``stablelora.records.summary.optimizer_summary``)."""

    def __init__(self, params, lr, layer_names):
        super().__init__(params, lr=lr)
        self.steps, self.layer_names = 0, layer_names

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)

    def record_metrics(self):
        return {"counting/steps": float(self.steps)}

    def record_summary(self):
        return {"counting": {"steps": self.steps}}

    def record_layers(self):
        return {name: {"steps_seen": float(self.steps)} for name in self.layer_names}


def test_the_runner_drives_an_optimizer_and_an_adapter_by_their_protocols(tmp_path, monkeypatch):
    """The runner names no method: an optimizer registered under a new name is built, stepped
    once per step and recorded through the records protocol alone (its scalars, its summary
    fields, its per-layer values), and the adapter's step hooks (AdaLoRA's rank allocation)
    run once per step, after the optimizer step and before the gradients are zeroed."""
    from peft.tuners.adalora import AdaLoraModel

    from stablelora.optim import OPTIMIZERS, register_optimizer
    from stablelora.records.layers import read_layers

    built: list[CountingSGD] = []

    def build(model, pairs, adamw):
        params = [p for p in model.parameters() if p.requires_grad]
        built.append(CountingSGD(params, adamw.lr, [pair.name for pair in pairs]))
        return built[-1]

    hook_calls = []
    allocate = AdaLoraModel.update_and_allocate

    def update_and_allocate(self, global_step):
        (optimizer,) = built
        params = [p for group in optimizer.param_groups for p in group["params"]]
        has_grads = all(p.grad is not None for p in params if p.requires_grad)
        hook_calls.append((global_step, optimizer.steps, has_grads))
        return allocate(self, global_step)

    monkeypatch.setitem(OPTIMIZERS, "test_counting_sgd", None)  # removed again afterwards
    register_optimizer("test_counting_sgd")(build)
    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", update_and_allocate)
    steps = 6
    cfg = compose_config(
        SMOKE
        + [
            "model.config.num_hidden_layers=1",
            "adapter=adalora",
            "optimizer=adamw",
            "optimizer.builder=test_counting_sgd",
            f"trainer.max_steps={steps}",
            "trainer.log_every=1",
        ]
    )
    summary = train(cfg, tmp_path)
    assert summary["status"] == "completed", summary.get("error")
    assert hook_calls == [(step, step, True) for step in range(1, steps + 1)]
    assert summary["counting"] == {"steps": steps} and "shrink" not in summary
    logged = [row for row in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in row]
    assert [row["counting/steps"] for row in logged] == list(range(1, steps + 1))
    assert [row["step"] for row in logged] == list(range(1, steps + 1))
    assert not any(key.startswith("shrink/") for row in logged for key in row)
    layers = read_layers(tmp_path)
    assert len(layers) and (layers["lora/steps_seen"] == layers["step"]).all()
    assert set(layers["layer"]) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    }


def test_adalora_step_hook_comes_from_the_adapter():
    from tiny import tiny_llama

    from stablelora.lora import apply_lora, step_hooks

    lora = apply_lora(tiny_llama(), rank=2, alpha=4, target_modules=["q_proj"])
    assert step_hooks(lora) == []
    adalora = apply_lora(
        tiny_llama(),
        rank=2,
        alpha=4,
        target_modules=["q_proj"],
        adapter="adalora",
        adalora={"total_step": 10, "init_r": 4},
    )
    (hook,) = step_hooks(adalora)
    assert hook == adalora.base_model.update_and_allocate


def test_collect_deduplicates_repeated_rows_and_says_so(tmp_path):
    from analysis.collect import collect

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [
        {"step": 0, "eval/acc": 0.2},
        {"step": 2, "train/loss": 1.0},
        {"step": 0, "eval/acc": 0.2},
        {"step": 2, "train/loss": 0.9},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="2 metric values were logged more than once"):
        history = collect(tmp_path).history
    assert len(history) == 2
    assert history.set_index("key").loc["train/loss", "value"] == 0.9


# ---------------------------------------------------------------------------- W&B, threads
def test_wandb_online_without_network_continues_offline(tmp_path, monkeypatch, capsys):
    import wandb

    modes, timeouts = [], []

    def fake_init(**kwargs):
        modes.append(kwargs["mode"])
        timeouts.append(kwargs["settings"].init_timeout)
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("Run initialization has timed out after 7.0 sec.")
        return "offline run"

    monkeypatch.setattr(wandb, "init", fake_init)
    logger = OmegaConf.create(
        {
            "mode": "online",
            "project": "p",
            "entity": None,
            "group": "g",
            "tags": [],
            "init_timeout": 7,
        }
    )
    recorder = RunRecorder(tmp_path, {}, logger, "name")
    assert recorder.wandb_run == "offline run" and modes == ["online", "offline"]
    assert timeouts == [7, 7]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "continues with W&B offline" in err[0]


def test_parallel_jobs_share_the_cores():
    assert default_num_threads(OmegaConf.create({"n_jobs": 4}), cores=16) == 4
    assert default_num_threads(OmegaConf.create({"n_jobs": 3}), cores=2) == 1
    assert default_num_threads(OmegaConf.create({"n_jobs": -1}), cores=8) == 1
    assert default_num_threads(OmegaConf.create({"n_jobs": -2}), cores=8) == 1
    assert default_num_threads(OmegaConf.create({"n_jobs": 2}), cores=8) == 4
    assert default_num_threads(OmegaConf.create({}), cores=8) is None  # one job: torch's own


# ---------------------------------------------------------------------------- sweeps
def test_sweep_summary_counts_jobs_and_fails_the_sweep(tmp_path, monkeypatch, capsys):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    callback = SweepSummary()
    monkeypatch.delenv(SWEEP_LOG_ENV, raising=False)
    callback.on_multirun_start(config)
    for name, status in [("a", "completed"), ("b", "diverged"), ("c", "failed")]:
        report_to_sweep(tmp_path / name, status)
    with pytest.raises(SystemExit) as exit_info:
        callback.on_multirun_end(config)
    assert exit_info.value.code == 1
    line = capsys.readouterr().out.strip()
    assert line == (
        f"stablelora sweep: 1 completed, 1 diverged, 1 failed ({tmp_path / 'c'}), 0 interrupted"
    )
    assert sweep_summary_line([{"run_dir": "x", "status": "diverged"}])[1] is False
    requeued = [{"run_dir": "x", "status": "interrupted"}, {"run_dir": "x", "status": "completed"}]
    assert sweep_summary_line(requeued)[0] == (
        "stablelora sweep: 1 completed, 0 diverged, 0 failed, 0 interrupted"
    )


@pytest.mark.slow
def test_a_submitit_sweep_runs_and_a_preempted_job_is_requeued_to_the_same_records(tmp_path):
    """The cluster path for real, with submitit's local executor: a two-job sweep completes,
    and the job sent the preemption signal (SIGUSR2, what SLURM sends before a time limit or a
    preemption) checkpoints, is requeued by submitit and resumes to the records of an
    uninterrupted run."""
    import subprocess
    import sys
    import time

    settings = FAST + [
        "trainer.max_steps=600",
        "trainer.log_every=1",
        "trainer.checkpoint_every=0",  # the only checkpoint is the one the signal asks for
        "trainer.num_threads=1",
    ]
    out = tmp_path / "out"
    command = [sys.executable, "run.py", "-m", "hydra/launcher=submitit_local", *settings,
               "method=lora,stable_lora", f"output_root={out}"]  # fmt: skip
    env = offline_env()
    sweep = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    signalled_at = None
    while sweep.poll() is None:
        for metrics in out.glob("sweeps/*/stable_lora-*/metrics.jsonl"):
            rows = len(metrics.read_text().splitlines())
            if signalled_at is None and rows >= 10:
                holder = (metrics.parent / ".lock").read_text().split()  # "pid N on host"
                os.kill(int(holder[1]), signal.SIGUSR2)
                signalled_at = rows
        time.sleep(0.02)
    stdout, stderr = sweep.communicate()
    assert sweep.returncode == 0, stderr[-3000:]
    assert signalled_at is not None, "the job ended before it could be signalled"
    assert stdout.strip().splitlines()[-1] == (
        "stablelora sweep: 2 completed, 0 diverged, 0 failed, 0 interrupted"
    )
    (preempted,) = out.glob("sweeps/*/stable_lora-*")
    summary = read_summary(preempted)
    assert summary["status"] == "completed" and summary["attempts"] == 2  # requeued once
    reference = tmp_path / "uninterrupted"
    assert run_job(compose_config(settings + ["method=stable_lora"]), reference)
    assert rows_without_timing(preempted) == rows_without_timing(reference)
    first, second = adapter_state(reference), adapter_state(preempted)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_a_checkpoint_without_its_state_is_not_a_checkpoint(tmp_path, capsys):
    from stablelora.runner import folder as run_folder

    run_folder.save_checkpoint_file({"state": {"step": 3}}, tmp_path)
    run_folder.save_checkpoint_file({"trainable": {}, "steps": 5}, tmp_path)  # a foreign dict
    assert run_folder.load_checkpoint_file(tmp_path, "cpu")["state"]["step"] == 3
    assert "checkpoint.pt: ValueError cannot be read" in capsys.readouterr().err
    (tmp_path / "checkpoint.prev.pt").unlink()
    with pytest.raises(RunFolderError, match="no checkpoint .* can be read"):
        run_folder.load_checkpoint_file(tmp_path, "cpu")


def test_seed_0_names_its_folder_like_every_other_seed():
    from stablelora.config.identity import run_dir_name

    def name(seed):
        return run_dir_name(_root_={"method": "lora", "task": "bbc", "model": "m", "seed": seed})

    assert name(0).startswith("lora-bbc-m-s0-") and name(1).startswith("lora-bbc-m-s1-")
    assert name(None).startswith("lora-bbc-m-") and "-s" not in name(None)
