"""Helpers and constants the test modules share; the fixtures are in ``tests/conftest.py``,
the tiny models and tokenizer in ``tests/tiny.py``. Test modules import from here (or from
``conftest``, ``tiny``), never from one another.

Heavy imports (the package, the analysis, wandb) are made inside the helpers that need them, so
that importing this module costs no more than torch, which ``conftest`` imported before it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
TESTS = ROOT / "tests"
#: The task fixtures: small local copies of each QA dataset, metamathqa and gsm8k.
TASK_FIXTURES = TESTS / "fixtures" / "tasks"
QA_TASKS = ("hellaswag", "siqa", "obqa", "arc_easy", "arc_challenge")
#: The in-process run (experiment=tiny_run): tiny random Llama, offline BBC News, 6 steps, no W&B.
SMOKE = ["experiment=tiny_run", "logger.mode=disabled"]


# ---------------------------------------------------------------------------- configs, subprocesses
def compose_config(overrides=(), config_dirs=()):
    """``conf/config.yaml`` composed with ``overrides``, as ``python run.py`` would;
    ``config_dirs`` are searched after ``conf/``."""
    from hydra import compose, initialize_config_dir

    from stablelora.config.identity import register_resolvers

    register_resolvers()
    extra = [f"hydra.searchpath=[{','.join(f'file://{d}' for d in config_dirs)}]"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*overrides, *(extra if config_dirs else [])])


def offline_env(**changes: str) -> dict[str, str]:
    """This process's environment with the Hub and datasets offline (a subprocess's accidental
    Hub call fails at once), updated with ``changes`` (e.g. ``WANDB_MODE="disabled"``)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **changes}


def run_cli(*args, cwd=ROOT, timeout=600, wandb_mode="offline", expect=None, fresh=False):
    """``python *args`` (a script, ``-m module`` or ``-c code``) in a process of its own,
    offline (:func:`offline_env`) with W&B in ``wandb_mode``; with ``expect``, asserts that it
    exits with that status. The process is forked from a warm interpreter that has imported
    torch, transformers and the package (:mod:`zygote`), or is a fresh ``python`` with
    ``fresh`` (a test of what a command imports) or under ``STABLELORA_TESTS_FRESH=1``."""
    env = offline_env(WANDB_MODE=wandb_mode)
    if fresh or os.environ.get("STABLELORA_TESTS_FRESH") == "1":
        result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                                text=True, timeout=timeout)  # fmt: skip
    else:
        result = _ZYGOTE.run([str(a) for a in args], Path(cwd), env, timeout)
    if expect is not None:
        assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-4000:]
    return result


class Zygote:
    """The client of one :mod:`zygote` process per test process, started on first use."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.pending = b""  # read from the zygote, not yet a whole line

    def start(self) -> subprocess.Popen:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, str(TESTS / "zygote.py")], cwd=ROOT, env=offline_env(),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
            )  # fmt: skip
            self.pending = b""
            ready = self.message(timeout=120)
            assert ready is not None and "ready" in ready, f"the test zygote did not start: {ready}"
        return self.process

    def message(self, timeout: float) -> dict | None:
        """The zygote's next message, or None if none came within ``timeout`` seconds."""
        import select
        import time

        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.process.stdout.fileno(), 65536)
            assert chunk, f"the test zygote exited with {self.process.wait()}"
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, args: list[str], cwd: Path, env: dict, timeout: float):
        import signal
        import tempfile

        process = self.start()
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"argv": args, "cwd": str(cwd), "env": env, "out": str(out), "err": str(err)}
            process.stdin.write((json.dumps(request) + "\n").encode())  # type: ignore[union-attr]
            started = self.message(timeout=60)
            assert started is not None, "the test zygote did not fork"
            ended = self.message(timeout)
            if ended is None:  # as subprocess.run: kill it (and what it started), then raise
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(started["pid"], signal.SIGKILL)
                self.message(timeout=60)
                raise subprocess.TimeoutExpired([sys.executable, *args], timeout)
            return subprocess.CompletedProcess(
                [sys.executable, *args], ended["code"], out.read_text(errors="replace"),
                err.read_text(errors="replace"),
            )  # fmt: skip


_ZYGOTE = Zygote()


# ---------------------------------------------------------------------------- runs and their records
def adapter_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The saved adapter weights of a run folder."""
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


class Interrupted(Exception):
    """What :func:`train_killed_at_batch` raises in place of a kill."""


@contextlib.contextmanager
def at_batch(batch_number, action, monkeypatch):
    """Within the block, every task built calls ``action()`` when the run asks for batch
    ``batch_number`` (counted over the block), before that batch is collated; the patch is
    undone afterwards so the next run goes on undisturbed."""
    import stablelora.tasks as tasks

    original_build, calls = tasks.build_task, []

    def build_with_action(*args, **kwargs):
        task = original_build(*args, **kwargs)
        collate = task.collate

        def collate_after_action(indices):
            calls.append(indices)
            if len(calls) == batch_number:
                action()
            return collate(indices)

        task.collate = collate_after_action
        return task

    with monkeypatch.context() as patch:
        patch.setattr(tasks, "build_task", build_with_action)
        yield


def train_killed_at_batch(cfg, run_dir, batch_number, monkeypatch):
    """Run ``train`` and raise :class:`Interrupted` when it asks for batch ``batch_number``,
    as a kill would; the patch is undone afterwards so the next ``train`` resumes."""
    from stablelora.runner.train import train

    def kill():
        raise Interrupted

    with at_batch(batch_number, kill, monkeypatch):
        train(cfg, run_dir)


def run_job_signalled_at_batch(cfg, run_dir, batch_number, signum, monkeypatch):
    """``run_job`` with ``signum`` sent to this process while batch ``batch_number`` is read."""
    from stablelora.runner.job import run_job

    with at_batch(batch_number, lambda: os.kill(os.getpid(), signum), monkeypatch):
        return run_job(cfg, run_dir)


def rows_without_timing(run_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` without the wall-clock throughput (differs between runs)."""
    from stablelora.records.rows import read_jsonl

    timing = {"train/steps_per_s", "train/tokens_per_s"}
    return [
        {k: v for k, v in row.items() if k not in timing}
        for row in read_jsonl(run_dir / "metrics.jsonl")
    ]


def read_wandb_records(path: Path) -> list:
    """Parse an offline ``run-*.wandb`` file: W&B's LevelDB-style log of protobuf records."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, position = path.read_bytes(), 32768, 7  # 7 bytes of file header
    assert data[:4] == b":W&B"
    chunks, pending = [], b""
    while position + 7 <= len(data):
        left = block - position % block
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST, MIDDLE/LAST
        if kind in (1, 4):
            chunks.append(pending)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


# ---------------------------------------------------------------------------- synthetic records
def _set(config: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        config = config.setdefault(key, {})
    config[last] = value


def write_run(
    root: Path,
    name: str,
    *,
    model="tiny_llama",
    task="bbc_news",
    method="lora",
    seed=0,
    acc=0.5,
    status="completed",
    config=None,
    final=None,
    initial=None,
    metrics=(),
    main_metric="eval/acc",
    train_time=10.0,
    shrink=None,
    recorded=None,
) -> Path:
    """A run directory in the runner's format, with the values given; ``recorded``: summary
    fields of a newer runner (e.g. ``task_kind``), absent from older records."""
    from stablelora.optim.stable_lora import shrink_counts

    run_dir = root / name
    run_dir.mkdir(parents=True)
    shrinks = method.startswith("stable")
    cfg = {
        "model": {"name": model},
        "task": {"name": task, "protocol": "loglik"},
        "method": {"name": method},
        "adapter": {
            "name": "lora",
            "rank": 8,
            "target_modules": ["q_proj", "v_proj"],
            "init_scale": 1.0,
        },
        "optimizer": {
            "name": method,
            "builder": "stable_lora" if shrinks else method,
            **({"shrink_ratio": 5e-4, "stop_rule": "norm"} if shrinks else {}),
        },
        "optim": {"lr": 1e-4},
        "trainer": {"max_steps": 10},
        "seed": seed,
    }
    for key, value in (config or {}).items():
        _set(cfg, key, value)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    final = {main_metric: acc} if final is None else final
    summary = {
        "status": status,
        "error": None if status == "completed" else "boom",
        "steps": 10,
        "max_steps": 10,
        "main_metric": main_metric,
        "initial": {main_metric: 0.25} if initial is None else initial,
        "final": final if status == "completed" else {},
        "best": {},
        "train_loss_final": 1.0,
        "wall_time_s": train_time + 1,
        "train_time_s": train_time,
        "peak_memory_mb": 1000.0,
        "method": method,
        "task": task,
        "model": model,
        "seed": seed,
        "shrink": shrink,
        # As StableLoRA.record_summary writes them: the counts from the per-layer state.
        "shrink_layers": shrink_counts(shrink) if shrink else None,
        **(recorded or {}),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run_dir


def tables_of(root: Path, mode="mean") -> dict:
    """The analysis tables of the runs under ``root``, by name."""
    from analysis.collect import collect
    from analysis.tables import build_tables

    return {t.name: t for t in build_tables(collect(root), mode)}


def write_examples(run_dir, correct: dict[str, list[bool]], step: int = 10) -> None:
    """``examples.parquet`` with one evaluation at ``step`` (and a worse one at step 0, which
    the tests must ignore: only the last evaluation counts)."""
    from stablelora.records.examples import ExampleRecords

    records = ExampleRecords(run_dir)
    for at, flip in ((0, True), (step, False)):
        rows = [
            {"eval_set": name, "example_id": f"{name}-{i}", "correct": hit != flip}
            for name, hits in correct.items()
            for i, hit in enumerate(hits)
        ]
        records.write(at, rows)


def flipped(base: list[bool], gained: int, lost: int, rng) -> list[bool]:
    """``base`` with ``gained`` wrong answers made right and ``lost`` right ones made wrong."""
    out = list(base)
    wrong = [i for i, h in enumerate(base) if not h]
    right = [i for i, h in enumerate(base) if h]
    for i in rng.choice(wrong, gained, replace=False):
        out[i] = True
    for i in rng.choice(right, lost, replace=False):
        out[i] = False
    return out


def check_latex(text: str) -> None:
    """A parse check of a booktabs table fragment."""
    environments = re.findall(r"\\(begin|end)\{(\w+)\}", text)
    stack = []
    for kind, name in environments:
        if kind == "begin":
            stack.append(name)
        else:
            assert stack and stack.pop() == name, f"unbalanced \\end{{{name}}}"
    assert not stack, f"unclosed environments {stack}"
    assert "\\begin{tabular}" in text and "\\end{tabular}" in text
    body = text[text.index("\\begin{tabular}") : text.index("\\end{tabular}")]
    assert body.count("\\toprule") == body.count("\\midrule") == body.count("\\bottomrule") == 1
    spec = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", body).group(1)
    rows = [line for line in body.splitlines() if line.endswith("\\\\")]
    assert rows, "no rows"
    for line in rows:
        assert len(re.findall(r"(?<!\\)&", line)) == len(spec) - 1, line
    assert text.count("{") - text.count("\\{") == text.count("}") - text.count("\\}")


# ---------------------------------------------------------------------------- tasks and models
def task_config(name: str, **overrides) -> dict:
    """conf/task/<name>.yaml as a dict, reading its data from the fixtures."""
    from stablelora.config.groups import group_option

    cfg = group_option("task", name)  # with the shared task/_base.yaml
    if name in QA_TASKS:
        cfg["data_dir"] = str(TASK_FIXTURES / name)
    return {**cfg, **overrides}


def ids(tok, text: str) -> list[int]:
    """The token ids of ``text``, without special tokens."""
    return tok(text, add_special_tokens=False).input_ids


class ScriptedGenerator(torch.nn.Module):
    """Answers every prompt with the same text; checks the prompts are left-padded."""

    def __init__(self, tok, answer: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answer_ids = ids(tok, answer) + [tok.eos_token_id]

    def generate(self, input_ids, attention_mask, generation_config):
        assert attention_mask[:, -1].all(), "prompts must be left-padded"
        assert not generation_config.do_sample and generation_config.num_beams == 1
        new = torch.tensor(self.answer_ids[: generation_config.max_new_tokens])
        return torch.cat([input_ids, new.expand(input_ids.shape[0], -1)], dim=1)


def toy_lora(width=32, depth=2, seed=0):
    """A LoRA'd toy width model (stablelora.toy) and its teacher task."""
    from stablelora import apply_lora
    from stablelora.toy import TOY_TARGET_MODULES, ToyTeacherTask, build_toy_model

    torch.manual_seed(seed)
    model = apply_lora(
        build_toy_model(width, depth, seed),
        rank=4,
        alpha=8,
        target_modules=list(TOY_TARGET_MODULES),
    )
    return model, ToyTeacherTask(width, depth, seed, num_train=64, num_eval=32)


def probed_train_steps(model, task, optimizer, probe, steps, batch_size=8):
    """The training-loop contract; returns the metrics dict of every step."""
    out = []
    for step in range(1, steps + 1):
        probe.arm(step)
        start = step * batch_size % task.num_train_examples
        model(**task.collate(list(range(start, start + batch_size)))).loss.backward()
        probe.before_update()
        optimizer.step()
        out.append(probe.after_update(optimizer))
        optimizer.zero_grad()
    return out
