"""One entry point for every artefact of the paper: run its Hydra sweep, then its analysis.

An experiment ``<name>`` is one Hydra preset ``conf/experiment/<name>.yaml`` (what it compares,
the sweep declared under ``hydra.sweeper.params``) and a row of
:data:`experiments.catalog.EXPERIMENTS` (its tables and plots).
It runs at a scale (``conf/scale/``): ``paper`` (the paper's models, GPUs),
``cpu`` (SmolLM2-135M from a 4-bit GGUF on this kind of machine; results/cpu/) or ``smoke``
(the tiny random Llama, CI-sized). Where an experiment needs its own settings at a scale
(Table 1's offline tasks at CPU scale, two seeds in CI), they are in
``conf/experiment/<name>/<scale>.yaml``::

    python -m experiments <name> [--scale paper|cpu|smoke] [--output-root DIR]
                                 [--seeds mean|best] [--select-lr [--select-metric METRIC]]
                                 [--skip-sweep] [hydra overrides...]

runs ``python run.py -m experiment=<name> scale=<scale> output_root=DIR [overrides...]`` and
then ``python -m analysis.report DIR/sweeps/<sweep_name> --tables ... --plots ...``, both in
this process (:func:`call`; each is printed as the command that does the same alone, and Hydra's
launcher still decides where the jobs run): the tables
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
from a recorded file instead and runs the final stage alone. The picks are checked before any
run starts (:func:`read_picks`, :func:`picked_lrs`): a file that is not a selection report's
record, or holds picks for another model and task, is one line and exit code 2. At the
paper's scale (several models and tasks) the selection picks an lr per model, task and method,
and the final stage runs one command per model, task and method.

An experiment with ``parts`` (:attr:`Experiment.parts`: the lr range study's A0 axis) runs
their sweeps after its own, into the same sweep folder, and then the one report of the folder.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

from experiments.catalog import (
    EXPERIMENTS,
    OWN_COMMAND,
    RENAMED,
    ROOT,
    SCALES,
    Experiment,
    compose,
    split_values,
    sweep_name,
    sweep_params,
)

#: ``python -m <module>`` commands that :func:`call` runs in this process, by the module whose
#: ``main(argv)`` they run: a process of their own would spend seconds importing again what
#: this one has (the analysis: pandas and matplotlib; a selection stage: this module).
IN_PROCESS = {
    "analysis.report": "analysis.report",
    "analysis.width_fit": "analysis.width_fit",
    "experiments": "experiments.common",
}


def call(command: list[str], quiet: bool = False, own_process: bool = False) -> int:
    """Run ``command`` (``[python, run.py | -m module, *args]``) from the repository root and
    return its exit code, as :func:`subprocess.call` would, in this process: a sweep
    (``run.py -m ...``: Hydra's multirun, whose launcher decides where the jobs run) and the
    :data:`IN_PROCESS` modules; anything else in a process of its own. An uncaught error is its
    traceback and exit code 1, as in a process of its own. ``quiet``: no standard output;
    ``own_process``: in a process of its own whatever it is (per-process measures: peak memory)."""
    import contextlib
    import importlib
    import os
    import traceback

    if not own_process and command[1:2] == ["run.py"]:
        run = functools.partial(_run_script, ROOT / "run.py", command[2:])
    elif not own_process and command[1:2] == ["-m"] and command[2] in IN_PROCESS:
        run = functools.partial(importlib.import_module(IN_PROCESS[command[2]]).main, command[3:])
    else:
        return subprocess.call(command, cwd=ROOT, stdout=subprocess.DEVNULL if quiet else None)
    with contextlib.ExitStack() as stack:
        if quiet:
            stack.enter_context(contextlib.redirect_stdout(open(os.devnull, "w")))  # noqa: SIM115
        try:
            result = run()
        except SystemExit as stop:  # as the interpreter reports it
            if stop.code is None or isinstance(stop.code, int):
                return stop.code or 0
            print(stop.code, file=sys.stderr, flush=True)
            return 1
        except Exception:  # noqa: BLE001 - reported as the process would
            traceback.print_exc()
            return 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    return result if isinstance(result, int) else 0


def _run_script(script: Path, args: list[str]) -> None:
    """``python script *args`` in this process, from the repository root: ``run.py``, whose
    Hydra state is cleared after it, so that the next sweep composes anew."""
    import os
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    argv, cwd = sys.argv, os.getcwd()
    sys.argv = [str(script), *args]
    os.chdir(ROOT)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
        os.chdir(cwd)
        GlobalHydra.instance().clear()


#: A sweep's exit code past this: a stop signal ended it (128 + the signal's number).
STOPPED_BY_SIGNAL = 128


class UsageError(SystemExit):
    """A usage error of the command line (a bad option, override or picks file): :func:`main`
    prints it as one line and returns 2. A SystemExit, so that it stops any other caller too."""


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
        help=f"paper: the paper's models; cpu: SmolLM2-135M (4-bit GGUF) on a CPU; smoke: the tiny "
        f"random Llama, CI-sized (default: {experiment.scale})",
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
        help="the runs.csv column --select-lr ranks (the highest wins, the lowest for a loss; "
        "default: score, the final main metric)",
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


def sweep_values(name: str, scale: str, key: str, overrides: list[str]) -> list[str]:
    """The values ``key`` takes in the sweep: from an override ``key=a,b`` when given, else
    from the experiment's ``hydra.sweeper.params``."""
    for override in overrides:
        if override.startswith(f"{key}="):
            return split_values(override.split("=", 1)[1])
    params = sweep_params(name, scale)
    if key not in params:
        raise UsageError(f"python -m experiments: {name} does not sweep {key!r}.")
    return params[key]


PICKS_FILE = "tuned_lr.json"  # analysis.tables.tuned_lr.PICKS_FILE (no analysis import here)
#: analysis.tables.tuned_lr.PICKS_METRIC: what the picks were ranked on. A file that says
#: otherwise was not written by a selection report, so its lrs are not the final stage's.
PICKS_METRIC = (
    "score (final main metric), mean over the selection runs' seeds; the highest wins (the "
    "lowest for a loss-like metric)"
)
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


def pick_problem(pick) -> str | None:
    """What is wrong with one entry of a picks file's ``picks`` (None if nothing): the final
    stage trusts its model, task, method and lr."""
    if not isinstance(pick, dict):
        return f"is a JSON {type(pick).__name__}, not an object"
    for key in ("model", "task", "method"):
        if not isinstance(pick.get(key), str) or not pick[key]:
            return f"has no {key} (a name)" if key not in pick else f"has {key} {pick[key]!r}"
    lr = pick.get("lr")
    # bool is an int to Python, and JSON allows NaN: neither is a learning rate
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        return f"has lr {lr!r}, not a positive number"
    return None


def read_picks(path: Path, prog: str) -> list[dict]:
    """The picks of a ``tuned_lr.json`` (as :func:`analysis.tables.tuned_lr.picks_record`
    writes it); a :class:`UsageError` (one line, exit 2) when the file is missing, is not
    JSON, or is not such a record (no list of picks, picks ranked on another metric, a pick
    without a model, task, method or positive lr)."""
    if not path.is_file():
        raise UsageError(f"{prog}: no picked learning rates at {path}: run the selection stage "
                         "first, or give --lr-selection FILE")  # fmt: skip
    fix = "give the tuned_lr.json a selection report wrote, or rerun the selection stage"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"{prog}: {path} cannot be read ({reason}): {fix}") from None
    if not isinstance(record, dict) or not isinstance(record.get("picks"), list):
        raise UsageError(f"{prog}: {path} is not a picks file (no list of picks): {fix}")
    if record.get("metric") != PICKS_METRIC:
        raise UsageError(f"{prog}: {path} holds picks ranked on {record.get('metric')!r}, not "
                         f"the selection's final main metric: {fix}")  # fmt: skip
    for index, pick in enumerate(record["picks"]):
        problem = pick_problem(pick)
        if problem:
            raise UsageError(f"{prog}: {path}: pick {index} {problem}: {fix}")
    return list(record["picks"])


def picked_lrs(
    path: Path,
    methods: list[str],
    prog: str,
    model: str | None = None,
    task: str | None = None,
) -> dict[str, float]:
    """Each method's picked lr from a ``tuned_lr.json``; a :class:`UsageError` (one line,
    exit 2) when the file is not a picks record (:func:`read_picks`), holds no pick for the
    experiment's ``model`` and ``task`` (when given: picks made for another setting), or a
    method's pick is missing, or a method has different picks (several models or tasks: see
    :func:`picked_lrs_per_setting`)."""
    picks = read_picks(path, prog)
    if model is not None and task is not None:
        ours = [p for p in picks if (p["model"], p["task"]) == (model, task)]
        if picks and not ours:
            theirs = ", ".join(sorted({f"{p['model']} on {p['task']}" for p in picks}))
            raise UsageError(f"{prog}: {path} holds picks for {theirs}, not for this "
                             f"experiment's {model} on {task}: give the picks of a selection "
                             "run with the same model and task (its --scale)")  # fmt: skip
        picks = ours
    chosen: dict[str, float] = {}
    for method in methods:
        lrs = {float(p["lr"]) for p in picks if p["method"] == method}
        if len(lrs) != 1:
            found = "no pick" if not lrs else f"several picks {sorted(lrs)}"
            raise UsageError(f"{prog}: {path} has {found} for method {method}: rerun the "
                             "selection with this method (one model and task)")  # fmt: skip
        chosen[method] = lrs.pop()
    return chosen


def picked_lrs_per_setting(
    path: Path, methods: list[str], models: list[str], tasks: list[str], prog: str
) -> dict[tuple[str, str, str], float]:
    """{(model, task, method): picked lr} for every model, task and method of a final stage
    that sweeps several models or tasks (the paper's scale); a :class:`UsageError` (one line,
    exit 2) when the file is not a picks record or one lacks its pick."""
    picks = {(p["model"], p["task"], p["method"]): float(p["lr"]) for p in read_picks(path, prog)}
    chosen = {}
    for key in itertools.product(models, tasks, methods):
        if key not in picks:
            raise UsageError(f"{prog}: {path} has no pick for model {key[0]}, task {key[1]}, "
                             f"method {key[2]}: run the selection stage for it")  # fmt: skip
        chosen[key] = picks[key]
    return chosen


def setting_values(name: str, scale: str, key: str, overrides: list[str]) -> list[str] | None:
    """The values of ``key`` (model, task) when the sweep varies it, else None."""
    for override in overrides:
        if override.startswith(f"{key}="):
            return split_values(override.split("=", 1)[1])
    return sweep_params(name, scale).get(key)


def composed_name(name: str, scale: str, group: str) -> str:
    """The ``name`` of the experiment's ``group`` (model, task) at ``scale`` when its sweep
    does not vary it: the name its runs record, which the selection's picks name."""
    return str(compose(name, scale)[group].name)


def sweep_commands(
    experiment: Experiment, args: argparse.Namespace, sweep: list[str]
) -> list[list[str]]:
    """The sweep as one command, or one per value of ``experiment.process_per``, or one per
    method at its picked lr (``experiment.lr_from``)."""
    if experiment.lr_from:
        methods = sweep_values(experiment.name, args.scale, "method", args.overrides)
        prog = f"python -m experiments {experiment.name}"
        models = setting_values(experiment.name, args.scale, "model", args.overrides) or []
        tasks = setting_values(experiment.name, args.scale, "task", args.overrides) or []
        if len(models) > 1 or len(tasks) > 1:  # the paper's scale: a pick per model and task
            per = picked_lrs_per_setting(selection_file(experiment, args), methods, models,
                                         tasks, prog)  # fmt: skip
            base = [p for p in sweep if not p.startswith(("method=", "optim.lr=", "model=",
                                                          "task="))]  # fmt: skip
            return [
                [*base, f"model={m}", f"task={t}", f"method={k}", f"optim.lr={lr!r}"]
                for (m, t, k), lr in per.items()
            ]
        # One model and task: the picks must be theirs (not those of another scale's study).
        model = models[0] if models else composed_name(experiment.name, args.scale, "model")
        task = tasks[0] if tasks else composed_name(experiment.name, args.scale, "task")
        lrs = picked_lrs(selection_file(experiment, args), methods, prog, model, task)
        base = [p for p in sweep if not p.startswith(("method=", "optim.lr="))]
        return [[*base, f"method={m}", f"optim.lr={lrs[m]!r}"] for m in methods]
    key = experiment.process_per
    if key is None:
        return [sweep]
    values = sweep_values(experiment.name, args.scale, key, args.overrides)
    base = [part for part in sweep if not part.startswith(f"{key}=")]
    return [[*base, f"{key}={value}"] for value in values]


def all_sweep_commands(
    experiment: Experiment, args: argparse.Namespace, sweep: list[str]
) -> list[list[str]]:
    """The experiment's sweep commands, then those of its ``parts`` (their sweeps run into
    the same folder: one report shows them all)."""
    found = sweep_commands(experiment, args, sweep)
    for name in experiment.parts:
        part = EXPERIMENTS[name]
        if sweep_name(name, args.scale) != sweep_name(experiment.name, args.scale):
            raise UsageError(f"python -m experiments {experiment.name}: its part {name} sweeps "
                             "into another folder (give it the same experiment_name)")  # fmt: skip
        found += sweep_commands(part, args, commands(part, args)[0])
    return found


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
        selected = call(command)
        if selected > STOPPED_BY_SIGNAL:  # stopped: the final stage does not start either
            return selected
        if selected != 0:
            print(f"[experiments] the selection stage {experiment.lr_from} failed; no final "
                  "runs started.", file=sys.stderr)  # fmt: skip
            return 1
    if not args.skip_sweep:
        try:  # every command is built (the picks read and checked) before the first starts
            planned = all_sweep_commands(experiment, args, sweep)
        except UsageError as error:
            print(error, file=sys.stderr)
            return 2
        # a sweep per value of process_per: each in a process of its own (peak memory)
        own = any(EXPERIMENTS[n].process_per for n in (experiment.name, *experiment.parts))
        for command in planned:
            print("[experiments] " + " ".join(command), flush=True)
            code = call(command, own_process=own)
            if code > STOPPED_BY_SIGNAL:  # stopped: no next sweep, no report
                return code
            sweep_code |= code
    if not sweep_dir.exists():
        print(f"[experiments] no records in {sweep_dir}: the sweep did not start.", file=sys.stderr)
        return sweep_code or 1
    print("[experiments] " + " ".join(report), flush=True)
    report_code = call(report)
    print(f"[experiments] tables and plots: {sweep_dir / 'report'}")
    return sweep_code or report_code
