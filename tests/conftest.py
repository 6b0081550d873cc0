"""Test-wide settings and the helpers several test modules share.

Settings: offline (an accidental Hub call fails at once), W&B offline, torch threads shared
out between parallel test processes (``pytest -n auto``: one per worker on CPU machines), and
every test starting from the same process state (environment variables, torch threads and
determinism flag restored after each test). Tests that share a module-scoped fixture run on one
worker under ``--dist loadgroup``, so that the fixture is built once.
Shared helpers: :func:`compose_config` (Hydra's compose API on ``conf/``) and the fixtures
below; the tiny models and tokenizer are in ``tests/tiny.py``.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: pytest-xdist's workers (``-n N``): each gets its share of the cores (at most what
#: OMP_NUM_THREADS asks for), and so do the subprocesses it starts (run.py, torchrun), which
#: read OMP_NUM_THREADS. One process alone: at most 2 threads.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, _cores() // WORKERS) if WORKERS > 1 else 0
if THREADS:
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        THREADS = max(1, min(THREADS, int(os.environ["OMP_NUM_THREADS"])))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)

import contextlib  # noqa: E402
import inspect  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

THREADS = THREADS or min(2, torch.get_num_threads())
torch.set_num_threads(THREADS)

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
TESTS = ROOT / "tests"
#: The in-process smoke run: tiny random Llama, offline BBC News, 6 steps, no W&B.
SMOKE = ["experiment=smoke", "logger.mode=disabled"]


def compose_config(overrides=(), config_dirs=()):
    """``conf/config.yaml`` composed with ``overrides``, as ``python run.py`` would;
    ``config_dirs`` are searched after ``conf/``."""
    from hydra import compose, initialize_config_dir

    from stablelora.config.identity import register_resolvers

    register_resolvers()
    extra = [f"hydra.searchpath=[{','.join(f'file://{d}' for d in config_dirs)}]"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*overrides, *(extra if config_dirs else [])])


def run_cli(*args, cwd=ROOT, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def adapter_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


class Interrupted(Exception):
    pass


def train_killed_at_batch(cfg, run_dir, batch_number, monkeypatch):
    """Run ``train`` and raise :class:`Interrupted` when it asks for batch ``batch_number``,
    as a kill would; the patch is undone afterwards so the next ``train`` resumes."""
    import stablelora.tasks as tasks
    from stablelora.runner.train import train

    original_build, calls = tasks.build_task, []

    def build_with_kill(*args, **kwargs):
        task = original_build(*args, **kwargs)
        collate = task.collate

        def collate_then_die(indices):
            calls.append(indices)
            if len(calls) == batch_number:
                raise Interrupted
            return collate(indices)

        task.collate = collate_then_die
        return task

    with monkeypatch.context() as patch:
        patch.setattr(tasks, "build_task", build_with_kill)
        train(cfg, run_dir)


def run_job_signalled_at_batch(cfg, run_dir, batch_number, signum, monkeypatch):
    """``run_job`` with ``signum`` sent to this process while batch ``batch_number`` is read."""
    import stablelora.tasks as tasks
    from stablelora.runner.job import run_job

    original_build, calls = tasks.build_task, []

    def build_with_signal(*args, **kwargs):
        task = original_build(*args, **kwargs)
        collate = task.collate

        def collate_and_signal(indices):
            calls.append(indices)
            if len(calls) == batch_number:
                os.kill(os.getpid(), signum)
            return collate(indices)

        task.collate = collate_and_signal
        return task

    with monkeypatch.context() as patch:
        patch.setattr(tasks, "build_task", build_with_signal)
        return run_job(cfg, run_dir)


@contextlib.contextmanager
def restored_process_state():
    """Undo on exit what the block changed in the process: environment variables (a sweep's
    log path, CUBLAS_WORKSPACE_CONFIG), torch threads (``train`` applies
    ``trainer.num_threads``; back to the session's :data:`THREADS`) and deterministic
    algorithms (``trainer.deterministic``)."""
    environ = dict(os.environ)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        for key, value in environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        if torch.get_num_threads() != THREADS:
            torch.set_num_threads(THREADS)
        if torch.are_deterministic_algorithms_enabled() != deterministic:
            torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(autouse=True)
def same_process_state():
    """Every test gets the process as the session set it up, so that no test depends on
    which tests ran before it in the same worker (:func:`restored_process_state`)."""
    with restored_process_state():
        yield


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (bit-reproducible CPU sums), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: Module-scoped fixtures too cheap to keep their tests on one worker.
CHEAP_SHARED_FIXTURES = {"tok"}


def _builds_a_shared_fixture(item) -> bool:
    """Whether ``item`` uses a module- or session-scoped fixture of this test folder."""
    info = getattr(item, "_fixtureinfo", None)
    for name, definitions in info.name2fixturedefs.items() if info else ():
        definition = definitions[-1]
        if (
            definition.scope in ("module", "session")
            and name not in CHEAP_SHARED_FIXTURES
            and Path(inspect.getfile(definition.func)).resolve().parent == TESTS
        ):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip themselves where no CUDA device is visible. The tests of a
    module that use one of its shared fixtures (a tiny training run, a sweep) join one
    ``xdist_group``: under ``pytest -n N --dist loadgroup`` one worker builds each once."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None and _builds_a_shared_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu_check.sh runs these)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


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


@pytest.fixture
def hub_offline(monkeypatch):
    """The Hugging Face Hub and datasets offline, as on CI machines."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    """A byte-level tokenizer (tests/tiny.py): every text encodes, no files needed."""
    from tiny import byte_tokenizer

    return byte_tokenizer()


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
