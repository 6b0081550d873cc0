"""The Hydra runner end to end on a tiny model and the offline BBC News task."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    ROOT,
    SMOKE,
    Interrupted,
    adapter_state,
    compose_config,
    offline_env,
    read_wandb_records,
    run_cli,
    train_killed_at_batch,
)

from stablelora.records.console import result_table
from stablelora.records.rows import read_jsonl
from stablelora.runner.train import train


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The in-process smoke run (read only by the tests that share it): config, folder, summary."""
    cfg, run_dir = compose_config(SMOKE), tmp_path_factory.mktemp("smoke")
    return cfg, run_dir, train(cfg, run_dir)


def test_in_process_run_writes_complete_records(smoke_run):
    _, run_dir, summary = smoke_run
    assert summary["status"] == "completed" and summary["steps"] == 6
    stored = json.loads((run_dir / "summary.json").read_text())
    assert stored["status"] == "completed"
    for key in (
        "initial",
        "final",
        "best",
        "wall_time_s",
        "peak_memory_mb",
        "versions",
        "git_commit",
        "shrink",
        "train_loss_final",
    ):
        assert key in stored, key
    # What the analysis routes the run on, from the task's family module (not a name list).
    assert (stored["task_family"], stored["task_kind"], stored["protocol"]) == (
        "bbc_news",
        "multiple_choice",
        "loglik",
    )
    counts = stored["shrink_layers"]  # the per-layer states, summarised
    stops = [entry["stop_step"] for entry in stored["shrink"].values()]
    assert counts["layers"] == 4 and counts["stopped"] == sum(s is not None for s in stops)
    assert counts["shrinking"] == sum(entry["shrinking"] for entry in stored["shrink"].values())
    assert f"shrink: {counts['stopped']} of 4 LoRA layers stopped" in result_table(stored)
    assert set(stored["shrink"]) == {
        f"model.layers.{i}.self_attn.{m}_proj" for i in range(2) for m in "qv"
    }
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert rows[0]["step"] == 0 and "eval/acc" in rows[0]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6]
    assert "eval/acc_norm" in rows[-1] and rows[-1]["step"] == 6
    assert any("feat/delta1" in r for r in rows)
    assert (run_dir / "config.yaml").exists()
    assert not (run_dir / "checkpoint.pt").exists()  # removed once the run completed


def test_summary_records_the_loaded_model(smoke_run):
    """``base_model`` describes the model that ran (its own config and parameter counts, not
    the composed config's), and the result table says it in one line."""
    from stablelora.config.check import plain_config
    from stablelora.lora import adapter_arguments, apply_lora
    from stablelora.models import load_model

    cfg, run_dir, _ = smoke_run
    record = json.loads((run_dir / "summary.json").read_text())["base_model"]
    base, _ = load_model(cfg.model)
    config = base.config
    assert record["model_type"] == config.model_type == "llama"
    assert record["num_hidden_layers"] == len(base.model.layers) == 2
    assert record["hidden_size"] == base.get_input_embeddings().embedding_dim == 64
    assert record["intermediate_size"] == base.model.layers[0].mlp.up_proj.out_features
    assert record["num_attention_heads"] == config.num_attention_heads == 4
    assert record["num_key_value_heads"] == config.num_key_value_heads == 2
    assert record["vocab_size"] == base.get_input_embeddings().num_embeddings
    assert record["parameters"] == sum(p.numel() for p in base.parameters())
    lora = apply_lora(base, **adapter_arguments(plain_config(cfg.adapter), 6))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    # rank 8 on q_proj (64 -> 64) and v_proj (64 -> 32: 2 KV heads) of 2 layers
    assert record["trainable_parameters"] == trainable == 2 * 8 * ((64 + 64) + (64 + 32))
    assert (record["source"], record["dtype"], record["file"]) == ("config", "float32", None)
    assert record["weights"] == "random init (llama config), float32"
    table = result_table(json.loads((run_dir / "summary.json").read_text()))
    assert "model: llama, 2 layers, hidden 64, 4 heads (2 KV), vocab " in table


def test_adapter_loads_with_peft(smoke_run):
    from peft import PeftModel

    from stablelora.models import load_model

    cfg, run_dir, _ = smoke_run
    base, _ = load_model(cfg.model)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    saved = adapter_state(run_dir)
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved) == 8
    for name, tensor in saved.items():
        key = name.replace(".weight", ".default.weight")
        assert torch.equal(loaded[key], tensor)


def test_killed_run_resumes_bit_identically(tmp_path, monkeypatch):
    overrides = SMOKE + [
        "trainer.max_steps=8",
        "trainer.checkpoint_every=4",
        "model.config.num_hidden_layers=1",
    ]
    cfg = compose_config(overrides + ["adapter.dropout=0.1"])  # dropout: RNG state must resume too
    train(cfg, tmp_path / "uninterrupted")

    with pytest.raises(Interrupted):
        train_killed_at_batch(
            cfg, tmp_path / "resumed", 6, monkeypatch
        )  # after step 4's checkpoint
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    summary = train(cfg, tmp_path / "resumed")
    assert summary["status"] == "completed" and summary["steps"] == 8

    first, second = adapter_state(tmp_path / "uninterrupted"), adapter_state(tmp_path / "resumed")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name

    def losses(run):
        return [
            (r["step"], r["train/loss"])
            for r in read_jsonl(tmp_path / run / "metrics.jsonl")
            if "train/loss" in r
        ]

    assert losses("uninterrupted") == losses("resumed")


def test_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    cfg = compose_config(["experiment=tiny_run", "logger.mode=offline", "probe=off"])
    with pytest.raises(Interrupted):
        train_killed_at_batch(cfg, tmp_path, 5, monkeypatch)  # after step 3's checkpoint
    assert train(cfg, tmp_path)["status"] == "completed"
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>; W&B appends -1 when both attempts start within one second
    assert len(runs) == 2
    assert all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", r.name) for r in runs)


def test_nan_loss_stops_the_run_as_diverged(tmp_path):
    cfg = compose_config(SMOKE + ["optim.lr=1e30", "trainer.max_steps=20", "trainer.log_every=1"])
    summary = train(cfg, tmp_path)
    assert summary["status"] == "diverged"
    assert summary["steps"] < 20 and "loss is" in summary["error"]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


def only_run_dir(root: Path) -> Path:
    (run_dir,) = root.iterdir()
    return run_dir


@pytest.mark.slow
def test_cli_smoke_run_and_rerun_is_a_no_op(tmp_path):
    result = run_cli("run.py", *SMOKE, f"output_root={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "runs")
    assert run_dir.name.startswith("stable_lora-bbc_news-tiny_llama-s0-")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert "| eval/acc |" in result.stdout
    again = run_cli("run.py", *SMOKE, f"output_root={tmp_path}")
    assert again.returncode == 0 and "already completed" in again.stdout
    # Another preset with the same seed is another configuration: its own folder.
    other = run_cli(
        "run.py", "experiment=ablation_stop_rule", "scale=smoke", f"output_root={tmp_path}"
    )
    assert other.returncode == 0, other.stderr[-3000:]
    assert len(list((tmp_path / "runs").iterdir())) == 2


@pytest.mark.slow
def test_cli_sigterm_checkpoints_and_exits_with_one_line(tmp_path):
    import signal
    import time

    env = offline_env()
    args = [
        *SMOKE,
        "trainer.max_steps=100000",
        "trainer.checkpoint_every=0",
        "probe=off",
        f"output_root={tmp_path}",
    ]
    process = subprocess.Popen(
        [sys.executable, "run.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob("runs/*/metrics.jsonl")):
        time.sleep(0.5)
    time.sleep(2)  # a few training steps
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "interrupted by signal 15" in stderr.strip().splitlines()[-1]
    run_dir = only_run_dir(tmp_path / "runs")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and (run_dir / "checkpoint.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "basic"])
def test_sigterm_to_a_sweep_stops_every_job_and_prints_the_sweep_line(tmp_path, launcher):
    import signal
    import time

    env = offline_env()
    args = [*SMOKE, "trainer.max_steps=100000", "trainer.checkpoint_every=0", "probe=off"]
    if launcher == "joblib":
        args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    process = subprocess.Popen(
        [sys.executable, "run.py", "-m", *args, "seed=5,6", f"output_root={tmp_path}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sweep = tmp_path / "sweeps" / "tiny_run"
    running = 2 if launcher == "joblib" else 1  # the basic launcher runs one job at a time
    deadline = time.time() + 300
    while time.time() < deadline and len(list(sweep.glob("*/metrics.jsonl"))) < running:
        time.sleep(0.5)
    time.sleep(2)  # a few training steps
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    folders = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(folders) == 2
    assert stdout.strip().splitlines()[-1] == (
        "stablelora sweep: 0 completed, 0 diverged, 0 failed, "
        f"2 interrupted ({', '.join(map(str, folders))})"
    )
    statuses = [
        json.loads((p / "summary.json").read_text())["status"]
        for p in folders
        if (p / "summary.json").exists()
    ]
    assert statuses == ["interrupted"] * running  # the basic launcher's second never started
    outcomes = [
        json.loads(line)
        for log in sweep.glob(".outcomes-*.jsonl")
        for line in log.read_text().splitlines()
    ]
    for pid in {o["pid"] for o in outcomes}:  # no worker goes on training on its own
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )


@pytest.mark.slow
def test_multirun_config_error_stops_the_sweep_before_any_job(tmp_path):
    # Every job's config is checked before the first starts: one line naming the bad job,
    # exit code 2, and no run folder for the good one either.
    result = run_cli("run.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SMOKE,
                     "adapter.rank=4,0", f"output_root={tmp_path}")  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "adapter.rank=0" in lines[0], lines
    assert "adapter.rank must be a positive integer" in lines[0]
    assert not list(tmp_path.rglob("summary.json")) and not list(tmp_path.rglob("config.yaml"))


def test_multirun_records_a_failing_job_and_runs_the_others(tmp_path):
    # joblib: the local parallel launcher; one job meets a damaged record (found only when it
    # runs), one completes.
    from helpers import compose_config

    from stablelora.config.identity import run_dir_name

    sweep = tmp_path / "sweeps" / "tiny_run"
    damaged = sweep / run_dir_name(_root_=compose_config([*SMOKE, "adapter.rank=4"]))
    damaged.mkdir(parents=True)
    (damaged / "summary.json").write_text('{"status": 5}')
    result = run_cli("run.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SMOKE,
                     "adapter.rank=4,8", f"output_root={tmp_path}")  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    (failed,) = [line for line in result.stderr.splitlines() if damaged.name in line]
    assert "summary.json cannot be read (status is 5" in failed
    assert (damaged / "summary.json").read_text() == '{"status": 5}'  # left as found
    (completed,) = [p.parent for p in sweep.glob("*/summary.json") if p.parent != damaged]
    assert json.loads((completed / "summary.json").read_text())["status"] == "completed"
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("stablelora sweep: 1 completed, 0 diverged, 1 failed (")
    assert line.endswith("), 0 interrupted")
    # A job of 2 in parallel gets half the cores by default (here the completed one).
    import yaml

    from stablelora.runner.sweep import available_cores

    stored = yaml.safe_load((completed / "config.yaml").read_text())
    assert stored["trainer"]["num_threads"] == max(available_cores() // 2, 1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,message",
    [
        ("adapter.rank=0", "adapter.rank must be a positive integer"),
        ("adapter.target_modules=[query]", "match no module"),
        ("task=arc_easy", "task.data_dir"),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero_exit(tmp_path, override, message):
    result = run_cli("run.py", *SMOKE, override, f"output_root={tmp_path}")
    assert result.returncode != 0
    assert message in result.stderr.strip().splitlines()[-1]


def free_port() -> int:
    """A TCP port no process listens on now (parallel test workers each need their own)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_with_two_gloo_processes(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            "run.py",
            *SMOKE,
            "trainer.device=cpu",
            f"output_root={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=offline_env(OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((only_run_dir(tmp_path / "runs") / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert summary["final"]["eval/n"] == 8


def test_wandb_offline_run_can_be_read_back(tmp_path):
    cfg = compose_config(["experiment=tiny_run", "logger.mode=offline", "logger.per_layer_every=3"])
    train(cfg, tmp_path)
    run_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    logged, summary, config = set(), set(), set()
    for record in read_wandb_records(run_files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            logged |= {item.key or item.nested_key[0] for item in record.history.item}
        elif kind == "summary":
            summary |= {item.key or "/".join(item.nested_key) for item in record.summary.update}
        elif kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            config |= {item.key or "/".join(item.nested_key) for item in updates}
    assert {"train/loss", "eval/acc", "feat/delta1", "shrink/num_shrinking"} <= logged
    layer = "model.layers.0.self_attn.q_proj"
    assert {"per_layer/table", "per_layer/gamma/delta1"} <= logged  # per-layer: tables
    assert f"feat/{layer}/delta1" not in logged
    assert {"status", "final/eval/acc"} <= summary
    assert {"method", "model", "task", "optim"} <= config
    assert (tmp_path / "wandb_id.txt").read_text().strip() in run_files[0].name


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    # Non-reentrant checkpointing recomputes the forward: same gradients, so the same adapter.
    base = SMOKE + ["probe=off", "trainer.max_steps=3", "trainer.checkpoint_every=0"]
    train(compose_config(base), tmp_path / "plain")
    summary = train(compose_config(base + ["model.gradient_checkpointing=true"]), tmp_path / "gc")
    assert summary["status"] == "completed"
    plain, checkpointed = adapter_state(tmp_path / "plain"), adapter_state(tmp_path / "gc")
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_path_runs_on_cpu(tmp_path):
    # The CUDA default (model.precision=auto -> bf16) exercised on CPU: adapters stay float32.
    summary = train(compose_config(SMOKE + ["model.precision=bf16"]), tmp_path)
    assert summary["status"] == "completed"
    assert all(t.dtype == torch.float32 for t in adapter_state(tmp_path).values())


def test_failed_summary_records_the_task_family_kind_and_protocol(tmp_path):
    """A job that fails before training still records what the analysis routes it on."""
    from omegaconf import OmegaConf

    from stablelora.runner.job import _record_failure

    cfg = compose_config([*SMOKE, "task=chatterbot"])
    _record_failure(cfg, tmp_path / "run", "boom")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["task"] == "chatterbot"
    assert (summary["task_family"], summary["task_kind"], summary["protocol"]) == (
        "chatterbot",
        "dialogue",
        "generate",
    )
    OmegaConf.update(cfg, "task.family", "no_such_family")  # failed on its config
    _record_failure(cfg, tmp_path / "bad", "boom")
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert (summary["task_family"], summary["task_kind"]) == ("no_such_family", None)
