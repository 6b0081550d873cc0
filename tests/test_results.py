"""The committed results (results/<scale>/): each report is what its committed records give.

``python -m experiments.reproduce --scale cpu --report-only --report-out DIR`` rebuilds every
report from the committed run records alone (analysis only, seconds); every file of it must
equal the committed one (plots by their pixels), so a report edited by hand, or records
changed without rebuilding their report, fail here, and a reproduction leaves a clean clone
unmodified.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import ROOT, run_cli

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


def pixels(path: Path) -> bytes:
    """A PNG's decoded pixels (what a reader sees; the zlib stream may vary)."""
    from matplotlib.image import imread

    image = imread(path)
    return bytes(str(image.shape), "ascii") + image.tobytes()


def plotted_with(png: Path) -> str:
    """The matplotlib build that drew a PNG (its ``Software`` text)."""
    from PIL import Image

    with Image.open(png) as image:
        return image.text.get("Software", "")


def report_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_committed_reports_are_rebuilt_byte_for_byte_from_the_committed_records(tmp_path):
    """Every committed report file (tables, report.md, plots) is exactly what
    ``--report-only`` rebuilds: a reproduction leaves the clone unmodified (no creation date
    in a PDF, CSV floats rounded to fixed digits, ...), and a hand-edited report, or records
    changed without rebuilding their report, fail here."""
    result = run_cli("-m", "experiments.reproduce", "--scale", "cpu", "--report-only",
                     "--report-out", str(tmp_path), wandb_mode="disabled")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for sweep in [*SWEEPS, "width_sweep"]:
        committed, rebuilt = RESULTS / sweep / "report", tmp_path / sweep
        files = report_files(committed)
        assert any(name.endswith(".csv") for name in files), committed
        assert files == report_files(rebuilt), sweep
        for name in files:
            plot = name.endswith((".png", ".pdf"))
            png = committed / Path(name).with_suffix(".png")
            if plot and plotted_with(png) != plotted_with(rebuilt / png.relative_to(committed)):
                # Another matplotlib draws other bytes: the plots exist, their bytes are
                # compared under the build that drew the committed ones.
                warnings.warn(f"{png} was drawn by {plotted_with(png)}: not compared")
                continue
            if name.endswith(".png"):
                same = pixels(rebuilt / name) == pixels(committed / name)
            else:
                same = (rebuilt / name).read_bytes() == (committed / name).read_bytes()
            assert same, f"{committed / name} differs from its rebuild"
    width = RESULTS / "width_sweep"
    assert (width / "records.jsonl").exists(), "the width sweep's records are committed"
    assert "/work" not in (width / "records.jsonl").read_text()[:5000]  # no machine paths


def test_written_csv_floats_do_not_depend_on_the_last_bits(tmp_path):
    from analysis.tables.formatting import write_csv

    value = 0.1 + 0.2  # 0.30000000000000004
    frames = [
        pd.DataFrame({"x": [v, 1.0, float("nan")], "name": ["a", "b", "c"]})
        for v in (value, np.nextafter(value, 1.0), 0.3)
    ]
    texts = []
    for index, frame in enumerate(frames):
        write_csv(frame, tmp_path / f"{index}.csv")
        texts.append((tmp_path / f"{index}.csv").read_text())
    assert texts[0] == texts[1] == texts[2] == "x,name\n0.3,a\n1.0,b\n,c\n"


def test_saved_figures_hold_no_build_metadata(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.plots import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    for suffix in (".pdf", ".png"):
        save_figure(fig, tmp_path / f"a{suffix}")
        time.sleep(1.1)  # a creation date in seconds would differ
        save_figure(fig, tmp_path / f"b{suffix}")
        first = (tmp_path / f"a{suffix}").read_bytes()
        assert first == (tmp_path / f"b{suffix}").read_bytes()
        assert b"CreationDate" not in first
    assert plotted_with(tmp_path / "a.png").startswith("Matplotlib version")
    plt.close(fig)


@pytest.mark.parametrize("sweep", [*SWEEPS, "width_sweep"])
def test_results_readme_names_every_sweep(sweep):
    assert sweep in (RESULTS / "README.md").read_text()


def _run_folder(root: Path, name: str, status: str = "completed") -> Path:
    run_dir = root / name
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": status, "run": name}))
    (run_dir / "config.yaml").write_text(f"seed: {name[-1]}\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "layers.parquet").write_bytes(b"PAR1 per-layer values PAR1")
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
    copied = sorted(p.name for p in (runs / "lora-s0").iterdir())
    assert copied == ["config.yaml", "layers.parquet", "metrics.jsonl", "summary.json"]
    assert (runs / "lora-s0" / "layers.parquet").read_bytes() == b"PAR1 per-layer values PAR1"
    assert copy_records(second, results, prune=True) == (2, 0)
    assert sorted(p.name for p in runs.iterdir()) == ["lora-s1", "lora-s2"]


def _readme_table(text: str, header_start: str) -> list[list[str]]:
    """The cells of the Markdown table in ``text`` whose header row starts ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip().startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_tuned_study_figures_in_the_readme_come_from_the_committed_tables():
    """The tuned study's verdict table, per-task differences and overlap counts in
    results/cpu/README.md are the committed tables' numbers (a hand-edited figure fails)."""
    text = (RESULTS / "README.md").read_text()
    report = RESULTS / "cpu_tuned_final" / "report" / "tables"
    verdicts = pd.read_csv(report / "verdicts.csv")
    primary = verdicts[verdicts["role"] == "primary"].set_index("method")
    rows = _readme_table(text, "| Stable-LoRA against |")
    assert {row[0] for row in rows} == set(primary.index)
    for method, diff, ci, p_holm, tost_holm, verdict in rows:
        want = primary.loc[method]
        assert diff == f"{want['diff']:+.2f}", method
        assert ci == f"[{want['ci_low']:+.2f}, {want['ci_high']:+.2f}]", method
        assert p_holm == f"{want['p_adjusted']:.3f}" and tost_holm == f"{want['tost_adjusted']:.3f}"
        assert verdict == want["verdict"], method
    stable = pd.read_csv(report / "stable_vs_baselines.csv")
    columns = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge", "BBC News": "bbc_news"}
    for row in _readme_table(
        text, "| against | ARC-Easy | ARC-Challenge | BBC News | average (primary)"
    ):
        baseline, cells = row[0], row[1:]
        for name, cell in zip([*columns.values(), "Avg"], cells):
            want = stable[(stable["method"] == baseline) & (stable["eval_set"] == name)].iloc[0]
            assert cell == f"{want['diff']:+.2f} [{want['ci_low']:+.2f}, {want['ci_high']:+.2f}]"
    overlap = pd.read_csv(report / "contamination.csv").set_index("eval_set")
    for name, words in (
        ("bbc_news", "BBC News"),
        ("arc_easy", "ARC-Easy"),
        ("arc_challenge", "ARC-Challenge"),
    ):
        counted = f"{overlap.loc[name, 'overlapping']:,} of {overlap.loc[name, 'items']:,} {words}"
        assert counted in " ".join(text.split()), counted
    clean = int(primary["examples"].iloc[0])
    assert f"({clean:,} of {int(overlap['items'].sum()):,} items" in text
