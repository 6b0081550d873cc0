"""The test suite's own rules (tests/conftest.py): a process state every test starts from,
torch threads shared out between parallel workers, shared fixtures kept on one worker."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import THREADS, WORKERS, _cores, restored_process_state


def test_process_state_is_restored_after_a_block_that_changes_it(monkeypatch):
    monkeypatch.setenv("STABLELORA_TEST_KEPT", "before")
    monkeypatch.delenv("STABLELORA_TEST_ADDED", raising=False)
    deterministic = torch.are_deterministic_algorithms_enabled()
    with restored_process_state():
        os.environ["STABLELORA_TEST_ADDED"] = "leaked"  # as SweepSummary sets its log path
        os.environ["STABLELORA_TEST_KEPT"] = "changed"
        torch.set_num_threads(THREADS + 1)  # as train() applies trainer.num_threads
        torch.use_deterministic_algorithms(not deterministic)
    assert "STABLELORA_TEST_ADDED" not in os.environ
    assert os.environ["STABLELORA_TEST_KEPT"] == "before"
    assert torch.get_num_threads() == THREADS
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    with pytest.raises(RuntimeError), restored_process_state():  # restored on errors too
        os.environ["STABLELORA_TEST_ADDED"] = "leaked"
        raise RuntimeError
    assert "STABLELORA_TEST_ADDED" not in os.environ


def test_every_test_starts_on_the_sessions_threads():
    assert torch.get_num_threads() == THREADS
    if WORKERS > 1:  # pytest -n N: the workers do not ask for more cores than there are
        asked = WORKERS * THREADS
        assert asked <= max(_cores(), WORKERS)
        # ... and the subprocesses they start (run.py, torchrun) read their share
        assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == str(THREADS)
    else:
        assert 1 <= THREADS <= 2


def test_tests_sharing_a_module_fixture_share_an_xdist_group(request):
    items = {item.nodeid: item for item in request.session.items}

    def group(nodeid):
        marker = items[nodeid].get_closest_marker("xdist_group")
        return marker.args[0] if marker else None

    run_folder = [n for n in items if n.startswith("tests/test_run_folder.py::")]
    uses = {n for n in run_folder if "uninterrupted_fast_run" in items[n].fixturenames}
    if not uses:
        pytest.skip("no test of tests/test_run_folder.py that shares its run is selected")
    assert {group(n) for n in uses} == {"test_run_folder"}
    # A test with no shared fixture is scheduled on its own.
    assert all(group(n) is None for n in set(run_folder) - uses)
    assert group(request.node.nodeid) is None
    if request.config.getoption("loadgroup", False):  # a pytest-xdist worker under loadgroup:
        # xdist schedules by the group it writes into the test id (pytest 9.2 ignores it)
        assert all(n.endswith("@test_run_folder") for n in uses)
        assert not any("@" in n for n in set(run_folder) - uses)


@pytest.mark.parametrize(
    "args",
    [
        ("run.py", "experiment=tiny_run", "adapter.rank=0"),  # a config error: one line, exit 2
        ("-m", "experiments", "no_such_experiment"),
        ("-c", "import os, sys; print(sys.argv, os.environ['WANDB_MODE']); sys.exit('bye')", "x"),
        ("-c", "import sys; sys.path.insert(0, 'conf'); raise KeyError('traceback')"),
    ],
)
def test_a_command_forked_from_the_zygote_runs_as_in_a_fresh_interpreter(args, tmp_path):
    """helpers.run_cli forks commands from a warm interpreter (tests/zygote.py): the same exit
    code, standard output and last line of standard error as ``python`` started afresh."""
    from helpers import run_cli

    args = (*args, f"output_root={tmp_path}") if args[0] == "run.py" else args
    warm, fresh = (
        run_cli(*args, wandb_mode="disabled"),
        run_cli(*args, fresh=True, wandb_mode="disabled"),
    )
    assert (warm.returncode, warm.stdout) == (fresh.returncode, fresh.stdout)
    assert (
        warm.returncode != 0
        and warm.stderr.strip().splitlines()[-1] == (fresh.stderr.strip().splitlines()[-1])
    )


def test_a_forked_command_past_its_timeout_is_killed_with_what_it_started():
    import subprocess
    import time

    from helpers import run_cli

    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli("-c", code, timeout=2)
    assert time.monotonic() - start < 30
    survivors = subprocess.run(
        ["pgrep", "-f", "time.sleep\\(60\\)"], capture_output=True, text=True
    )
    assert survivors.stdout.strip() == ""
    assert run_cli("-c", "print('next')", expect=0).stdout == "next\n"  # the zygote serves on
