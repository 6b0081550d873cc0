"""analysis/: collect, tables, plots and the report command.

The ``sweep`` fixture makes real records once per module (a smoke sweep of 2 methods x 2
seeds, and copies of real runs turned into a third seed with another accuracy, a run that
failed during training (with ``adapter.rank=0``), a diverged run and an unfinished run); the tests read its
summary.json files directly to compute the expected numbers by hand. The W&B tests
convert fake W&B runs; tests/test_analysis_tables.py checks the tables on synthetic records.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from helpers import check_latex, run_cli

from analysis.collect import collect, collect_wandb, wandb_run_records
from analysis.tables import build_tables

#: Every command here runs offline with W&B disabled, and must exit 0.
NO_WANDB_EXIT_0 = dict(wandb_mode="disabled", expect=0)


# ---------------------------------------------------------------------------- real records
def _retag(run_dir: Path, seed: int, **summary_changes) -> None:
    """Make a copied run a different seed (config and summary), with summary changes."""
    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        config = yaml.safe_load(path.read_text())
        config["seed"] = seed
        path.write_text(yaml.safe_dump(config))
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary.update(seed=seed, **summary_changes)
    summary_path.write_text(json.dumps(summary))


def completed_run(sweep_dir: Path, method: str, seed: int) -> Path:
    """The folder of the sweep's completed run of ``method`` and ``seed``."""
    (run_dir,) = [
        path.parent
        for path in sweep_dir.glob("*/summary.json")
        if (summary := json.loads(path.read_text()))["status"] == "completed"
        and (summary["method"], summary["seed"]) == (method, seed)
    ]
    return run_dir


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("analysis")
    run_cli("run.py", "-m", "experiment=table1", "scale=smoke", "method=lora,stable_lora",
            f"output_root={root}", **NO_WANDB_EXIT_0)  # fmt: skip
    sweep_dir = root / "sweeps" / "table1_smoke"
    # A run that failed during training (a config error leaves no folder), in a config of its
    # own: rank 0.
    failed = sweep_dir / "lora-failed-s0"
    shutil.copytree(completed_run(sweep_dir, "lora", 0), failed)
    for path in (failed / "config.yaml", failed / ".hydra" / "config.yaml"):
        config = yaml.safe_load(path.read_text())
        config["adapter"]["rank"] = 0
        path.write_text(yaml.safe_dump(config))
    error = "RuntimeError: CUDA error: an illegal memory access was encountered"
    _retag(failed, 0, status="failed", error=error, final={}, best={})
    # A third stable_lora seed with a different accuracy, so that mean and best differ.
    third = sweep_dir / "stable_lora-copy-s2"
    shutil.copytree(completed_run(sweep_dir, "stable_lora", 1), third)
    summary = json.loads((third / "summary.json").read_text())
    _retag(third, 2, final={**summary["final"], "eval/acc": 0.875})
    # A diverged lora run and one that never finished (no summary).
    diverged = sweep_dir / "lora-copy-s3"
    shutil.copytree(completed_run(sweep_dir, "lora", 1), diverged)
    _retag(diverged, 3, status="diverged", error="loss is nan at step 3", final={}, best={})
    unfinished = sweep_dir / "lora-copy-s4"
    shutil.copytree(completed_run(sweep_dir, "lora", 0), unfinished)
    _retag(unfinished, 4)
    (unfinished / "summary.json").unlink()
    return sweep_dir


def hand_records(sweep_dir: Path) -> pd.DataFrame:
    """Every run of the sweep read directly from its files: method, rank, seed, status and
    the final accuracy in %."""
    rows = []
    for run_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name != "report"):
        config_path = run_dir / "config.yaml"
        if not config_path.exists():
            config_path = run_dir / ".hydra" / "config.yaml"
        config = yaml.safe_load(config_path.read_text())
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        status = summary.get("status", "incomplete")
        final = summary.get("final", {}).get("eval/acc") if status == "completed" else None
        # .hydra/config.yaml is unresolved (method.name is an interpolation): the summary names it
        method = summary.get("method") or config["method"]["name"]
        rows.append(
            {
                "run": run_dir.name,
                "method": method,
                "rank": config["adapter"]["rank"],
                "seed": config["seed"],
                "status": status,
                "acc": math.nan if final is None else 100 * final,
            }
        )
    return pd.DataFrame(rows)


def expected_cells(records: pd.DataFrame, mode: str) -> dict:
    """{(method, rank): (value, n, runs)} by hand: mean (or max) of the completed runs."""
    cells = {}
    for (method, rank), group in records.groupby(["method", "rank"]):
        values = group["acc"].dropna()
        value = values.max() if mode == "best" else values.mean()
        std = values.std() if mode == "mean" and len(values) > 1 else math.nan
        cells[(method, rank)] = (value, std, len(values), len(group))
    return cells


def label_of(method: str, rank: int) -> str:
    return f"lora, rank={rank}" if method == "lora" else method


@pytest.mark.slow
def test_collect_keeps_every_run_with_its_status(sweep):
    coll = collect(sweep)
    records = hand_records(sweep)
    assert len(coll.runs) == len(records) == 8
    statuses = dict(zip(coll.runs["run"], coll.runs["status"]))
    assert statuses == dict(zip(records["run"], records["status"]))
    assert sorted(statuses.values()).count("completed") == 5
    failed = coll.runs[coll.runs["status"] == "failed"].iloc[0]
    assert failed["adapter.rank"] == 0 and "illegal memory access" in failed["error"]
    for row in coll.runs.itertuples():
        summary_path = Path(row.run_id) / "summary.json"
        if row.status == "completed":
            summary = json.loads(summary_path.read_text())
            assert row.score == summary["final"][summary["main_metric"]]
            assert row.train_time_s == summary["train_time_s"]
        else:
            assert math.isnan(row.score)
    # Histories: every logged key of a completed run, the shrink stops of stable_lora.
    first = coll.runs[coll.runs["run_id"] == str(completed_run(sweep, "lora", 0))].iloc[0]
    history = coll.history[coll.history["run_id"] == first["run_id"]]
    logged = [json.loads(line) for line in (Path(first["run_id"]) / "metrics.jsonl").open()]
    assert sorted(history.loc[history["key"] == "train/loss", "step"]) == sorted(
        r["step"] for r in logged if "train/loss" in r
    )
    assert set(coll.shrink["run_id"]) == set(
        coll.runs.loc[(coll.runs["method"] == "stable_lora"), "run_id"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mean", "best"])
def test_table1_matches_the_summaries(sweep, mode):
    table = {t.name: t for t in build_tables(collect(sweep), mode)}["table1"]
    expected = expected_cells(hand_records(sweep), mode)
    data = table.data.set_index("label")
    assert set(data.index) == {label_of(m, r) for m, r in expected}
    for (method, rank), (value, std, n, runs) in expected.items():
        row = data.loc[label_of(method, rank)]
        assert row["method"] == method
        assert row["bbc_news_n"] == n and row["bbc_news_runs"] == runs
        if n:
            assert row["bbc_news"] == pytest.approx(value)
            assert row["avg"] == pytest.approx(value)  # one task: the average is the task
        else:
            assert math.isnan(row["bbc_news"])
        if mode == "mean" and n > 1:
            assert row["bbc_news_std"] == pytest.approx(std)
    # The failed, diverged and unfinished runs are in the table, not dropped.
    shown = table.display.set_index("method")
    assert "failed (0/1)" in shown.loc["lora, rank=0", "bbc_news"]
    assert "2/4" in shown.loc["lora, rank=8", "bbc_news"]
    notes = " ".join(table.notes)
    assert "diverged" in notes and "incomplete" in notes and "failed" in notes


@pytest.mark.slow
def test_best_of_seeds_differs_from_mean(sweep):
    coll = collect(sweep)
    mean = {t.name: t for t in build_tables(coll, "mean")}["table1"].data.set_index("label")
    best = {t.name: t for t in build_tables(coll, "best")}["table1"].data.set_index("label")
    values = hand_records(sweep).query("method == 'stable_lora'")["acc"]
    assert best.loc["stable_lora", "bbc_news"] == pytest.approx(values.max()) == 87.5
    assert mean.loc["stable_lora", "bbc_news"] == pytest.approx(values.mean())
    assert mean.loc["stable_lora", "bbc_news"] < best.loc["stable_lora", "bbc_news"]


@pytest.mark.slow
def test_runs_not_completed_lists_every_other_status(sweep):
    table = {t.name: t for t in build_tables(collect(sweep))}["runs_not_completed"]
    shown = dict(zip(table.display["run"], table.display["status"]))
    (failed,) = [
        path.parent.name
        for path in sweep.glob("*/summary.json")
        if json.loads(path.read_text())["status"] == "failed"
    ]
    assert shown == {failed: "failed", "lora-copy-s3": "diverged", "lora-copy-s4": "incomplete"}


@pytest.mark.slow
def test_report_command_writes_tables_and_plots(sweep, tmp_path):
    out = tmp_path / "report"
    result = run_cli("-m", "analysis.report", str(sweep), "--out", str(out), **NO_WANDB_EXIT_0)
    assert "### Table 1" in result.stdout and "Runs that did not complete" in result.stdout
    for name in ("table1", "table1_avg", "summary", "shrink_stops", "runs_not_completed"):
        for ext in ("md", "tex", "csv"):
            assert (out / "tables" / f"{name}.{ext}").stat().st_size > 0, (name, ext)
        check_latex((out / "tables" / f"{name}.tex").read_text())
    main = pd.read_csv(out / "tables" / "table1.csv")
    assert set(main["method"]) == {"lora", "stable_lora"}  # the method configs' names
    assert not main.duplicated(["model", "training", "label"]).any()  # one row per method
    for name in ("figure2_norms", "deltas", "delta_ratio", "shrink_stops", "loss", "eval"):
        png, pdf = out / "plots" / f"{name}.png", out / "plots" / f"{name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000, name
    assert (out / "report.md").exists() and (out / "tables" / "runs.csv").exists()
    # Best of seeds by the flag; the default output folder is report/ in the sweep.
    run_cli("-m", "analysis.report", str(sweep), "--seeds", "best", "--no-plots", **NO_WANDB_EXIT_0)
    best = pd.read_csv(sweep / "report" / "tables" / "table1.csv").set_index("label")
    assert best.loc["stable_lora", "bbc_news"] == 87.5


def test_report_imports_no_torch():
    code = (
        "import sys, analysis.report, analysis.plots; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]; "
        "assert not bad, bad"
    )
    run_cli("-c", code, fresh=True, **NO_WANDB_EXIT_0)


# ---------------------------------------------------------------------------- W&B
class FakeSummary(dict):
    @property
    def _json_dict(self):
        return dict(self)


def fake_wandb_run(**changes):
    """An object with the attributes of a ``wandb.apis.public.Run`` that the conversion uses,
    holding what the runner logs: the resolved config, a flat summary and the history."""
    config = {
        "model": {"name": "qwen2_0.5b"},
        "task": {"name": "hellaswag"},
        "method": {"name": "stable_lora"},
        "adapter": {"rank": 8, "target_modules": ["q_proj", "v_proj"]},
        "optim": {"lr": 1e-4},
        "seed": 1,
    }
    summary = FakeSummary(
        {
            "status": "completed",
            "steps": 20,
            "main_metric": "eval/acc_norm",
            "method": "stable_lora",
            "task": "hellaswag",
            "model": "qwen2_0.5b",
            "seed": 1,
            "train_time_s": 12.5,
            "final/eval/acc_norm": 0.41,
            "final/eval/acc": 0.38,
            "best/eval/acc_norm": 0.42,
            "best/step": 10,
            "_runtime": 99,
            "train/loss": 1.7,
        }
    )
    history = [
        {"_step": 0, "eval/acc_norm": 0.3, "_runtime": 1},
        {"_step": 10, "train/loss": 2.0, "lora/norm_A": 1.5},
        {"_step": 20, "train/loss": 1.7, "eval/acc_norm": 0.41},
    ]
    run = SimpleNamespace(
        id="abc123",
        name="method=stable_lora,seed=1",
        group="table1_qa",
        path=["me", "stablelora", "abc123"],
        state="finished",
        config=config,
        summary=summary,
        scan_history=lambda: iter(history),
    )
    for key, value in changes.items():
        setattr(run, key, value)
    return run


def test_wandb_run_converts_like_a_run_directory():
    row, metrics, shrink = wandb_run_records(fake_wandb_run())
    assert row["run_id"] == "wandb:me/stablelora/abc123" and row["sweep"] == "wandb:table1_qa"
    assert row["status"] == "completed" and row["score"] == 0.41
    assert row["final/eval/acc"] == 0.38 and row["best/step"] == 10
    assert row["adapter.target_modules"] == "q_proj,v_proj" and row["optim.lr"] == 1e-4
    assert row["train_time_s"] == 12.5 and shrink == []
    assert metrics == [
        {"step": 0, "eval/acc_norm": 0.3},
        {"step": 10, "train/loss": 2.0, "lora/norm_A": 1.5},
        {"step": 20, "train/loss": 1.7, "eval/acc_norm": 0.41},
    ]
    crashed = fake_wandb_run(state="crashed", summary=FakeSummary({"_step": 3}))
    row, _, _ = wandb_run_records(crashed)
    assert row["status"] == "failed" and row["method"] == "stable_lora"  # from the config


def test_a_wandb_summary_of_wrong_types_is_warned_about_and_shown_incomplete():
    damaged = FakeSummary({"status": "completed", "steps": 20, "final/eval/acc": "abc"})
    with pytest.warns(UserWarning, match=r"W&B run me/stablelora/abc123: its summary cannot be "
                      r"read \(final\['eval/acc'\] is 'abc', not a number\)"):  # fmt: skip
        row, _, _ = wandb_run_records(fake_wandb_run(summary=damaged))
    assert row["status"] == "incomplete" and math.isnan(row["score"])  # not "finished"


def test_collect_wandb_filters_by_group_and_tags():
    calls = []

    class FakeApi:
        def runs(self, path, filters=None):
            calls.append((path, filters))
            return [
                fake_wandb_run(),
                fake_wandb_run(
                    id="def456", path=["me", "p", "def456"], state="running", summary=FakeSummary()
                ),
            ]

    coll = collect_wandb("me/stablelora", group="table1_qa", tags=["paper"], api=FakeApi())
    assert calls == [("me/stablelora", {"group": "table1_qa", "tags": {"$in": ["paper"]}})]
    assert list(coll.runs["status"]) == ["completed", "incomplete"]
    assert set(coll.history["key"]) == {"eval/acc_norm", "train/loss", "lora/norm_A"}
    assert tables_of_collection(coll)["runs_not_completed"].display.loc[0, "status"] == (
        "incomplete"
    )


def tables_of_collection(coll) -> dict:
    return {t.name: t for t in build_tables(coll)}
