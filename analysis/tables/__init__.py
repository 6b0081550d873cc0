"""The paper's tables (and the reviewers'), built from a :class:`~analysis.collect.Collection`.

Every builder takes the collection and the seed protocol and returns a :class:`Table`, or
None when the records do not support it (e.g. no two stop rules for the stop-rule ablation):

========================= ================================================================
``table1``                Table 1: rows (model, method), a column per QA task, the average,
                          the published average and the difference (one CSV row per method)
``table1_best``           ``table1`` with the best seed per task (the paper's protocol),
                          whatever the report's ``seeds``: for a report that shows both
``table1_avg``            Table 1's layout: rows models, columns methods, average accuracy,
                          with the published row and the difference below ours
``paired_difference``     every method minus LoRA on the same model, task and seed: mean ±
                          std over seeds, 95% CI, seeds ahead/behind
``paired_examples``       the same pairs example by example (``examples.parquet``): McNemar
                          per task and seed, with the minimum detectable difference
``paired_bootstrap``      paired bootstrap over seeds and examples per task and for the
                          task average: difference, 95% CI, p, minimum detectable difference
``tuned_lr``              lr selection on validation: every (method, lr) with its mean
                          score and the pick (``tuned_lr.json`` beside the report)
``gsm8k``                 accuracy of generation tasks (GSM8K) by step budget
``commonsense8``          LLM-Adapters' eight commonsense datasets: a column per dataset and
                          the average (the DoRA paper's layout)
``maths7``                LLM-Adapters' seven maths datasets, the same way
``dialogue``              dialogue tasks: held-out reply loss, perplexity and ROUGE-L by
                          method (mean ± std over seeds), after a ``before training`` row
``ablation_stop_rule``    shrinking methods by stop rule (``norm``, ``never``, ``steps:N``)
``ablation_target_modules`` accuracy by target-module set and method
``init_scale``            accuracy by the scale of A0, and ``init_scale_stability``: the
                          delta1/delta2 ratio and the growth of ||A||_F by the scale of A0
``reviewer_controls``     the controls (AdamW + large weight decay, shrink for N steps) next
                          to LoRA and Stable-LoRA
``overhead``              training time and peak memory relative to LoRA
``shrink_stops``          when the layers stopped shrinking
``shrink_stops_by_layer`` the same by projection (q_proj, v_proj...) and band of depth
``side_by_side``          the main job's table: accuracy before/after, layers stopped and
                          median stop step, ||A|| first -> last, mid-run delta1/delta2
``summary``               every (model, task, method) group: runs, status, metrics
``runs_not_completed``    every failed, diverged or incomplete run and its error
========================= ================================================================

Seeds aggregate as mean ± std over the completed runs, with n (``seeds="mean"``), or as the
best run (``seeds="best"``, the paper's protocol: best of three). A cell whose runs did not
all complete says so (``n=2/3``) and the table's notes list the runs. Accuracies are in
percent; published numbers (:mod:`analysis.published`) appear beside ours with the difference.
Each table writes Markdown, LaTeX (booktabs) and CSV (numbers, not strings).

The package: :mod:`~analysis.tables.aggregation` (seeds -> cells, orders, run filters),
:mod:`~analysis.tables.formatting` (:class:`Table`, cell texts, layouts),
:mod:`~analysis.tables.selection` (``--select-lr``), and one module per artefact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from analysis.collect import Collection
from analysis.tables.aggregation import (
    METHOD_ORDER,
    SEED_MODES,
    aggregate,
    check_mode,
    metric_scale,
    sort_frame,
)
from analysis.tables.controls import reviewer_controls
from analysis.tables.dialogue import dialogue
from analysis.tables.formatting import Table, cell_text, latex_escape
from analysis.tables.gsm8k import gsm8k
from analysis.tables.init_scale import init_scale, init_scale_stability
from analysis.tables.llm_adapters import commonsense8, maths7
from analysis.tables.overhead import overhead
from analysis.tables.paired import paired_difference
from analysis.tables.paired_examples import paired_bootstrap, paired_examples
from analysis.tables.selection import select_learning_rate
from analysis.tables.shrink_stops import shrink_stops, shrink_stops_by_layer
from analysis.tables.side_by_side import side_by_side
from analysis.tables.stop_rule import ablation_stop_rule
from analysis.tables.summary import runs_not_completed, summary
from analysis.tables.table1 import table1, table1_avg, table1_best
from analysis.tables.target_modules import ablation_target_modules
from analysis.tables.tuned_lr import tuned_lr

__all__ = [
    "METHOD_ORDER",
    "SEED_MODES",
    "TABLES",
    "Table",
    "aggregate",
    "build_tables",
    "cell_text",
    "latex_escape",
    "metric_scale",
    "select_learning_rate",
    "sort_frame",
]

#: Every table builder, in the order the report prints them.
TABLES: dict[str, Callable[[Collection, str], Table | None]] = {
    "table1": table1,
    "table1_best": table1_best,
    "table1_avg": table1_avg,
    "paired_difference": paired_difference,
    "paired_examples": paired_examples,
    "paired_bootstrap": paired_bootstrap,
    "tuned_lr": tuned_lr,
    "gsm8k": gsm8k,
    "commonsense8": commonsense8,
    "maths7": maths7,
    "dialogue": dialogue,
    "ablation_stop_rule": ablation_stop_rule,
    "ablation_target_modules": ablation_target_modules,
    "init_scale": init_scale,
    "init_scale_stability": init_scale_stability,
    "reviewer_controls": reviewer_controls,
    "overhead": overhead,
    "shrink_stops": shrink_stops,
    "shrink_stops_by_layer": shrink_stops_by_layer,
    "side_by_side": side_by_side,
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
