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
            assert (rebuilt / name).read_text() == (committed / name).read_text(), (sweep, name)
        plots = {p.name for p in (RESULTS / sweep / "report" / "plots").glob("*.png")}
        assert plots == {p.name for p in (tmp_path / sweep / "plots").glob("*.png")}
    width = RESULTS / "width_sweep"
    assert (width / "records.jsonl").exists(), "the width sweep's records are committed"
    for name in ("exponents.md", "exponents.csv"):
        rebuilt = (tmp_path / "width_sweep" / name).read_text()
        assert rebuilt == (width / "report" / name).read_text(), name
    assert "/work" not in (width / "records.jsonl").read_text()[:5000]  # no machine paths


@pytest.mark.parametrize("sweep", [*SWEEPS, "width_sweep"])
def test_results_readme_names_every_sweep(sweep):
    assert sweep in (RESULTS / "README.md").read_text()
