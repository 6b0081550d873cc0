"""The paper's tables (and the reviewers'), built from a :class:`~analysis.collect.Collection`.

Every builder takes the collection and the seed protocol and returns a :class:`Table`, or
None when the records do not support it (e.g. no two stop rules for the stop-rule ablation):

========================= ================================================================
``table1``                Table 1: rows (model, method), a column per QA task, the average,
                          the published average and the difference (one CSV row per method)
``table1_avg``            Table 1's layout: rows models, columns methods, average accuracy,
                          with the published row and the difference below ours
``gsm8k``                 accuracy of generation tasks (GSM8K) by step budget
``ablation_stop_rule``    shrinking methods by stop rule (``norm``, ``never``, ``steps:N``)
``ablation_target_modules`` accuracy by target-module set and method
``init_scale``            accuracy by the scale of A0, and ``init_scale_stability``: the
                          delta1/delta2 ratio and the growth of ||A||_F by the scale of A0
``reviewer_controls``     the controls (AdamW + large weight decay, shrink for N steps) next
                          to LoRA and Stable-LoRA
``overhead``              training time and peak memory relative to LoRA
``shrink_stops``          when the layers stopped shrinking
``summary``               every (model, task, method) group: runs, status, metrics
``runs_not_completed``    every failed, diverged or incomplete run and its error
========================= ================================================================

Seeds aggregate as mean ± std over the completed runs, with n (``seeds="mean"``), or as the
best run (``seeds="best"``, the paper's protocol: best of three). A cell whose runs did not
all complete says so (``n=2/3``) and the table's notes list the runs. Accuracies are in
percent; published numbers (:mod:`analysis.published`) appear beside ours with the difference.
Each table writes Markdown, LaTeX (booktabs) and CSV (numbers, not strings).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import published
from analysis.collect import Collection, format_value, label_runs

SEED_MODES = ("mean", "best")
SCALE = 100.0  # accuracies are stored as fractions and shown in percent, like the paper's
LOWER_IS_BETTER = ("loss", "ppl", "perplexity")  # metric names where the best run is the lowest
METHOD_ORDER = (
    "lora",
    "rslora",
    "loraplus",
    "dora",
    "adalora",
    "riemann",
    "lora_rite",
    "adamw_large_wd",
    "shrink_fixed_steps",
    "stable_lora",
    "stable_rslora",
    "stable_loraplus",
    "stable_dora",
    "stable_adalora",
)
MODEL_ORDER = (*published.PAPER_MODELS, "llama3.1_8b", "smollm2_135m", "tiny_llama", "tiny_qwen2")
TASK_ORDER = (*published.QA_TASKS, "merged_qa", "bbc_news", "metamath_gsm8k", "arithmetic")
GENERATE_TASKS = ("metamath_gsm8k", "arithmetic")
AVG = "Avg"
DASH = "—"


@dataclass
class Table:
    """A table ready to print and write.

    ``display`` holds the strings shown in Markdown and LaTeX (its first ``key_columns``
    columns are row labels); ``data`` holds the numbers written to CSV; ``notes`` are printed
    under the table.
    """

    name: str
    title: str
    display: pd.DataFrame
    data: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    key_columns: int = 1

    def markdown(self) -> str:
        """The table as GitHub Markdown, title and notes included."""
        columns = [str(c) for c in self.display.columns]
        lines = [
            f"### {self.title}",
            "",
            "| " + " | ".join(columns) + " |",
            "|"
            + "".join(":---|" if i < self.key_columns else "---:|" for i in range(len(columns))),
        ]
        for row in self.display.itertuples(index=False):
            lines.append("| " + " | ".join(_md_escape(str(v)) for v in row) + " |")
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def latex(self) -> str:
        """The table as a LaTeX ``table`` float with a booktabs ``tabular``."""
        columns = list(self.display.columns)
        spec = "l" * self.key_columns + "r" * (len(columns) - self.key_columns)
        lines = [
            "% requires \\usepackage{booktabs}",
            "\\begin{table}[t]",
            "\\centering",
            f"\\caption{{{latex_escape(self.title)}}}",
            f"\\label{{tab:{self.name}}}",
            f"\\begin{{tabular}}{{{spec}}}",
            "\\toprule",
            " & ".join(latex_escape(str(c)) for c in columns) + " \\\\",
            "\\midrule",
        ]
        for row in self.display.itertuples(index=False):
            lines.append(" & ".join(latex_escape(str(v)) for v in row) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        if self.notes:
            notes = " ".join(latex_escape(n) for n in self.notes)
            lines.append(f"\\par\\smallskip{{\\footnotesize {notes}}}")
        lines.append("\\end{table}")
        return "\n".join(lines) + "\n"

    def write(self, folder: str | Path) -> list[Path]:
        """Write ``<name>.md``, ``<name>.tex`` and ``<name>.csv`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{self.name}.{ext}" for ext in ("md", "tex", "csv")]
        paths[0].write_text(self.markdown())
        paths[1].write_text(self.latex())
        self.data.to_csv(paths[2], index=False)
        return paths


# ---------------------------------------------------------------------------- formatting
LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "—": "--",
    "·": r"$\cdot$",
    "≥": r"$\geq$",
    "→": r"$\to$",
    "λ": r"$\lambda$",
}
_LATEX_RE = re.compile("|".join(re.escape(k) for k in LATEX_SPECIALS))


def latex_escape(text: str) -> str:
    """Plain text -> LaTeX text (specials escaped, ± and Δ as math)."""
    return _LATEX_RE.sub(lambda m: LATEX_SPECIALS[m.group(0)], text)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _num(value, digits: int = 2, signed: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return DASH
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def cell_text(stats, mode: str, digits: int = 2, fmt: Callable[[float], str] | None = None) -> str:
    """One aggregated cell: ``61.94 ± 0.52 (n=3)`` (mean) or ``62.40 (best of 3)`` (best);
    ``n=2/3`` when a run of the cell did not complete; the statuses when none did. ``fmt``
    formats the value instead of ``digits`` (and then no spread is shown)."""
    n, runs = int(stats["n"]), int(stats["runs"])
    if runs == 0:
        return DASH
    if n == 0:
        return f"{stats['statuses'] or 'no result'} (0/{runs})"
    count = f"{n}" if n == runs else f"{n}/{runs}"
    if fmt is not None:
        return f"{fmt(stats['value'])} (n={count})"
    if mode == "best":
        return f"{_num(stats['value'], digits)} (best of {count})"
    spread = f" ± {_num(stats['std'], digits)}" if n > 1 else ""
    return f"{_num(stats['value'], digits)}{spread} (n={count})"


def aggregate(frame: pd.DataFrame, keys: list[str], mode: str = "mean") -> pd.DataFrame:
    """Aggregate ``frame`` (one row per run: ``keys``, ``value``, ``status``) over the rest.

    Returns one row per group: ``keys``, ``value`` (mean, or the best run for
    ``mode="best"``: the max, or the min where the optional ``sign`` column is -1),
    ``std`` (over the runs with a value, NaN for best-of), ``n`` (runs with a value),
    ``runs`` (all runs) and ``statuses`` ("1 failed, 1 diverged" for the others).
    """
    check_mode(mode)
    columns = [*keys, "value", "std", "n", "runs", "statuses"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    # An optional "sign" column (-1 where lower is better, constant within a group) makes
    # the best run the max of sign * value.
    sign = frame.get("sign", 1.0)
    frame = frame.assign(has_value=frame["value"].notna(), group_sign=sign)
    frame["signed"] = frame["value"] * frame["group_sign"]
    grouped = frame.groupby(keys, dropna=False, sort=False)
    out = grouped.agg(
        mean=("value", "mean"),
        best_signed=("signed", "max"),
        sign=("group_sign", "first"),
        std=("value", "std"),
        n=("has_value", "sum"),
        runs=("value", "size"),
    ).reset_index()
    out["value"] = out["best_signed"] * out["sign"] if mode == "best" else out["mean"]
    if mode == "best":
        out["std"] = math.nan
    missing = frame[~frame["has_value"]].copy()
    missing["status"] = missing["status"].where(missing["status"] != "completed", "no value")
    if missing.empty:
        out["statuses"] = ""
    else:
        counts = missing.groupby([*keys, "status"], dropna=False, sort=True).size()
        text = counts.reset_index(name="count").assign(
            part=lambda f: f["count"].astype(str) + " " + f["status"].astype(str)
        )
        text = text.groupby(keys, dropna=False, sort=False)["part"].agg(", ".join)
        out = out.merge(text.rename("statuses").reset_index(), on=keys, how="left")
        out["statuses"] = out["statuses"].fillna("")
    return out[columns]


def check_mode(mode: str) -> None:
    if mode not in SEED_MODES:
        raise ValueError(f"seeds must be one of {SEED_MODES}, got {mode!r}.")


def protocol_note(mode: str) -> str:
    if mode == "best":
        return (
            "Cells: the best run over seeds (the paper's protocol), accuracy in %; "
            "'best of 2/3': one of three runs did not complete."
        )
    return (
        "Cells: mean ± std over seeds (sample std), accuracy in %; n = completed runs, "
        "'n=2/3': one of three runs did not complete."
    )


def _rank(values: Iterable, order: Iterable) -> dict:
    order = list(order)
    known = {v: i for i, v in enumerate(order)}
    return {v: (known.get(v, len(order)), str(v)) for v in values}


def sort_frame(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Sort by the paper's order of models, tasks and methods (then alphabetically)."""
    orders = {
        "model": MODEL_ORDER,
        "task": TASK_ORDER,
        "method": METHOD_ORDER,
        "training": ("per-task", *TASK_ORDER),
    }

    def key(series: pd.Series):
        if series.name == "modules":  # target-module sets: smallest first, as in the paper
            return series.str.count(",")
        if series.name == "label":
            method = series.str.split(",").str[0]
            rank = _rank(method.unique(), METHOD_ORDER)
            return method.map(lambda m: rank[m][0]).astype(str).str.zfill(3) + series
        rank = _rank(series.unique(), orders.get(series.name, ()))
        if series.name in orders:
            return series.map(lambda v: rank[v])
        return series

    present = [c for c in columns if c in frame.columns]
    if not present or frame.empty:
        return frame.reset_index(drop=True)
    for column in reversed(present):  # stable sorts from the last key to the first
        frame = frame.sort_values(column, key=key, kind="stable")
    return frame.reset_index(drop=True)


def _not_completed_note(runs: pd.DataFrame) -> list[str]:
    bad = runs[runs["status"] != "completed"]
    if bad.empty:
        return []
    listed = "; ".join(f"{r.run} ({r.status})" for r in bad.itertuples())
    return [f"{len(bad)} of {len(runs)} runs did not complete and count as missing: {listed}."]


def lower_is_better(metric: str) -> bool:
    """``eval/loss``-like metrics: the best run is the lowest, and they are not percentages."""
    name = str(metric).rsplit("/", 1)[-1]
    return any(word in name for word in LOWER_IS_BETTER)


def metric_scale(metric: str) -> float:
    """Accuracies (fractions) are shown in percent; losses as they are."""
    return 1.0 if lower_is_better(metric) else SCALE


def _values(runs: pd.DataFrame, column: str = "score") -> pd.DataFrame:
    """``runs`` with ``value`` (the column in display units) and ``sign`` (-1 where lower is
    better, so that best-of-seeds takes the lowest)."""
    lower = runs["main_metric"].map(lower_is_better).astype(bool)
    scale = runs["main_metric"].map(metric_scale).astype(float)
    value = runs[column] * scale if column in runs else math.nan
    return runs.assign(value=value, sign=lower.map({True: -1.0, False: 1.0}).astype(float))


def accuracy_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs scored by log-likelihood accuracy (Table 1 and the ablations): generation
    tasks (GSM8K, by step budget) and loss-scored tasks (the toy width task) are left out."""
    if runs.empty:
        return runs
    return runs[~is_generation(runs) & ~runs["main_metric"].map(lower_is_better).astype(bool)]


# ---------------------------------------------------------------------------- selection
def is_generation(runs: pd.DataFrame) -> pd.Series:
    """Runs scored by generation (GSM8K-like tasks), shown by step budget, not in Table 1."""
    by_name = runs["task"].isin(GENERATE_TASKS)
    if "task.protocol" in runs:
        return (runs["task.protocol"] == "generate").fillna(False) | by_name
    return by_name


def select_learning_rate(
    runs: pd.DataFrame, metric: str = "score", by: tuple[str, ...] = ("model", "method")
) -> tuple[pd.DataFrame, Table]:
    """Keep, for each ``by`` group (and each variant other than the lr), the ``optim.lr``
    whose completed runs have the highest mean ``metric`` (over tasks and seeds).

    ``metric`` is a column of ``runs``: ``score`` (the final main metric), or e.g.
    ``best/eval/acc`` or ``final/eval/acc_norm``. Returns the kept runs and a table of every
    candidate (mean metric, completed runs / runs, chosen).
    """
    if metric not in runs.columns:
        raise ValueError(f"cannot select the lr on {metric!r}: not a column of the runs.")
    if "optim.lr" not in runs.columns:
        raise ValueError("cannot select the lr: the runs have no optim.lr.")
    runs = label_runs(runs.copy(), exclude=["optim.lr"])
    keys = [*by, "label"]
    frame = runs.assign(value=pd.to_numeric(runs[metric], errors="coerce"))
    frame.loc[frame["status"] != "completed", "value"] = math.nan
    stats = aggregate(frame, [*keys, "optim.lr"], "mean")
    stats["chosen"] = False
    for _, group in stats.groupby(keys, dropna=False, sort=False):
        scored = group["value"].dropna()
        best = scored.idxmax() if len(scored) else group.index[0]
        stats.loc[best, "chosen"] = True
    chosen = stats.loc[stats["chosen"], [*keys, "optim.lr"]]
    kept = runs.merge(chosen, on=[*keys, "optim.lr"], how="inner")
    label_runs(kept)
    stats = sort_frame(stats, [*keys, "optim.lr"])
    display = (
        stats[list(keys)]
        .astype(str)
        .assign(
            lr=stats["optim.lr"].map(format_value),
            **{metric: stats.apply(lambda r: cell_text(r, "mean", 4), axis=1)},
            chosen=stats["chosen"].map({True: "yes", False: ""}),
        )
    )
    table = Table(
        "lr_selection",
        f"Learning rate chosen per method on {metric}",
        display,
        stats.rename(columns={"value": metric}),
        [
            f"For each {', '.join(keys)}: the lr with the highest mean {metric} over its completed "
            "runs (all tasks and seeds); only the chosen lr's runs enter the other tables."
        ],
        key_columns=len(keys),
    )
    return kept, table


# ---------------------------------------------------------------------------- Table 1
def qa_scores(runs: pd.DataFrame) -> pd.DataFrame:
    """Long per-(run, task) scores of the non-generation runs, in %.

    A run trained on one task gives one row (its main metric; ``training="per-task"``). A run
    trained on a mixture (``merged_qa``: its summary has ``final/<main metric>/<subtask>``)
    gives a row per subtask plus an ``Avg`` row (its main metric, the subtasks' mean), with
    ``training`` = the mixture's task name.
    """
    columns = [
        "run_id",
        "run",
        "model",
        "training",
        "label",
        "method",
        "seed",
        "task",
        "value",
        "status",
    ]
    rows = []
    sub_columns: dict[str, list[str]] = {}
    for run in runs.to_dict("records"):
        metric = run["main_metric"]
        if metric not in sub_columns:
            prefix = f"final/{metric}/"
            sub_columns[metric] = [c for c in runs.columns if c.startswith(prefix)]
        subs = {c.rsplit("/", 1)[-1]: run[c] for c in sub_columns[metric] if pd.notna(run[c])}
        mixture = bool(subs) or run["task"] == "merged_qa"
        base = {k: run[k] for k in ("run_id", "run", "model", "label", "method", "seed", "status")}
        if mixture:
            base["training"] = run["task"]
            for task, value in subs.items():
                rows.append({**base, "task": task, "value": value * SCALE})
            rows.append({**base, "task": AVG, "value": run["score"] * SCALE})
        else:
            rows.append(
                {**base, "training": "per-task", "task": run["task"], "value": run["score"] * SCALE}
            )
    return pd.DataFrame(rows, columns=columns)


def _first_problem(statuses: pd.Series) -> str:
    return next((status for status in statuses if status != "completed"), "missing task")


def _table1_cells(runs: pd.DataFrame, mode: str) -> tuple[pd.DataFrame, list[str]]:
    """Aggregated cells of Table 1 (one row per model, training, label, task incl. Avg)."""
    scores = qa_scores(runs)
    keys = ["model", "training", "label", "method"]
    tasks = [t for t in TASK_ORDER if t in set(scores["task"])]
    tasks += sorted(set(scores["task"]) - set(tasks) - {AVG})
    task_scores = scores[scores["task"] != AVG]
    cells = aggregate(task_scores, [*keys, "task"], mode)
    per_task = task_scores[task_scores["training"] == "per-task"]
    parts = [cells]
    if not per_task.empty:
        # Every task of the (model, training) group is needed for an average: a missing or
        # failed task makes a seed's average missing (and counted so), never a mean of fewer.
        needed = per_task.groupby(["model", "training"])["task"].nunique().rename("needed")
        if mode == "mean":
            scored = per_task[per_task["value"].notna()]
            by_seed = per_task.groupby([*keys, "seed"], dropna=False, sort=False)
            seeds = by_seed.agg(value=("value", "mean"), status=("status", _first_problem))
            seeds["tasks"] = scored.groupby([*keys, "seed"], dropna=False)["task"].nunique()
            seeds = seeds.reset_index().join(needed, on=["model", "training"])
            complete = seeds["tasks"].fillna(0) >= seeds["needed"]
            seeds["value"] = seeds["value"].where(complete)
            seeds["status"] = seeds["status"].where(~complete, "completed")
            average = aggregate(seeds, keys, "mean")
        else:  # best of seeds per task (per training run), then their mean
            task_cells = cells[cells["training"] == "per-task"]
            average = (
                task_cells.assign(scored=task_cells["n"] > 0)
                .groupby(keys, dropna=False, sort=False)
                .agg(
                    value=("value", "mean"),
                    scored=("scored", "sum"),
                    n=("n", "min"),
                    runs=("runs", "max"),
                    statuses=("statuses", lambda s: ", ".join(sorted(set(s) - {""}))),
                )
            )
            average = average.reset_index().join(needed, on=["model", "training"])
            complete = average["scored"] >= average["needed"]
            average["value"] = average["value"].where(complete)
            average["statuses"] = average["statuses"].where(
                ~complete | (average["statuses"] == ""), ""
            )
            average.loc[~complete & (average["statuses"] == ""), "statuses"] = "missing task"
            average["std"] = math.nan
        parts.append(average.assign(task=AVG)[cells.columns])
    mixtures = scores[(scores["training"] != "per-task") & (scores["task"] == AVG)]
    if not mixtures.empty:
        parts.append(aggregate(mixtures, [*keys, "task"], mode))
    return pd.concat(parts, ignore_index=True), tasks


def _grouped(frame: pd.DataFrame, keys: list[str]) -> dict[tuple, pd.DataFrame]:
    """``{key tuple: rows}`` of ``frame`` grouped on ``keys`` (missing keys as a dash)."""
    filled = frame.assign(**{k: frame[k].astype(object).where(frame[k].notna(), DASH)
                             for k in keys})  # fmt: skip
    return {key: group for key, group in filled.groupby(keys, sort=False)}


def _key(row: dict, keys: list[str]) -> tuple:
    return tuple(DASH if pd.isna(row[k]) else row[k] for k in keys)


def _table1_published(model: str, training: str, method: str, tasks: list[str]) -> float:
    if training != "per-task" or set(tasks) != set(published.QA_TASKS):
        return math.nan
    return published.TABLE1_QA_AVERAGE.get(model, {}).get(method, math.nan)


def table1(coll: Collection, seeds: str = "mean") -> Table | None:
    """Table 1: rows (model, method), a column per QA task, the average, the paper's average
    and the difference. The CSV has one row per (model, training, method label)."""
    check_mode(seeds)
    runs = accuracy_runs(coll.runs)
    if runs.empty:
        return None
    cells, tasks = _table1_cells(runs, seeds)
    keys = ["model", "training", "label", "method"]
    rows = sort_frame(cells[keys].drop_duplicates(), keys)
    groups = _grouped(cells, keys)
    display_rows, data_rows = [], []
    for row in rows.to_dict("records"):
        mine = groups[_key(row, keys)].set_index("task")
        row_tasks = [t for t in tasks if t in mine.index]
        paper = _table1_published(row["model"], row["training"], row["method"], row_tasks)
        avg = mine.loc[AVG] if AVG in mine.index else None
        ours_avg = avg["value"] if avg is not None else math.nan
        shown = {"model": row["model"], "training": row["training"], "method": row["label"]}
        data = {
            "model": row["model"],
            "training": row["training"],
            "method": row["method"],
            "label": row["label"],
        }
        for task in [*tasks, AVG]:
            stats = mine.loc[task] if task in mine.index else None
            shown[task] = cell_text(stats, seeds) if stats is not None else DASH
            name = task.lower() if task == AVG else task
            for part in ("value", "std", "n", "runs"):
                column = name if part == "value" else f"{name}_{part}"
                data[column] = stats[part] if stats is not None else math.nan
        shown["Paper"], shown["Δ"] = _num(paper), _num(ours_avg - paper, signed=True)
        data["paper"], data["diff"] = paper, ours_avg - paper
        display_rows.append(shown)
        data_rows.append(data)
    display, data = pd.DataFrame(display_rows), pd.DataFrame(data_rows)
    if data["paper"].isna().all():
        display = display.drop(columns=["Paper", "Δ"])
    if set(display["training"]) == {"per-task"}:
        display = display.drop(columns=["training"])
    notes = [
        protocol_note(seeds),
        "Avg: per seed the mean over the tasks (a seed missing a task has no average); "
        "best-of: the mean of the per-task best runs; a mixture's Avg is its main metric.",
        "Paper: the published QA average (Table 1; best of three seeds, per-task "
        "training), shown when the five QA tasks are present.",
    ]
    notes += _not_completed_note(runs)
    title = "Table 1: accuracy (%) per task and average"
    key_columns = 3 if "training" in display else 2
    return Table("table1", title, display, data, notes, key_columns)


def _pivot_with_paper(
    cells: pd.DataFrame,
    row_keys: list[str],
    column: str,
    columns: list,
    mode: str,
    paper: Callable[[dict, object], float],
    column_title: Callable[[object], str] = str,
    fmt: Callable[[float], str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cells -> (display, data): a row per ``row_keys`` value with a column per ``column``
    value; where the paper has numbers for a row, a ``paper`` and a ``Δ`` row follow it."""
    display_rows, data_rows = [], []
    any_paper = False
    groups = _grouped(cells, row_keys)
    for row in sort_frame(cells[row_keys].drop_duplicates(), row_keys).to_dict("records"):
        mine = groups[_key(row, row_keys)].set_index(column)
        ours = {"source": "ours", **{k: str(v) for k, v in row.items()}}
        papers = {"source": "paper", **{k: "" for k in row}}
        diffs = {"source": "Δ", **{k: "" for k in row}}
        has_paper = False
        for value in columns:
            stats = mine.loc[value] if value in mine.index else None
            title = column_title(value)
            ours[title] = cell_text(stats, mode, fmt=fmt) if stats is not None else DASH
            reference = paper(row, value)
            ours_value = stats["value"] if stats is not None else math.nan
            papers[title], diffs[title] = _num(reference), _num(ours_value - reference, signed=True)
            has_paper |= bool(np.isfinite(reference))
            data_rows.append(
                {
                    **row,
                    column: value,
                    "value": ours_value,
                    **({} if stats is None else {k: stats[k] for k in ("std", "n", "runs")}),
                    "paper": reference,
                    "diff": ours_value - reference,
                }
            )
        display_rows += [ours, papers, diffs] if has_paper else [ours]
        any_paper |= has_paper
    display = pd.DataFrame(display_rows)
    order = [*row_keys, "source", *[column_title(v) for v in columns]]
    display = display[order] if any_paper else display[[c for c in order if c != "source"]]
    return display, pd.DataFrame(data_rows)


def table1_avg(coll: Collection, seeds: str = "mean") -> Table | None:
    """Table 1 in the paper's layout: rows models, columns methods, average accuracy (%)."""
    runs = accuracy_runs(coll.runs)
    if runs.empty:
        return None
    full, _ = _table1_cells(runs, seeds)
    cells = full[full["task"] == AVG]
    labels = sort_frame(cells[["label"]].drop_duplicates(), ["label"])["label"].tolist()
    methods = dict(zip(cells["label"], cells["method"]))
    row_keys = ["model", "training"]

    tasks_of = full[full["task"] != AVG].groupby(["model", "training", "label"])["task"]
    tasks_of = tasks_of.agg(list).to_dict()

    def paper(row, label):
        tasks = tasks_of.get((row["model"], row["training"], label), [])
        return _table1_published(row["model"], row["training"], methods[label], tasks)

    display, data = _pivot_with_paper(cells, row_keys, "label", labels, seeds, paper)
    if set(display["training"]) <= {"per-task", ""}:
        display = display.drop(columns=["training"])
    notes = [protocol_note(seeds), "Average over the tasks as in table1."]
    notes += _not_completed_note(runs)
    return Table(
        "table1_avg",
        "Table 1 layout: average accuracy (%), rows models, columns methods",
        display,
        data,
        notes,
        key_columns=display.shape[1] - len(labels),
    )


# ---------------------------------------------------------------------------- GSM8K
def eval_points(coll: Collection, runs: pd.DataFrame) -> pd.DataFrame:
    """The main metric of ``runs`` at every evaluation after step 0, accuracies in %.

    Long: the run's columns, ``step`` and ``value``; a run with no evaluation (one that
    failed early) has a single row with no step and no value."""
    history = coll.history
    wanted = runs[["run_id", "main_metric"]]
    points = history[history["run_id"].isin(set(runs["run_id"])) & (history["step"] > 0)]
    points = points.astype({"run_id": str, "key": str}).merge(
        wanted, left_on=["run_id", "key"], right_on=["run_id", "main_metric"]
    )[["run_id", "step", "value"]]
    merged = runs.merge(points, on="run_id", how="left")
    return merged.assign(value=merged["value"] * merged["main_metric"].map(metric_scale))


def gsm8k(coll: Collection, seeds: str = "mean") -> Table | None:
    """Accuracy of generation tasks (MetaMathQA -> GSM8K) at each evaluated step budget."""
    check_mode(seeds)
    runs = coll.runs[is_generation(coll.runs)] if len(coll.runs) else coll.runs
    if runs.empty:
        return None
    points = eval_points(coll, runs)
    keys = ["model", "task", "label", "method"]
    steps = sorted(int(s) for s in points["step"].dropna().unique())
    if not steps:
        return None
    # A run without evaluations counts as missing at every step of its group.
    filled = []
    for _, group in points.groupby(keys, dropna=False, sort=False):
        group_steps = sorted(group["step"].dropna().unique()) or steps
        evaluated = group.dropna(subset=["step"])
        missing = group[group["step"].isna()].drop(columns="step")
        missing = missing.merge(pd.DataFrame({"step": group_steps}), how="cross")
        filled += [evaluated, missing]
    points = pd.concat(filled, ignore_index=True)
    points.loc[points["status"] != "completed", "value"] = math.nan
    cells = aggregate(points, [*keys, "step"], seeds)
    cells["step"] = cells["step"].astype(int)
    methods = dict(zip(cells["label"], cells["method"]))

    def paper(row, step):
        if row["task"] != "metamath_gsm8k":
            return math.nan
        return published.GSM8K.get((row["model"], step), {}).get(methods[row["label"]], math.nan)

    display, data = _pivot_with_paper(
        cells, ["model", "task", "label"], "step", steps, seeds, paper, lambda s: f"step {s}"
    )
    display = display.rename(columns={"label": "method"})
    notes = [
        protocol_note(seeds),
        "Accuracy (%) of the main metric at each evaluation; the "
        "last column of a run is its final evaluation.",
    ]
    notes += _not_completed_note(runs)
    return Table(
        "gsm8k",
        "GSM8K accuracy (%) by step budget",
        display,
        data,
        notes,
        key_columns=display.shape[1] - len(steps),
    )


# ---------------------------------------------------------------------------- ablations
def _setting_runs(coll: Collection, exclude_label: list[str]) -> pd.DataFrame:
    runs = accuracy_runs(coll.runs).copy()
    if not runs.empty:
        label_runs(runs, exclude=exclude_label)
    return runs


def _setting_column(runs: pd.DataFrame) -> pd.Series:
    """``model`` when one task is present, else ``model · task``."""
    if runs["task"].nunique() <= 1:
        return runs["model"].astype(str)
    return runs["model"].astype(str) + " · " + runs["task"].astype(str)


def ablation_stop_rule(coll: Collection, seeds: str = "mean") -> Table | None:
    """Shrinking methods by stop rule: rows (method, stop rule), columns models."""
    check_mode(seeds)
    if "optimizer.stop_rule" not in coll.runs or "optimizer.shrink_ratio" not in coll.runs:
        return None
    runs = _setting_runs(coll, ["optimizer.stop_rule"])
    runs = runs[pd.to_numeric(runs["optimizer.shrink_ratio"], errors="coerce") > 0]
    if runs["optimizer.stop_rule"].nunique() < 2:
        return None
    runs = _values(runs).assign(
        setting=_setting_column(runs), stop_rule=runs["optimizer.stop_rule"].astype(str)
    )
    cells = aggregate(runs, ["label", "method", "stop_rule", "setting", "model", "task"], seeds)
    settings = sort_frame(cells[["model", "task", "setting"]].drop_duplicates(), ["model", "task"])[
        "setting"
    ].tolist()
    setting_info = cells.drop_duplicates("setting").set_index("setting")
    methods = dict(zip(cells["label"], cells["method"]))

    def paper(row, setting):
        info = setting_info.loc[setting]
        if methods[row["label"]] != "stable_lora" or info["task"] != "merged_qa":
            return math.nan
        return published.STOP_RULE_ABLATION.get(info["model"], {}).get(row["stop_rule"], math.nan)

    display, data = _pivot_with_paper(
        cells, ["label", "stop_rule"], "setting", settings, seeds, paper
    )
    display = display.rename(columns={"label": "method", "stop_rule": "stop rule"})
    notes = [
        protocol_note(seeds),
        "Stop rules: norm = the paper's (stop once ||A||/n < "
        "||B||/m), never = shrink for the whole run, steps:N = shrink on steps 1..N. "
        "Paper: Stable-LoRA on the merged QA mixture.",
    ]
    notes += _not_completed_note(runs)
    return Table(
        "ablation_stop_rule",
        "Stop-rule ablation: accuracy (%)",
        display,
        data,
        notes,
        key_columns=display.shape[1] - len(settings),
    )


MODULE_SHORT = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}


def modules_text(modules: str) -> str:
    """``"q_proj,v_proj"`` -> ``"q,v"``."""
    return ",".join(MODULE_SHORT.get(m, m) for m in str(modules).split(","))


def ablation_target_modules(coll: Collection, seeds: str = "mean") -> Table | None:
    """Accuracy by target-module set: rows (model, task, modules), columns methods."""
    check_mode(seeds)
    if "adapter.target_modules" not in coll.runs:
        return None
    runs = _setting_runs(coll, ["adapter.target_modules"])
    if runs.empty or runs["adapter.target_modules"].nunique() < 2:
        return None
    order = {m: i for i, m in enumerate(published.ALL_PROJECTIONS)}
    runs = _values(runs).assign(
        modules=runs["adapter.target_modules"].map(
            lambda m: ",".join(sorted(str(m).split(","), key=lambda x: (order.get(x, 99), x)))
        )
    )
    cells = aggregate(runs, ["model", "task", "modules", "label", "method"], seeds)
    labels = sort_frame(cells[["label"]].drop_duplicates(), ["label"])["label"].tolist()
    methods = dict(zip(cells["label"], cells["method"]))

    def paper(row, label):
        table = published.TARGET_MODULES_ABLATION.get((row["model"], row["task"]), {})
        modules = tuple(sorted(row["modules"].split(",")))
        return table.get(modules, {}).get(methods[label], math.nan)

    display, data = _pivot_with_paper(
        cells, ["model", "task", "modules"], "label", labels, seeds, paper
    )
    display["modules"] = display["modules"].map(lambda m: modules_text(m) if m else m)
    notes = [protocol_note(seeds), "modules: the LoRA target projections (q = q_proj, ...)."]
    notes += _not_completed_note(runs)
    return Table(
        "ablation_target_modules",
        "Target-module ablation: accuracy (%)",
        display,
        data,
        notes,
        key_columns=display.shape[1] - len(labels),
    )


# ---------------------------------------------------------------------------- init scale
def _last_value(coll: Collection, run_ids: set, key: str, first: bool = False) -> pd.Series:
    history = coll.history
    values = history[(history["key"] == key) & history["run_id"].isin(run_ids)]
    values = values.astype({"run_id": str}).sort_values("step")
    values = values.groupby("run_id")["value"]
    return values.first() if first else values.last()


def stability_measures(coll: Collection, runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: ``delta1/delta2`` at the last probed step where delta2 > 0 (the paper's
    self-stability: about one when both factors learn; large when the excess of A0 Z makes
    delta1 dominate) and ``||A|| last/first`` (the growth of ||A||_F over the run; the
    paper's Figure 2: it never falls below its initial value under AdamW)."""
    ids = set(runs["run_id"])
    history = coll.history[coll.history["run_id"].isin(ids)].astype({"run_id": str, "key": str})
    deltas = history[history["key"].isin(["feat/delta1", "feat/delta2"])]
    wide = deltas.pivot_table(index=["run_id", "step"], columns="key", values="value")
    ratio = pd.Series(dtype=float)
    if {"feat/delta1", "feat/delta2"} <= set(wide.columns):
        wide = wide[(wide["feat/delta2"] > 0) & np.isfinite(wide["feat/delta1"])]
        ratio = (wide["feat/delta1"] / wide["feat/delta2"]).groupby(level="run_id").last()
    growth = _last_value(coll, ids, "lora/norm_A") / _last_value(coll, ids, "lora/norm_A", True)
    return pd.DataFrame({"run_id": runs["run_id"]}).assign(
        ratio=lambda f: f["run_id"].map(ratio), growth=lambda f: f["run_id"].map(growth)
    )


def init_scale(coll: Collection, seeds: str = "mean") -> Table | None:
    """Accuracy by the scale of A0 (``adapter.init_scale``): rows methods, columns scales."""
    check_mode(seeds)
    if "adapter.init_scale" not in coll.runs:
        return None
    runs = _setting_runs(coll, ["adapter.init_scale"])
    if runs.empty or runs["adapter.init_scale"].nunique() < 2:
        return None
    runs = _values(runs)
    cells = aggregate(runs, ["model", "task", "label", "method", "adapter.init_scale"], seeds)
    scales = sorted(cells["adapter.init_scale"].unique())
    display, data = _pivot_with_paper(
        cells,
        ["model", "task", "label"],
        "adapter.init_scale",
        scales,
        seeds,
        lambda r, s: math.nan,
        lambda s: f"A0 × {format_value(s)}",
    )
    display = display.rename(columns={"label": "method"})
    notes = [
        protocol_note(seeds),
        "A0 × c: peft's A0 multiplied by c (0: the A = B = 0 "
        "saddle, no learning). The claim: a larger A0 breaks self-stability under "
        "AdamW, and shrinking repairs it (see init_scale_stability).",
    ]
    notes += _not_completed_note(runs)
    return Table(
        "init_scale",
        "Accuracy (%) by the scale of A0",
        display,
        data,
        notes,
        key_columns=display.shape[1] - len(scales),
    )


def init_scale_stability(coll: Collection, seeds: str = "mean") -> Table | None:
    """By the scale of A0: the delta1/delta2 ratio at the last probed step and the growth of
    ||A||_F over the run (geometric means over seeds)."""
    if "adapter.init_scale" not in coll.runs or coll.history.empty:
        return None
    runs = _setting_runs(coll, ["adapter.init_scale"])
    if runs.empty or runs["adapter.init_scale"].nunique() < 2:
        return None
    measures = stability_measures(coll, runs)
    runs = runs.merge(measures, on="run_id")
    if runs[["ratio", "growth"]].isna().all().all():
        return None
    scales = sorted(runs["adapter.init_scale"].unique())
    long = []
    for measure, title in (("ratio", "delta1/delta2 (last probe)"), ("growth", "||A|| last/first")):
        values = runs[measure].where(runs[measure] > 0)
        long.append(runs.assign(quantity=title, value=np.log10(values)))
    cells = aggregate(
        pd.concat(long, ignore_index=True),
        ["model", "task", "label", "quantity", "adapter.init_scale"],
        "mean",
    )
    cells["value"] = 10 ** cells["value"]
    cells["std"] = math.nan
    display, data = _pivot_with_paper(
        cells,
        ["model", "task", "label", "quantity"],
        "adapter.init_scale",
        scales,
        "mean",
        lambda r, s: math.nan,
        lambda s: f"A0 × {format_value(s)}",
        fmt=lambda v: f"{v:.3g}" if np.isfinite(v) else DASH,
    )
    display = display.rename(columns={"label": "method"})
    notes = [
        "Geometric mean over seeds (n = runs with a value). delta1 = s (B'-B) A Z, "
        "delta2 = s B (A'-A) Z (the paper's numbering), RMS means over layers from the "
        "probe; self-stable training keeps delta1/delta2 near 1. ||A|| = the mean over "
        "layers of ||A||_F, last logged / first logged."
    ]
    return Table(
        "init_scale_stability",
        "Self-stability by the scale of A0",
        display,
        data,
        notes,
        key_columns=4,
    )


# ---------------------------------------------------------------------------- controls
def reviewer_controls(coll: Collection, seeds: str = "mean") -> Table | None:
    """The reviewers' controls beside LoRA and Stable-LoRA: accuracy, the difference from
    each, and when the layers stopped shrinking."""
    check_mode(seeds)
    runs = _setting_runs(coll, [])
    if runs.empty:
        return None
    fixed_steps = runs.get("optimizer.stop_rule", pd.Series("", index=runs.index)).astype(str)
    shrinks = pd.to_numeric(runs.get("optimizer.shrink_ratio", 0), errors="coerce") > 0
    is_control = (runs["method"] == "adamw_large_wd") | (
        shrinks & fixed_steps.str.startswith("steps:")
    )
    if not is_control.any():
        return None
    runs = _values(runs)
    keys = ["model", "task", "label", "method"]
    cells = sort_frame(aggregate(runs, keys, seeds), keys)
    if "shrink/stop_step_median" in runs:
        stops = runs.groupby(keys, dropna=False)["shrink/stop_step_median"].median()
        cells = cells.merge(stops.rename("median_stop_step").reset_index(), on=keys, how="left")
    else:
        cells["median_stop_step"] = math.nan
    plain = runs[(runs["method"] == "stable_lora") & (fixed_steps == "norm")]
    for name, ref_runs in {"lora": runs[runs["method"] == "lora"], "stable_lora": plain}.items():
        ref = aggregate(ref_runs, ["model", "task"], seeds)[["model", "task", "value"]]
        cells = cells.merge(ref.rename(columns={"value": f"ref_{name}"}), on=["model", "task"],
                            how="left")  # fmt: skip
        cells[f"diff_{name}"] = cells["value"] - cells[f"ref_{name}"]
    shown = pd.DataFrame(
        {
            "model": cells["model"],
            "task": cells["task"],
            "method": cells["label"],
            "accuracy": [cell_text(cell, seeds) for cell in cells.to_dict("records")],
            "Δ vs lora": cells["diff_lora"].map(lambda v: _num(v, signed=True)),
            "Δ vs stable_lora": cells["diff_stable_lora"].map(lambda v: _num(v, signed=True)),
            "median stop step": cells["median_stop_step"].map(lambda v: _num(v, 0)),
        }
    )
    notes = [
        protocol_note(seeds),
        "Δ: percentage points against the mean (or best) of the "
        "reference's runs on the same model and task; Stable-LoRA = the paper's stop rule "
        "(norm). adamw_large_wd: AdamW with a large decoupled weight decay on A (or A and "
        "B); steps:N: shrink on steps 1..N only. median stop step: the median over layers "
        "of the step a layer stopped shrinking (median over seeds).",
    ]
    notes += _not_completed_note(runs)
    return Table(
        "reviewer_controls",
        "Reviewer controls: accuracy (%)",
        shown,
        cells,
        notes,
        key_columns=3,
    )


# ---------------------------------------------------------------------------- overhead
def overhead(coll: Collection, seeds: str = "mean") -> Table | None:
    """Training time and peak memory per method, relative to LoRA on the same model and task
    (means over the completed runs; the seed protocol does not apply to costs)."""
    runs = coll.runs
    if runs.empty or "train_time_s" not in runs:
        return None
    runs = runs[runs["status"] == "completed"]
    keys = ["model", "task", "label", "method"]
    baseline_groups = set(map(tuple, runs.loc[runs["method"] == "lora", ["model", "task"]].values))
    runs = runs[[tuple(v) in baseline_groups for v in runs[["model", "task"]].values]]
    if runs.empty or runs["label"].nunique() < 2:
        return None
    stats = (
        runs.groupby(keys, dropna=False, sort=False)
        .agg(
            time=("train_time_s", "mean"),
            time_std=("train_time_s", "std"),
            wall=("wall_time_s", "mean"),
            memory=("peak_memory_mb", "mean"),
            n=("train_time_s", "count"),
        )
        .reset_index()
    )
    lora = stats[stats["method"] == "lora"].groupby(["model", "task"])[["time", "memory"]].mean()
    stats = stats.join(lora, on=["model", "task"], rsuffix="_lora")
    stats["time_rel"] = (stats["time"] / stats["time_lora"] - 1) * 100
    stats["memory_rel"] = (stats["memory"] / stats["memory_lora"] - 1) * 100
    stats["paper_time_rel"] = [
        published.OVERHEAD_PERCENT.get((r.model, r.task), {}).get(r.method, math.nan)
        for r in stats.itertuples()
    ]
    stats = sort_frame(stats, keys)
    display = pd.DataFrame(
        {
            "model": stats["model"],
            "task": stats["task"],
            "method": stats["label"],
            "train time (s)": [
                f"{_num(t)} ± {_num(s)}" if n > 1 else _num(t)
                for t, s, n in zip(stats["time"], stats["time_std"], stats["n"])
            ],
            "Δ time vs LoRA": stats["time_rel"].map(lambda v: _num(v, 1, True) + " %"),
            "wall time (s)": stats["wall"].map(_num),
            "peak memory (MB)": stats["memory"].map(lambda v: _num(v, 0)),
            "Δ memory vs LoRA": stats["memory_rel"].map(lambda v: _num(v, 1, True) + " %"),
            "n": stats["n"].astype(int).astype(str),
        }
    )
    if stats["paper_time_rel"].notna().any():
        display["paper Δ time"] = stats["paper_time_rel"].map(lambda v: _num(v, 1, True) + " %")
    notes = [
        "Means over completed runs; train time = the training loop (no evaluation). "
        "Peak memory: CUDA max allocated, or the process's max RSS on CPU; jobs that share "
        "a process (Hydra's basic launcher) share that peak, so compare memory from "
        "separate processes. Paper: Qwen2-0.5B on HellaSwag, wall clock, LoRA 217.4 s, "
        "no extra memory for Stable-LoRA."
    ]
    return Table("overhead", "Overhead relative to LoRA (AdamW)", display, stats, notes, 3)


# ---------------------------------------------------------------------------- shrinking
def shrink_stops(coll: Collection, seeds: str = "mean") -> Table | None:
    """When the layers stopped shrinking (Stable-LoRA's stop rule), over layers and seeds."""
    if coll.shrink.empty:
        return None
    keys = ["model", "task", "label", "method"]
    layers = coll.shrink.merge(coll.runs[["run_id", *keys, "steps"]], on="run_id")
    rows_shown, data_rows = [], []
    for key, group in sort_frame(layers, keys).groupby(keys, dropna=False, sort=False):
        stops = group["stop_step"].dropna().astype(float)
        runs = group["run_id"].nunique()
        data = dict(zip(keys, key)) | {
            "runs": runs,
            "layers": group["layer"].nunique(),
            "layer_runs": len(group),
            "stopped": len(stops),
            "first": stops.min(),
            "median": stops.median(),
            "last": stops.max(),
            "steps": group["steps"].max(),
        }
        data_rows.append(data)
        rows_shown.append(
            {
                "model": data["model"],
                "task": data["task"],
                "method": data["label"],
                "runs": str(runs),
                "layers": str(data["layers"]),
                "stopped": f"{data['stopped']}/{data['layer_runs']}",
                "first stop": _num(data["first"], 0),
                "median stop": _num(data["median"], 0),
                "last stop": _num(data["last"], 0),
                "steps": format_value(data["steps"]),
            }
        )
    notes = [
        "Over every (layer, seed): stopped = layers that met the stop rule / all; the "
        "steps are those on which the layer stopped (it never shrinks again); layers "
        "that did not stop shrank on every step of the run."
    ]
    return Table(
        "shrink_stops",
        "When each layer stopped shrinking",
        pd.DataFrame(rows_shown),
        pd.DataFrame(data_rows),
        notes,
        key_columns=3,
    )


# ---------------------------------------------------------------------------- summaries
def summary(coll: Collection, seeds: str = "mean") -> Table | None:
    """Every (model, task, method) group: runs by status and the main metric before, after
    and at its best evaluation."""
    check_mode(seeds)
    runs = coll.runs
    if runs.empty:
        return None
    keys = ["model", "task", "label", "method"]
    frame = _values(runs).assign(
        initial=_main_metric_of(runs, "initial"),
        best=_main_metric_of(runs, "best"),
        train_loss=pd.to_numeric(runs["train_loss_final"], errors="coerce"),
    )
    cells = aggregate(frame, keys, seeds)
    extra = frame.groupby(keys, dropna=False, sort=False).agg(
        initial=("initial", "mean"),
        best=("best", "mean"),
        train_loss=("train_loss", "mean"),
        metric=("main_metric", "first"),
    )
    counts = frame.groupby([*keys, "status"], dropna=False).size().unstack("status", fill_value=0)
    counts = counts.add_prefix("status_")
    cells = cells.join(extra, on=keys).join(counts, on=keys)
    cells = sort_frame(cells, keys)
    status_columns = list(counts.columns)
    shown = pd.DataFrame(
        {
            "model": cells["model"],
            "task": cells["task"],
            "method": cells["label"],
            "runs": [
                ", ".join(f"{row[c]} {c.removeprefix('status_')}" for c in status_columns if row[c])
                for row in cells[status_columns].to_dict("records")
            ],
            "metric": cells["metric"].astype(str).str.removeprefix("eval/"),
            "before": cells["initial"].map(_num),
            "final": [cell_text(cell, seeds) for cell in cells.to_dict("records")],
            "best eval": cells["best"].map(_num),
            "train loss": cells["train_loss"].map(lambda v: _num(v, 4)),
        }
    )
    notes = [
        protocol_note(seeds),
        "before: mean at step 0; best eval: mean over runs of the "
        "best evaluation during the run; train loss: mean of the last logged loss.",
    ]
    if runs["main_metric"].map(lower_is_better).any():
        notes.append("Loss-like metrics are shown as logged (not in %); their best is the lowest.")
    notes += _not_completed_note(runs)
    return Table(
        "summary",
        "All runs by model, task and method",
        shown,
        cells,
        notes,
        key_columns=3,
    )


def _main_metric_of(runs: pd.DataFrame, section: str) -> pd.Series:
    """Each run's ``<section>/<its main metric>`` in display units (NaN where absent)."""
    values = pd.Series(math.nan, index=runs.index)
    for metric in runs["main_metric"].dropna().unique():
        column, rows = f"{section}/{metric}", runs["main_metric"] == metric
        if column in runs:
            values[rows] = pd.to_numeric(runs.loc[rows, column], errors="coerce")
            values[rows] *= metric_scale(metric)
    return values


def runs_not_completed(coll: Collection, seeds: str = "mean") -> Table | None:
    """Every run that failed, diverged or did not finish, with its error."""
    runs = coll.runs
    if runs.empty:
        return None
    bad = sort_frame(runs[runs["status"] != "completed"], ["model", "task", "label", "seed"])
    if bad.empty:
        return None
    error = bad["error"].fillna("").astype(str).str.split("\n").str[0].str.slice(0, 160)
    display = pd.DataFrame(
        {
            "run": bad["run"].astype(str),
            "status": bad["status"].astype(str),
            "steps": [
                f"{format_value(s)}/{format_value(m)}"
                for s, m in zip(bad["steps"], bad["max_steps"])
            ],
            "error": error,
        }
    )
    columns = [
        "run_id",
        "sweep",
        "run",
        "model",
        "task",
        "method",
        "label",
        "seed",
        "status",
        "steps",
        "max_steps",
        "error",
    ]
    return Table(
        "runs_not_completed",
        "Runs that did not complete",
        display,
        bad[[c for c in columns if c in bad]],
        [],
        key_columns=4,
    )


#: Every table builder, in the order the report prints them.
TABLES: dict[str, Callable[[Collection, str], Table | None]] = {
    "table1": table1,
    "table1_avg": table1_avg,
    "gsm8k": gsm8k,
    "ablation_stop_rule": ablation_stop_rule,
    "ablation_target_modules": ablation_target_modules,
    "init_scale": init_scale,
    "init_scale_stability": init_scale_stability,
    "reviewer_controls": reviewer_controls,
    "overhead": overhead,
    "shrink_stops": shrink_stops,
    "summary": summary,
    "runs_not_completed": runs_not_completed,
}


def build_tables(
    coll: Collection, seeds: str = "mean", names: Iterable[str] | None = None
) -> list[Table]:
    """Every table in ``names`` (default: all) that the records support."""
    check_mode(seeds)
    names = list(TABLES) if names is None else list(names)
    unknown = sorted(set(names) - set(TABLES))
    if unknown:
        raise ValueError(f"unknown tables {unknown}: choose from {list(TABLES)}.")
    tables = []
    for name in names:
        table = TABLES[name](coll, seeds)
        if table is not None:
            tables.append(table)
    return tables
