"""Reproduce every artefact at one scale and rebuild its committed report.

    python -m experiments.reproduce --scale cpu                  # run, copy records, report
    python -m experiments.reproduce --scale cpu --only figure2
    python -m experiments.reproduce --scale cpu --report-only    # reports from results/ only
    python -m experiments.reproduce --scale cpu data_root=/data  # Hydra overrides for run.py
    python -m experiments.reproduce --scale cpu --only table1 seed=1  # one sitting

For each experiment of :data:`experiments.common.EXPERIMENTS` with a configuration at the
scale (:func:`experiments.common.experiments_at`; and the toy ``width_sweep``, which runs at
the same scale everywhere) it

1. runs its sweep and report (``python -m experiments <name> --scale cpu``; sweeps resume, so the
   set can be completed over several sittings);
2. copies the compact records of every run (``config.yaml``, ``summary.json``,
   ``metrics.jsonl``, ``layers.parquet``, ``examples.parquet``; never adapters, checkpoints
   or W&B folders) to
   ``results/<scale>/<sweep>/runs/<run folder>/``, next to the committed runs this sitting
   did not run (so seeds run on different days and machines add up; ``--prune`` drops
   committed runs the outputs do not hold);
3. rebuilds the report from those committed records into
   ``results/<scale>/<sweep>/report/`` (the same tables and plots as the sweep's report).

The width sweep keeps one ``records.jsonl`` (its runs' feature magnitudes, the input of
:mod:`analysis.width_fit`) instead of run folders, and gets no Hydra overrides (its preset
is self-contained). ``--report-only`` does step 3 alone: ``tests/test_results.py`` uses it
to check that the committed reports are what the committed records give.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from experiments.catalog import EXPERIMENTS, ROOT, experiments_at, plan_options, sweep_name
from experiments.common import PICKS_FILE, call

#: The files of a run folder that are results (small); everything else stays behind.
RECORD_FILES = (
    "config.yaml",
    "summary.json",
    "metrics.jsonl",
    "layers.parquet",
    "examples.parquet",
    "contamination.json",
)
SCALES = ("cpu",)


#: The toy width sweep (python -m experiments width_sweep): the same at every scale.
WIDTH_SWEEP = "width_sweep"


def experiments_of(scale: str, only: list[str] | None) -> list[str]:
    names = [*experiments_at(scale), WIDTH_SWEEP]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise SystemExit(
                f"python -m experiments.reproduce: unknown {scale} experiment(s) {unknown}; "
                f"choose from {names}."
            )
        names = [name for name in names if name in only]
    # A part of another experiment (lr_range_a0) runs with it, into its folder: once.
    return [name for name in names if name == WIDTH_SWEEP or EXPERIMENTS[name].part_of not in names]


def copy_records(sweep_dir: Path, results_dir: Path, prune: bool = False) -> tuple[int, int]:
    """Copy the record files of every run under ``sweep_dir`` to ``results_dir/runs``
    (replacing the committed copy of that run); return (runs copied, committed runs kept).

    Committed runs that ``sweep_dir`` does not hold are kept: a sweep finished in several
    sittings, on machines that do not share ``outputs/``, adds to the committed records (e.g.
    ``seed=1`` today, ``seed=2`` tomorrow). ``prune=True`` removes them instead, for when
    the sweep's outputs are complete and a run folder was renamed or dropped from the preset.
    """
    target_root = results_dir / "runs"
    fresh = {summary.parent for summary in sweep_dir.rglob("summary.json")}
    names = {run_dir.relative_to(sweep_dir) for run_dir in fresh}
    kept = 0
    if target_root.exists():
        for summary in sorted(target_root.rglob("summary.json")):
            committed = summary.parent
            if committed.relative_to(target_root) in names or prune:
                shutil.rmtree(committed)
            else:
                kept += 1
    for run_dir in sorted(fresh):
        target = target_root / run_dir.relative_to(sweep_dir)
        target.mkdir(parents=True, exist_ok=True)
        for name in RECORD_FILES:
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, target / name)
    return len(fresh), kept


def copy_width_records(sweep_dir: Path, results_dir: Path) -> int:
    """The sweep's ``records.jsonl`` without machine paths; return its number of runs."""
    results_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in (sweep_dir / "records.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("run_dir", None)
        lines.append(json.dumps(record) + "\n")
    (results_dir / "records.jsonl").write_text("".join(lines))
    return len(lines)


def in_repository(path: Path) -> Path:
    """``path`` relative to the repository when inside it, so that what a report records (its
    run ids) does not depend on where the clone lives: committed reports are compared byte
    for byte."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def width_report_command(results_dir: Path, out: Path) -> list[str]:
    records = in_repository(results_dir / "records.jsonl")
    return [sys.executable, "-m", "analysis.width_fit", str(records), "--out", str(out)]


def report_command(name: str, scale: str, results_dir: Path, out: Path) -> list[str]:
    tables, plots = EXPERIMENTS[name].report(scale)
    runs_arg = in_repository(results_dir / "runs")
    return [
        sys.executable,
        "-m",
        "analysis.report",
        str(runs_arg),
        "--out",
        str(out),
        "--tables",
        *tables,
        "--plots",
        *plots,
        # the plan of runs recorded before their config.yaml held one; runs that hold one
        # must agree with it (analysis.tables.equivalence.read_plan)
        "--plan",
        *plan_options(name, scale),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.reproduce", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--scale", choices=SCALES, required=True)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="e.g. figure2")
    parser.add_argument("--output-root", type=Path, default=ROOT / "outputs")
    parser.add_argument("--results", type=Path, default=None, help="default: results/<scale>")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the reports from the committed records only",
    )
    parser.add_argument(
        "--report-out",
        type=Path,
        default=None,
        help="write the rebuilt reports under this folder instead",
    )
    parser.add_argument(
        "--prune",
        action="store_true",
        help="drop committed runs that the sweep's outputs do not hold (default: keep them, "
        "so that sittings on different machines add up)",
    )
    args, overrides = parser.parse_known_args(argv)
    results = (args.results or ROOT / "results" / args.scale).resolve()
    code = 0
    for name in experiments_of(args.scale, args.only):
        if name == WIDTH_SWEEP:
            code |= width_sweep(args, results / WIDTH_SWEEP)
            continue
        sweep = sweep_name(name, args.scale)
        results_dir = results / sweep
        if not args.report_only:
            command = [
                sys.executable,
                "-m",
                "experiments",
                name,
                "--scale",
                args.scale,
                "--output-root",
                str(args.output_root),
                *selection_args(name, args.scale, results),
                *overrides,
            ]
            print("[reproduce] " + " ".join(command), flush=True)
            code |= call(command)
            copied, kept = copy_records(
                args.output_root / "sweeps" / sweep, results_dir, prune=args.prune
            )
            print(
                f"[reproduce] {name}: records of {copied} runs copied to {results_dir / 'runs'}"
                + (
                    f"; {kept} committed runs not in this sweep's outputs kept (--prune drops them)"
                    if kept
                    else ""
                )
            )
        if not (results_dir / "runs").exists():
            print(f"[reproduce] {name}: no committed records in {results_dir}; skipped.")
            continue
        out = (args.report_out / sweep) if args.report_out else results_dir / "report"
        command = report_command(name, args.scale, results_dir, out)
        print("[reproduce] " + " ".join(command), flush=True)
        code |= call(command)
    return code


def selection_args(name: str, scale: str, results: Path) -> list[str]:
    """For the final stage of a tuned study: the committed picks of its selection stage
    (rebuilt from the committed records just before), so that a sitting on another machine
    never redoes the selection."""
    selection = EXPERIMENTS[name].lr_from
    if selection is None:
        return []
    picks = results / sweep_name(selection, scale) / "report" / PICKS_FILE
    return ["--lr-selection", str(picks)]


def width_sweep(args: argparse.Namespace, results_dir: Path) -> int:
    """Run the toy width sweep (unless ``--report-only``), keep its records and fit them."""
    code = 0
    if not args.report_only:
        command = [sys.executable, "-m", "experiments", WIDTH_SWEEP, "--output-root",
                   str(args.output_root)]  # fmt: skip
        print("[reproduce] " + " ".join(command), flush=True)
        code = call(command)
        runs = copy_width_records(args.output_root / "sweeps" / WIDTH_SWEEP, results_dir)
        print(f"[reproduce] {WIDTH_SWEEP}: records of {runs} runs in {results_dir}")
    if not (results_dir / "records.jsonl").exists():
        print(f"[reproduce] {WIDTH_SWEEP}: no committed records in {results_dir}; skipped.")
        return code
    out = (args.report_out / WIDTH_SWEEP) if args.report_out else results_dir / "report"
    command = width_report_command(results_dir, out)
    print("[reproduce] " + " ".join(command), flush=True)
    # The fit prints its tables; the report's files are what is kept.
    return code | call(command, quiet=True)


if __name__ == "__main__":
    sys.exit(main())
