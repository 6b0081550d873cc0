"""Tables and plots of one or more sweeps, in one command.

    python -m analysis.report SWEEP_DIR [SWEEP_DIR ...] [--out DIR] [--seeds mean|best]

collects every run under the directories (failed, diverged and unfinished runs included;
symlinked run folders followed, each folder once; jobs that never started and what else was
left out listed in ``report.md``), prints the Markdown of every table the records support,
and writes under ``--out`` (default: ``report/`` in the first directory):

- ``tables/<name>.md``, ``.tex`` (booktabs) and ``.csv`` for each table
  (:mod:`analysis.tables`), ``runs.csv`` (one row per run) and ``report.md`` (all tables);
- ``plots/<name>.png`` and ``.pdf`` for each plot (:mod:`analysis.plots`);
- the width exponents (gamma against width, :mod:`analysis.width_fit`) when the runs vary in
  model width, or when a directory holds a width sweep's ``records.jsonl``.

Other options: ``--plan KEY=VALUE ...`` gives the analysis plan (the keys of
``analysis.primary`` in ``conf/config.yaml``) of runs whose ``config.yaml`` declares none
(:mod:`analysis.tables.equivalence`), ``--tables``/``--plots`` choose which to build,
``--select-lr`` keeps per method the learning rate with the best mean ``--select-metric``
(default: the final main metric) on the tasks every candidate lr was run on,
``--wandb ENTITY/PROJECT`` (with ``--wandb-group``/``--wandb-tag``) adds the runs synced to
W&B. Imports stay light: no torch or transformers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pandas as pd

from analysis import plots as plots_module
from analysis import tables as tables_module
from analysis import width_fit
from analysis.collect import (
    TASK_FIELDS,
    Collection,
    collect,
    collect_wandb,
    concat,
    format_value,
    label_runs,
)
from analysis.tables import Table
from analysis.tables.equivalence import PlanError, parse_plan_options
from analysis.tables.formatting import write_csv

#: The table of failed, diverged and unfinished runs: always over every run collected.
FAILURES = "runs_not_completed"
#: Config keys holding the model width: the toy width model's, a config-built model's.
WIDTH_COLUMNS = ("model.width", "model.config.hidden_size")


def _listing(title: str, builders: dict) -> str:
    """``--help``'s list of the registered tables or plots, each with the first sentence of
    its builder's docstring."""
    lines = [f"{title}:"]
    for name, build in builders.items():
        first = " ".join((build.__doc__ or "").split()).split(". ")[0].rstrip(".")
        text = textwrap.wrap(first, 80 - 28)
        lines += [f"  {name:<25} {text[0] if text else ''}", *(" " * 28 + t for t in text[1:])]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.report",
        description=__doc__.split("\n\n")[0],
        epilog=_listing("tables", tables_module.TABLES)
        + "\n\n"
        + _listing("plots", plots_module.PLOTS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "sweep_dirs",
        nargs="*",
        type=Path,
        metavar="SWEEP_DIR",
        help="sweep (or run) directories, searched recursively for runs",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: report/ in the first SWEEP_DIR)",
    )
    parser.add_argument(
        "--seeds",
        choices=tables_module.SEED_MODES,
        default="mean",
        help="aggregate seeds as mean ± std (default) or best of seeds",
    )
    parser.add_argument(
        "--tables",
        nargs="+",
        choices=list(tables_module.TABLES),
        default=None,
        help="tables to build (default: all supported)",
    )
    parser.add_argument(
        "--plots",
        nargs="+",
        choices=list(plots_module.PLOTS),
        default=None,
        help="plots to draw (default: all supported)",
    )
    parser.add_argument(
        "--plan",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="the analysis plan (analysis.primary keys: margin_pp=1.0 average=tasks ...) of "
        "runs whose config.yaml declares none; it must agree with a plan the runs declare",
    )
    parser.add_argument("--no-plots", action="store_true", help="write tables only")
    parser.add_argument(
        "--select-lr",
        action="store_true",
        help="keep per (model, method) the optim.lr with the best mean --select-metric",
    )
    parser.add_argument(
        "--select-metric",
        default="score",
        metavar="METRIC",
        help="a runs.csv column for --select-lr (default: score, the final main metric)",
    )
    parser.add_argument(
        "--wandb",
        default=None,
        metavar="ENTITY/PROJECT",
        help="also collect the runs synced to this W&B project",
    )
    parser.add_argument("--wandb-group", default=None, help="W&B group (the sweep name)")
    parser.add_argument("--wandb-tag", nargs="+", default=(), help="W&B tags (any of them)")
    args = parser.parse_args(argv)
    try:
        args.plan_options = parse_plan_options(args.plan)
    except PlanError as err:
        parser.error(str(err))
    if not args.sweep_dirs and not args.wandb:
        parser.error("give at least one SWEEP_DIR (or --wandb ENTITY/PROJECT).")
    if args.out is None:
        if not args.sweep_dirs:
            parser.error("--out is required when collecting from W&B only.")
        args.out = args.sweep_dirs[0] / "report"
    return args


def gather(args: argparse.Namespace) -> Collection:
    """The runs of the sweep directories and of W&B, as one collection."""
    collections = []
    if args.sweep_dirs:
        collections.append(collect(args.sweep_dirs))
    if args.wandb:
        collections.append(collect_wandb(args.wandb, group=args.wandb_group, tags=args.wandb_tag))
    return collections[0] if len(collections) == 1 else concat(collections)


# ---------------------------------------------------------------------------- width
def width_column(runs: pd.DataFrame) -> str | None:
    """The config key that holds the model width, if the runs differ in it."""
    for column in WIDTH_COLUMNS:
        if column in runs and runs[column].nunique() >= 2:
            return column
    return None


def width_records(coll: Collection) -> pd.DataFrame:
    """The probe's mean-over-layers magnitudes of runs that differ in model width, in
    :func:`analysis.width_fit.load_records`' long format: method = the run's label without
    the width, lr_mode = ``fixed``/``scaled`` for runs with ``lr_width_exponent`` (the width
    sweep's lr rule), else the run's learning rate."""
    runs = coll.runs
    column = width_column(runs)
    if column is None or coll.history.empty:
        return pd.DataFrame()
    runs = runs[runs[column].notna()].copy()
    label_runs(runs, exclude=[column, "optim.lr", "lr_width_exponent"])
    if "lr_width_exponent" in runs:
        exponent = pd.to_numeric(runs["lr_width_exponent"], errors="coerce").fillna(0)
        runs["lr_mode"] = exponent.map(lambda e: "fixed" if e == 0 else "scaled")
    else:
        runs["lr_mode"] = "lr=" + runs["optim.lr"].map(format_value)
    quantities = [f"feat/{q}" for q in ("delta1", "delta2", "delta3", "dY", "gAZ", "AZ", "Z")]
    history = coll.history[coll.history["key"].isin(quantities)]
    history = history.astype({"run_id": str, "key": str})
    info = runs[["run_id", "label", "lr_mode", column, "seed"]].astype({"run_id": str})
    table = history.merge(info, on="run_id")
    return pd.DataFrame(
        {
            "method": table["label"],
            "lr_mode": table["lr_mode"],
            "width": table[column].astype(int),
            "seed": table["seed"],
            "step": table["step"],
            "quantity": table["key"].str.removeprefix("feat/"),
            "value": table["value"],
        }
    )


def width_tables(coll: Collection, dirs: list[Path], out: Path) -> tuple[list[Table], list[Path]]:
    """Gamma against width, fitted by :mod:`analysis.width_fit`: from the width sweep's
    ``records.jsonl`` files in ``dirs`` when there are some, else from the collected runs
    when they differ in model width. Returns the tables and the plot files written."""
    found, written = [], []
    (out / "plots").mkdir(parents=True, exist_ok=True)
    records_files = [path for directory in dirs for path in _width_sweep_records(directory)]
    for index, records in enumerate(records_files):
        suffix = "" if len(records_files) == 1 else f"_{index}"
        result = width_fit.analyze(records, out / f"width_sweep{suffix}")
        found.append(_width_table(f"gamma_width{suffix}", str(records), result["fits"]))
        for path in result["files"]:
            if path.suffix in (".png", ".pdf"):
                target = out / "plots" / f"gamma_{path.name.removesuffix(path.suffix)}{suffix}"
                target = target.with_suffix(path.suffix)
                shutil.copyfile(path, target)
                written.append(target)
    table = width_records(coll) if not records_files else pd.DataFrame()
    steps = width_fit.choose_steps(table) if not table.empty else []
    if steps:
        fits = width_fit.fit_exponents(table, steps)
        found.append(_width_table("gamma_width", "runs of several widths", fits))
        written += width_fit.plot_magnitudes(table, fits, steps[-1], out / "plots" / "gamma_width")
    return found, written


def _width_sweep_records(directory: Path) -> list[Path]:
    """``records.jsonl`` files of ``experiments/width_sweep.py`` in ``directory`` (at most two
    levels down): one JSON run per line with ``width`` and ``metrics``."""
    candidates = [directory / "records.jsonl", *directory.glob("*/records.jsonl")]
    found = []
    for path in candidates:
        if path.is_file():
            with path.open() as stream:
                first = stream.readline()
            try:
                record = json.loads(first)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and {"width", "metrics"} <= set(record):
                found.append(path)
    return found


def _width_table(name: str, source: str, fits: pd.DataFrame) -> Table:
    display = width_fit.exponent_table(fits).astype(str)
    return Table(
        name,
        f"Width exponents of the feature updates ({source})",
        display,
        fits,
        [
            "Least-squares slope of log(RMS) on log(width) with a 95% CI (analysis.width_fit); "
            "stable feature learning: 0 for delta1, delta2, delta3 and dY; the paper's "
            "Assumption 1: 1 for gAZ."
        ],
        key_columns=3,
    )


def write_picks(table: Table, out: Path) -> Path:
    """``out/tuned_lr.json``: the learning rates picked on validation (analysis.tables.tuned_lr)."""
    from analysis.tables.tuned_lr import PICKS_FILE, picks_record

    path = out / PICKS_FILE
    path.write_text(json.dumps(picks_record(table.data), indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------- main
def report(args: argparse.Namespace) -> dict:
    """Collect, tabulate, plot; return ``{"tables": [...], "files": [...], "runs": int}``."""
    everything = gather(args)
    everything.plan_options = dict(getattr(args, "plan_options", {}))
    if everything.runs.empty:
        raise SystemExit(f"analysis.report: no runs under {[str(d) for d in args.sweep_dirs]}.")
    out = Path(args.out)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    names = list(args.tables or tables_module.TABLES)
    coll, built, counts = everything, [], f"{len(everything.runs)} runs"
    if args.select_lr:
        try:
            kept, selection = tables_module.select_learning_rate(
                everything.runs, args.select_metric
            )
        except ValueError as err:  # a metric the runs lack, or one with no mean to rank
            raise SystemExit(f"analysis.report: {err}") from None
        coll = everything.subset(kept["run_id"])
        coll.runs = kept
        built.append(selection)
        counts += f" ({len(kept)} at the chosen learning rates)"
    try:
        built += tables_module.build_tables(coll, args.seeds, [n for n in names if n != FAILURES])
    except PlanError as err:  # runs that disagree on their analysis plan: one line
        raise SystemExit(f"analysis.report: {err}") from None
    if FAILURES in names:  # every run that did not complete, whatever the lr selection kept
        built += tables_module.build_tables(everything, args.seeds, [FAILURES])
    files: list[Path] = []
    if args.tables is None:
        extra_tables, extra_files = width_tables(coll, list(args.sweep_dirs), out)
        built += extra_tables
        files += extra_files
    for table in built:
        files += table.write(out / "tables")
        if table.name == "tuned_lr":  # the record the final stage of a tuned study reads
            files.append(write_picks(table, out))
    # The records' fields; the routing fields are left out: derived for older records, and
    # the config's task.family and task.protocol columns say the same.
    write_csv(everything.runs.drop(columns=list(TASK_FIELDS)), out / "tables" / "runs.csv")
    if not args.no_plots:
        files += plots_module.build_plots(coll, out / "plots", args.plots)
    text = "\n".join(table.markdown() for table in built)
    # What the collection left out (jobs that never started, a folder reached twice, broken
    # links): listed in the report as well as warned about, so that no run vanishes silently.
    left_out = "".join(
        ["Left out of every table:\n\n", *(f"- {note}\n" for note in everything.notes), "\n"]
        if everything.notes
        else []
    )
    (out / "report.md").write_text(
        f"# Report: {', '.join(str(d) for d in args.sweep_dirs) or args.wandb}\n\n"
        f"{counts}; seeds: {args.seeds}.\n\n{left_out}{text}\n## Plots\n\n"
        + "".join(f"- [{p.name}](plots/{p.name})\n" for p in files if p.suffix == ".png")
    )
    print(text)
    print(
        f"[analysis.report] {counts}, {len(built)} tables, "
        f"{sum(p.suffix == '.png' for p in files)} plots -> {out}"
        + (f"; {len(everything.notes)} folders left out (report.md)" if everything.notes else "")
    )
    for path in files:
        if path.suffix == ".png" and path.parent.name == "plots":
            print(f"[analysis.report] plot: {path}")
    return {"tables": built, "files": files, "runs": len(everything.runs)}


def main(argv=None) -> dict:
    return report(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
