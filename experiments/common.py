"""One entry point for every artefact of the paper: run its Hydra sweep, then its analysis.

An experiment ``<name>`` is one Hydra preset ``conf/experiment/<name>.yaml`` (what it compares,
the sweep declared under ``hydra.sweeper.params``) and a row of :data:`EXPERIMENTS` (its tables
and plots). It runs at a scale (``conf/scale/``): ``paper`` (the paper's models, GPUs),
``cpu`` (SmolLM2-135M on this kind of machine; results/cpu/) or ``smoke`` (the tiny random
Llama, CI-sized). Where an experiment needs its own settings at a scale (Table 1's offline
tasks at CPU scale, two seeds in CI), they are in ``conf/experiment/<name>/<scale>.yaml``::

    python -m experiments <name> [--scale paper|cpu|smoke] [--output-root DIR]
                                 [--seeds mean|best] [--select-lr [--select-metric METRIC]]
                                 [--skip-sweep] [hydra overrides...]

runs ``python run.py -m experiment=<name> scale=<scale> output_root=DIR [overrides...]`` and
then ``python -m analysis.report DIR/sweeps/<sweep_name> --tables ... --plots ...``: the tables
and plots land in ``DIR/sweeps/<sweep_name>/report/`` (``<name>`` at the paper's scale,
``cpu_<name>`` at CPU scale, ``<name>_smoke`` in CI). The default scale is the experiment's
own (:attr:`Experiment.scale`). Rerunning the same command resumes the sweep (completed runs
are not run again) and redoes the analysis. ``python -m experiments width_sweep`` is the toy
width sweep (:mod:`experiments.width_sweep`, its own options).

A tuned study has two stages: a selection experiment sweeps a shared lr grid per method on the
validation split, and its report writes the picks (``report/tuned_lr.json``,
:mod:`analysis.tables.tuned_lr`); the final experiment (``Experiment.lr_from`` names the
selection) runs each method at its pick, one ``run.py -m ... method=<m> optim.lr=<pick>``
per method. ``python -m experiments <final>`` runs the selection stage first (it resumes: a
completed selection costs nothing) and reads its picks; ``--lr-selection FILE`` takes the picks
from a recorded file instead and runs the final stage alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "conf" / "experiment"
SCALES = ("paper", "cpu", "smoke")
#: Names the experiments had before the scale became a choice of its own.
RENAMED = {
    "table1_qa": "table1",
    "figure2_norms": "figure2",
    **{
        f"cpu/{n}": n
        for n in (
            "table1",
            "ablations",
            "overhead",
            "figure2",
            "main",
            "dialogue",
            "figure2_compressed",
            "tuned_select",
            "tuned_final",
        )
    },  # fmt: skip
}

Report = tuple[tuple[str, ...], tuple[str, ...]]


@dataclass(frozen=True)
class Experiment:
    """An artefact of the paper: its preset name and the tables and plots that show it."""

    name: str
    description: str
    tables: tuple[str, ...]
    plots: tuple[str, ...]
    #: The scale it runs at unless told otherwise: ``paper``, or ``cpu`` for the experiments
    #: built for this machine (they include ``/scale/cpu`` in their preset).
    scale: str = "paper"
    #: (tables, plots) at a scale whose report differs from ``tables``/``plots``. The smoke
    #: scale draws every table and plot of every scale, so CI exercises them all.
    reports: dict[str, Report] = field(default_factory=dict)
    #: A sweep parameter whose values each run in a process of their own, one after the
    #: other (one ``run.py -m ... <key>=<value>`` per value): for per-process measures such as
    #: the peak memory (max RSS) of the overhead table.
    process_per: str | None = None
    #: The selection experiment whose ``tuned_lr.json`` sets each method's ``optim.lr``
    #: (one sweep command per method); see the module docstring.
    lr_from: str | None = None

    def report(self, scale: str) -> Report:
        """The tables and plots of its report at ``scale``."""
        if scale != "smoke":
            return self.reports.get(scale, (self.tables, self.plots))
        every = [(self.tables, self.plots), *self.reports.values()]
        return tuple(dict.fromkeys(t for r in every for t in r[0])), tuple(
            dict.fromkeys(p for r in every for p in r[1])
        )


#: Every artefact: its tables and plots (``analysis.report`` names), in the README's order.
EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "table1",
            "Table 1: QA accuracy per task and on average, beside the published numbers; at "
            "CPU scale five methods x 3 seeds on ARC-Easy, OpenBookQA and BBC News, with the "
            "paired Stable-LoRA - LoRA difference.",
            ("table1", "table1_avg", "summary", "runs_not_completed"),
            ("loss", "eval"),
            reports={
                "cpu": (
                    (
                        "table1",
                        "table1_best",
                        "table1_avg",
                        "paired_difference",
                        "summary",
                        "runs_not_completed",
                    ),
                    ("loss",),
                )
            },
        ),
        Experiment(
            "gsm8k",
            "GSM8K accuracy by step budget, AdamW against Stable-LoRA.",
            ("gsm8k", "summary", "runs_not_completed"),
            ("eval", "loss"),
        ),
        Experiment(
            "ablation_stop_rule",
            "Stop-rule ablation of Stable-LoRA on merged QA.",
            ("ablation_stop_rule", "shrink_stops", "summary", "runs_not_completed"),
            ("figure2_norms", "shrink_stops", "eval"),
        ),
        Experiment(
            "ablation_target_modules",
            "Target-module ablation on Llama-3.2-3B, merged QA.",
            ("ablation_target_modules", "summary", "runs_not_completed"),
            ("loss", "eval"),
        ),
        Experiment(
            "overhead",
            "Time and memory overhead relative to LoRA, one process per method.",
            ("overhead", "summary", "runs_not_completed"),
            ("loss",),
            process_per="method",
        ),
        Experiment(
            "figure2",
            "Figure 2: LoRA factor norms against step, with the feature-update magnitudes.",
            ("shrink_stops", "summary", "runs_not_completed"),
            ("figure2_norms", "deltas", "delta_ratio", "shrink_stops"),
            reports={
                "cpu": (
                    ("shrink_stops", "shrink_stops_by_layer", "summary", "runs_not_completed"),
                    ("figure2_norms", "deltas", "delta_ratio", "shrink_stops", "eval"),
                )
            },
        ),
        Experiment(
            "init_scale",
            "The scale of A0: accuracy and self-stability, AdamW against Stable-LoRA.",
            ("init_scale", "init_scale_stability", "summary", "runs_not_completed"),
            ("init_scale", "figure2_norms", "delta_ratio"),
        ),
        Experiment(
            "reviewer_controls",
            "Reviewer controls beside LoRA and Stable-LoRA.",
            ("reviewer_controls", "shrink_stops", "summary", "runs_not_completed"),
            ("figure2_norms", "delta_ratio", "shrink_stops"),
        ),
        # Built for CPU scale: SmolLM2-135M (shipped offline) on this machine's budget.
        Experiment(
            "ablations",
            "Ablations at CPU scale on the compressed schedule: stop rule, scale of A0 and the "
            "reviewers' controls.",
            (
                "ablation_stop_rule",
                "init_scale",
                "init_scale_stability",
                "reviewer_controls",
                "shrink_stops",
                "shrink_stops_by_layer",
                "summary",
                "runs_not_completed",
            ),
            ("figure2_norms", "delta_ratio", "shrink_stops", "init_scale"),
            scale="cpu",
        ),
        Experiment(
            "figure2_compressed",
            "Figure 2 at CPU scale on a schedule under which the stop rule fires (lr 1e-3, "
            "lambda 5e-3).",
            ("shrink_stops", "shrink_stops_by_layer", "summary", "runs_not_completed"),
            ("figure2_norms", "deltas", "delta_ratio", "shrink_stops", "eval"),
            scale="cpu",
        ),
        Experiment(
            "tuned_select",
            "Tuned study, stage 1: each method trained at every lr of a shared log-spaced "
            "grid on ARC-Easy, ARC-Challenge and BBC News, scored on held-out validation; "
            "the lr picked per method (tuned_lr.json).",
            ("tuned_lr", "summary", "runs_not_completed"),
            ("loss",),
            scale="cpu",
        ),
        Experiment(
            "tuned_final",
            "Tuned study, stage 2: each method at its picked lr x 3 seeds, scored on the full "
            "test splits, with example-level paired tests against LoRA.",
            (
                "table1",
                "paired_difference",
                "paired_examples",
                "paired_bootstrap",
                "shrink_stops",
                "shrink_stops_by_layer",
                "summary",
                "runs_not_completed",
            ),
            ("loss", "delta_ratio"),
            scale="cpu",
            lr_from="tuned_select",
        ),
        Experiment(
            "main",
            "The main job (bash scripts/setup.sh run): LoRA and Stable-LoRA side by side on "
            "BBC News at lr 1e-3, lambda 5e-3, 100 steps, where the stop rule fires.",
            ("side_by_side", "runs_not_completed"),
            ("figure2_norms",),
            scale="cpu",
        ),
        Experiment(
            "dialogue",
            "Dialogue generalisation at CPU scale: LoRA against Stable-LoRA x 3 seeds on the "
            "chatterbot corpus, held-out reply loss, perplexity and ROUGE-L.",
            ("dialogue", "summary", "runs_not_completed"),
            ("loss", "eval"),
            scale="cpu",
        ),
    )
}


def experiments_at(scale: str) -> list[str]:
    """The experiments that have a configuration at ``scale``: every one at the paper's and
    the smoke scale; at CPU scale those built for it and those with a
    ``conf/experiment/<name>/cpu.yaml``."""
    return [
        e.name
        for e in EXPERIMENTS.values()
        if scale in (e.scale, "smoke", "paper") or (PRESETS / e.name / f"{scale}.yaml").exists()
    ]


#: Experiments with their own command line (not a sweep + report pair).
OWN_COMMAND = ("width_sweep",)


def compose(name: str, scale: str, overrides: tuple[str, ...] = ()):
    """The experiment's configuration at ``scale`` as ``run.py -m`` composes it (with the
    Hydra node, so that its sweep is there)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from stablelora.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return hydra_compose(
            "config",
            overrides=[f"experiment={name}", f"scale={scale}", *overrides],
            return_hydra_config=True,
        )


@functools.cache
def sweep_name(name: str, scale: str) -> str:
    """The folder of the experiment's sweep under ``sweeps/`` at ``scale``: its resolved
    ``sweep_name`` (``table1``, ``cpu_table1``, ``table1_smoke``)."""
    return str(compose(name, scale).sweep_name)


def parse_args(experiment: Experiment, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments {experiment.name}",
        description=experiment.description,
        epilog="Other arguments are Hydra overrides passed to run.py, e.g. trainer.max_steps=100 "
        "seed=0 'hydra/launcher=joblib'.",
    )
    parser.add_argument(
        "--scale",
        choices=SCALES,
        default=experiment.scale,
        help=f"paper: the paper's models; cpu: SmolLM2-135M on a CPU; smoke: the tiny random "
        f"Llama, CI-sized (default: {experiment.scale})",
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
    if experiment.lr_from:
        parser.add_argument(
            "--lr-selection",
            type=Path,
            default=None,
            help=f"the picked learning rates ({PICKS_FILE} of a {experiment.lr_from} report); "
            f"default: run {experiment.lr_from} first (it resumes) and read its report's",
        )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for run.py")
    # Options and overrides may come in any order.
    return parser.parse_intermixed_args(argv)


def commands(experiment: Experiment, args: argparse.Namespace) -> tuple[list[str], list[str], Path]:
    """The sweep command, the report command and the sweep directory."""
    output_root = args.output_root.resolve()
    sweep_dir = output_root / "sweeps" / sweep_name(experiment.name, args.scale)
    sweep = [
        sys.executable,
        "run.py",
        "-m",
        f"experiment={experiment.name}",
        f"scale={args.scale}",
        f"output_root={output_root}",
        *args.overrides,
    ]
    tables, plots = experiment.report(args.scale)
    report = [
        sys.executable,
        "-m",
        "analysis.report",
        str(sweep_dir),
        "--seeds",
        args.seeds,
        "--tables",
        *tables,
        "--plots",
        *plots,
    ]
    if getattr(args, "select_lr", False):
        report += ["--select-lr", "--select-metric", args.select_metric]
    return sweep, report, sweep_dir


def split_values(text: str) -> list[str]:
    """Hydra's choice sweep ``a,b,[c,d]`` -> ``["a", "b", "[c,d]"]`` (commas inside brackets
    belong to a list value; blanks around values, e.g. from a folded YAML string, stripped)."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    return [*values, current.strip()]


def sweep_params(name: str, scale: str) -> dict[str, list[str]]:
    """The experiment's ``hydra.sweeper.params`` at ``scale`` as {key: [values]}, composed with
    Hydra (so those its scale adds count)."""
    params = compose(name, scale).hydra.sweeper.params or {}
    return {str(key): split_values(str(value)) for key, value in params.items()}


def sweep_values(name: str, scale: str, key: str, overrides: list[str]) -> list[str]:
    """The values ``key`` takes in the sweep: from an override ``key=a,b`` when given, else
    from the experiment's ``hydra.sweeper.params``."""
    for override in overrides:
        if override.startswith(f"{key}="):
            return split_values(override.split("=", 1)[1])
    params = sweep_params(name, scale)
    if key not in params:
        raise SystemExit(f"python -m experiments: {name} does not sweep {key!r}.")
    return params[key]


PICKS_FILE = "tuned_lr.json"  # analysis.tables.tuned_lr.PICKS_FILE (no analysis import here)
#: Keys the final stage of a tuned study sets itself: not passed on to its selection stage.
FINAL_ONLY_KEYS = ("seed", "method", "optim.lr")


def selection_file(experiment: Experiment, args: argparse.Namespace) -> Path:
    """Where the final stage reads the picked learning rates."""
    if getattr(args, "lr_selection", None) is not None:
        return Path(args.lr_selection)
    assert experiment.lr_from is not None
    sweep = sweep_name(experiment.lr_from, args.scale)
    return args.output_root.resolve() / "sweeps" / sweep / "report" / PICKS_FILE


def selection_command(experiment: Experiment, args: argparse.Namespace) -> list[str]:
    """The selection stage, with the command line's overrides (the horizon, data_root...)
    except those the final stage sets itself (:data:`FINAL_ONLY_KEYS`)."""
    assert experiment.lr_from is not None
    overrides = [o for o in args.overrides if o.split("=", 1)[0] not in FINAL_ONLY_KEYS]
    return [
        sys.executable,
        "-m",
        "experiments",
        experiment.lr_from,
        "--scale",
        args.scale,
        "--output-root",
        str(args.output_root.resolve()),
        *overrides,
    ]


def picked_lrs(path: Path, methods: list[str], prog: str) -> dict[str, float]:
    """Each method's picked lr from a ``tuned_lr.json``; one line (exit 2) when the file or
    a method's pick is missing, or a method has different picks (several models or tasks)."""
    if not path.is_file():
        raise SystemExit(f"{prog}: no picked learning rates at {path}: run the selection stage "
                         "first, or give --lr-selection FILE")  # fmt: skip
    picks = json.loads(path.read_text())["picks"]
    chosen: dict[str, float] = {}
    for method in methods:
        lrs = {float(p["lr"]) for p in picks if p["method"] == method}
        if len(lrs) != 1:
            found = "no pick" if not lrs else f"several picks {sorted(lrs)}"
            raise SystemExit(f"{prog}: {path} has {found} for method {method}: rerun the "
                             "selection with this method (one model and task)")  # fmt: skip
        chosen[method] = lrs.pop()
    return chosen


def sweep_commands(
    experiment: Experiment, args: argparse.Namespace, sweep: list[str]
) -> list[list[str]]:
    """The sweep as one command, or one per value of ``experiment.process_per``, or one per
    method at its picked lr (``experiment.lr_from``)."""
    if experiment.lr_from:
        methods = sweep_values(experiment.name, args.scale, "method", args.overrides)
        lrs = picked_lrs(selection_file(experiment, args), methods, f"python -m experiments "
                         f"{experiment.name}")  # fmt: skip
        base = [p for p in sweep if not p.startswith(("method=", "optim.lr="))]
        return [[*base, f"method={m}", f"optim.lr={lrs[m]!r}"] for m in methods]
    key = experiment.process_per
    if key is None:
        return [sweep]
    values = sweep_values(experiment.name, args.scale, key, args.overrides)
    base = [part for part in sweep if not part.startswith(f"{key}=")]
    return [[*base, f"{key}={value}"] for value in values]


def usage() -> str:
    rows = [f"  {e.name:<24} {e.description}" for e in EXPERIMENTS.values()]
    rows.append(f"  {'width_sweep':<24} Width exponents of the feature updates (toy network).")
    return (
        "usage: python -m experiments NAME [--scale paper|cpu|smoke] [--output-root DIR]\n"
        "                              [--seeds mean|best]\n"
        "                              [--select-lr [--select-metric METRIC]] [--skip-sweep]\n"
        "                              [hydra overrides...]\n\nexperiments:\n" + "\n".join(rows)
    )


def main(argv=None) -> int:
    """``python -m experiments NAME ...``: run the sweep (unless ``--skip-sweep``), then the
    report; return the exit code.

    A sweep whose jobs failed still gets its report (failed runs are shown as failed); the
    exit code is non-zero if either step failed.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name in OWN_COMMAND:
        from experiments import width_sweep

        width_sweep.main(rest)
        return 0
    if name in RENAMED:
        scale = " --scale cpu" if name.startswith("cpu/") else ""
        print(f"python -m experiments: {name} is now {RENAMED[name]}{scale}.", file=sys.stderr)
        return 2
    if name not in EXPERIMENTS:
        choices = ", ".join([*EXPERIMENTS, *OWN_COMMAND])
        print(f"python -m experiments: unknown experiment {name!r}; choose from {choices}.",
              file=sys.stderr)  # fmt: skip
        return 2
    experiment = EXPERIMENTS[name]
    args = parse_args(experiment, rest)
    sweep, report, sweep_dir = commands(experiment, args)
    sweep_code = 0
    if not args.skip_sweep and experiment.lr_from and args.lr_selection is None:
        command = selection_command(experiment, args)
        print("[experiments] selection stage: " + " ".join(command), flush=True)
        if subprocess.call(command, cwd=ROOT) != 0:
            print(f"[experiments] the selection stage {experiment.lr_from} failed; no final "
                  "runs started.", file=sys.stderr)  # fmt: skip
            return 1
    if not args.skip_sweep:
        for command in sweep_commands(experiment, args, sweep):
            print("[experiments] " + " ".join(command), flush=True)
            sweep_code |= subprocess.call(command, cwd=ROOT)
    if not sweep_dir.exists():
        print(f"[experiments] no records in {sweep_dir}: the sweep did not start.", file=sys.stderr)
        return sweep_code or 1
    print("[experiments] " + " ".join(report), flush=True)
    report_code = subprocess.call(report, cwd=ROOT)
    print(f"[experiments] tables and plots: {sweep_dir / 'report'}")
    return sweep_code or report_code
