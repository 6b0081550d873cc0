"""The committed results (results/<scale>/): each report is what its committed records give.

``python -m experiments.reproduce --scale cpu --report-only --report-out DIR`` rebuilds every
report from the committed run records alone (analysis only, seconds); its tables must equal
the committed ones, so a report edited by hand, or records changed without rebuilding their
report, fail here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "cpu"
SWEEPS = sorted(p.parent.name for p in RESULTS.glob("*/runs"))
#: Heavy files that must never be committed with the records.
FORBIDDEN = ("adapter", "checkpoint.pt", "checkpoint.prev.pt", "wandb", "layers.parts")


def test_results_hold_records_of_every_cpu_artefact_run_so_far():
    assert SWEEPS, f"no committed records under {RESULTS}"
    for sweep in SWEEPS:
        runs = sorted((RESULTS / sweep / "runs").glob("*/summary.json"))
        assert runs, sweep
        for summary in runs:
            names = {p.name for p in summary.parent.iterdir()}
            assert not names & set(FORBIDDEN), (summary.parent, names & set(FORBIDDEN))
            assert json.loads(summary.read_text())["status"] in ("completed", "diverged")
    size = sum(p.stat().st_size for p in RESULTS.rglob("*") if p.is_file())
    assert size < 100 * 2**20, f"results/cpu holds {size / 2**20:.1f} MiB: keep it small"


def assert_same_table(rebuilt: Path, committed: Path) -> None:
    """The displayed tables (md) byte for byte; the data (csv) to 1e-9 relative, since a
    regression fit's last digits move with the numpy/BLAS build (seen: 1 ulp in a CI width
    exponent), which is not a change of the result."""
    if committed.suffix == ".md":
        assert rebuilt.read_text() == committed.read_text(), committed
        return
    pd.testing.assert_frame_equal(
        pd.read_csv(rebuilt),
        pd.read_csv(committed),
        check_exact=False,
        rtol=1e-9,
        atol=1e-12,
        obj=str(committed),
    )


def test_committed_reports_are_rebuilt_from_the_committed_records(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.reproduce",
            "--scale",
            "cpu",
            "--report-only",
            "--report-out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for sweep in SWEEPS:
        committed = RESULTS / sweep / "report" / "tables"
        rebuilt = tmp_path / sweep / "tables"
        tables = sorted(p.name for p in committed.glob("*") if p.suffix in (".csv", ".md"))
        assert tables, committed
        assert tables == sorted(p.name for p in rebuilt.glob("*") if p.suffix in (".csv", ".md"))
        for name in tables:
            assert_same_table(rebuilt / name, committed / name)
        plots = {p.name for p in (RESULTS / sweep / "report" / "plots").glob("*.png")}
        assert plots == {p.name for p in (tmp_path / sweep / "plots").glob("*.png")}
    width = RESULTS / "width_sweep"
    assert (width / "records.jsonl").exists(), "the width sweep's records are committed"
    for name in ("exponents.md", "exponents.csv"):
        assert_same_table(tmp_path / "width_sweep" / name, width / "report" / name)
    assert "/work" not in (width / "records.jsonl").read_text()[:5000]  # no machine paths


@pytest.mark.parametrize("sweep", [*SWEEPS, "width_sweep"])
def test_results_readme_names_every_sweep(sweep):
    assert sweep in (RESULTS / "README.md").read_text()


def _run_folder(root: Path, name: str, status: str = "completed") -> Path:
    run_dir = root / name
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": status, "run": name}))
    (run_dir / "config.yaml").write_text(f"seed: {name[-1]}\n")
    (run_dir / "checkpoint.pt").write_bytes(b"heavy")
    return run_dir


def test_copy_records_adds_a_sitting_to_the_committed_runs_and_prune_drops_the_rest(tmp_path):
    from experiments.reproduce import copy_records

    results = tmp_path / "results" / "cpu_table1"
    first, second = tmp_path / "machine1", tmp_path / "machine2"
    _run_folder(first, "lora-s0")
    _run_folder(first, "lora-s1", status="interrupted")
    assert copy_records(first, results) == (2, 0)
    # Another machine, without the first one's outputs, finishes seed 1 and runs seed 2.
    _run_folder(second, "lora-s1")
    _run_folder(second, "lora-s2")
    assert copy_records(second, results) == (2, 1)
    runs = results / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["lora-s0", "lora-s1", "lora-s2"]
    assert json.loads((runs / "lora-s1" / "summary.json").read_text())["status"] == "completed"
    assert sorted(p.name for p in (runs / "lora-s0").iterdir()) == ["config.yaml", "summary.json"]
    assert copy_records(second, results, prune=True) == (2, 0)
    assert sorted(p.name for p in runs.iterdir()) == ["lora-s1", "lora-s2"]
