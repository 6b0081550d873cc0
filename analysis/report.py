"""Tables and plots of one or more sweeps, in one command.

    python -m analysis.report SWEEP_DIR [SWEEP_DIR ...] [--out DIR] [--seeds mean|best]

collects every run under the directories (failed, diverged and unfinished runs included;
symlinked run folders followed, each folder once; jobs that never started and what else was
left out listed in ``report.md``), prints the Markdown of every table the records support,
and writes under ``--out`` (default: ``report/`` in the first directory):

- ``tables/<name>.md``, ``.tex`` (booktabs) and ``.csv`` for each table
  (:mod:`analysis.tables`), ``runs.csv`` (one row per run) and ``report.md`` (all tables);
- ``plots/<name>.png`` and ``.pdf`` for each plot (:mod:`analysis.plots`); among the tables
  and plots the width exponents (``gamma_width``: gamma against width,
  :mod:`analysis.width_fit`) when the runs vary in model width, or when a directory holds a
  width sweep's ``records.jsonl`` (its fit's own report then in ``width_sweep/``);
- ``tuned_lr.json`` with the ``tuned_lr`` table: the picks the final stage of a tuned study
  reads.

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
import sys
import textwrap
from pathlib import Path

from analysis import plots as plots_module
from analysis import tables as tables_module
from analysis.collect import TASK_FIELDS, Collection, collect, collect_wandb, concat
from analysis.tables.equivalence import PlanError, parse_plan_options
from analysis.tables.formatting import write_csv
from analysis.tables.tuned_lr import write_picks

#: The table of failed, diverged and unfinished runs: always over every run collected.
FAILURES = "runs_not_completed"


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
