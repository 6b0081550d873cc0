"""Test-wide settings and the helpers several test modules share.

Settings: offline (an accidental Hub call fails at once), W&B offline, torch threads shared
out between parallel test processes (``pytest -n auto``: one per worker on CPU machines), and
every test starting from the same process state (environment variables, torch threads and
determinism flag restored after each test). Tests that share a module-scoped fixture run on one
worker under ``--dist loadgroup``, so that the fixture is built once.
Shared fixtures are defined here (pytest finds them); the plain helpers and constants the test
modules share are in ``tests/helpers.py``, the tiny models and tokenizer in ``tests/tiny.py``.
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
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import TESTS  # noqa: E402

THREADS = THREADS or min(2, torch.get_num_threads())
torch.set_num_threads(THREADS)


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


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups into the test ids
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
