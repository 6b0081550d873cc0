"""What every experiment script does: run its Hydra sweep, then its analysis.

An experiment ``<name>`` is a Hydra preset ``conf/experiment/<name>.yaml`` (the paper's
settings, the sweep declared under ``hydra.sweeper.params``), a CI-sized variant
``conf/experiment/<name>_smoke.yaml`` and a script ``experiments/<name>.py`` that calls
:func:`main`::

    python experiments/<name>.py [--smoke] [--output-root DIR] [--seeds mean|best]
                                 [hydra overrides...]

which runs ``python run.py -m experiment=<name>[_smoke] output_root=DIR [overrides...]`` and
then ``python -m analysis.report DIR/sweeps/<experiment_name> --tables ... --plots ...``: the
tables and plots land in ``DIR/sweeps/<experiment_name>/report/``. Rerunning the same command
resumes the sweep (completed runs are not run again) and redoes the analysis.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "conf" / "experiment"


@dataclass(frozen=True)
class Experiment:
    """An artefact of the paper: its preset name and the tables and plots that show it."""

    name: str
    description: str
    tables: tuple[str, ...]
    plots: tuple[str, ...]


def preset_path(name: str) -> Path:
    return PRESETS / f"{name}.yaml"


def sweep_name(preset: str) -> str:
    """The preset's ``experiment_name`` (the folder of its sweep under ``sweeps/``)."""
    import yaml

    config = yaml.safe_load(preset_path(preset).read_text()) or {}
    return config.get("experiment_name", preset)


def parse_args(experiment: Experiment, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python experiments/{experiment.name}.py",
        description=experiment.description,
        epilog="Other arguments are Hydra overrides passed to run.py, e.g. trainer.max_steps=100 "
        "seed=0 'hydra/launcher=joblib'.",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"run experiment={experiment.name}_smoke (tiny model, CI-sized)",
    )
    parser.add_argument(
        "--output-root",
        type=Path,
        default=ROOT / "outputs",
        help="output_root of the sweep (default: outputs/)",
    )
    parser.add_argument(
        "--seeds",
        choices=("mean", "best"),
        default="mean",
        help="seed aggregation of the tables (the paper: best)",
    )
    parser.add_argument(
        "--select-lr",
        action="store_true",
        help="keep per method the lr with the best mean --select-metric in the tables; sweep "
        "the lr with an override, e.g. optim.lr=1e-4,2e-4,4e-4",
    )
    parser.add_argument(
        "--select-metric",
        default="score",
        help="the runs.csv column --select-lr maximises (default: score, the final main metric)",
    )
    parser.add_argument(
        "--skip-sweep", action="store_true", help="only redo the analysis of the existing records"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for run.py")
    # Options and overrides may come in any order.
    return parser.parse_intermixed_args(argv)


def commands(experiment: Experiment, args: argparse.Namespace) -> tuple[list[str], list[str], Path]:
    """The sweep command, the report command and the sweep directory."""
    preset = f"{experiment.name}_smoke" if args.smoke else experiment.name
    output_root = args.output_root.resolve()
    sweep_dir = output_root / "sweeps" / sweep_name(preset)
    sweep = [
        sys.executable,
        "run.py",
        "-m",
        f"experiment={preset}",
        f"output_root={output_root}",
        *args.overrides,
    ]
    report = [
        sys.executable,
        "-m",
        "analysis.report",
        str(sweep_dir),
        "--seeds",
        args.seeds,
        "--tables",
        *experiment.tables,
        "--plots",
        *experiment.plots,
    ]
    if getattr(args, "select_lr", False):
        report += ["--select-lr", "--select-metric", args.select_metric]
    return sweep, report, sweep_dir


def main(experiment: Experiment, argv=None) -> int:
    """Run the sweep (unless ``--skip-sweep``), then the report; return the exit code.

    A sweep whose jobs failed still gets its report (failed runs are shown as failed); the
    exit code is non-zero if either step failed.
    """
    args = parse_args(experiment, argv)
    sweep, report, sweep_dir = commands(experiment, args)
    sweep_code = 0
    if not args.skip_sweep:
        print("[experiments] " + " ".join(sweep), flush=True)
        sweep_code = subprocess.call(sweep, cwd=ROOT)
    if not sweep_dir.exists():
        print(f"[experiments] no records in {sweep_dir}: the sweep did not start.", file=sys.stderr)
        return sweep_code or 1
    print("[experiments] " + " ".join(report), flush=True)
    report_code = subprocess.call(report, cwd=ROOT)
    print(f"[experiments] tables and plots: {sweep_dir / 'report'}")
    return sweep_code or report_code
