"""The paper's tables (and the reviewers'), built from a :class:`~analysis.collect.Collection`.

Every builder takes the collection and the seed protocol and returns a :class:`Table`, or
None when the records do not support it (e.g. no two stop rules for the stop-rule ablation).
A builder is registered by ``@register_table`` (:mod:`analysis.tables.registry`) in any module
of this package (this package imports them all); ``python -m analysis.report --help`` lists
every table with its description. Among them:

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
``stable_vs_baselines``   the same bootstrap of Stable-LoRA against each other method in turn
``verdicts``              the pre-declared primary analysis of each comparison with its
                          sensitivity rows, Holm-adjusted p, TOST and a computed verdict
``tuned_lr``              lr selection on validation: every (method, lr) with its mean
                          score and the pick (``tuned_lr.json`` beside the report)
``gsm8k``                 accuracy of runs scored by generation (GSM8K) by step budget
``commonsense8``          LLM-Adapters' eight commonsense datasets: a column per dataset and
                          the average (the DoRA paper's layout)
``maths7``                LLM-Adapters' seven maths datasets, the same way
``dialogue``              runs of a dialogue task family: held-out reply loss, perplexity and
                          ROUGE-L by method (mean ± std over seeds), after ``before training``
``ablation_stop_rule``    shrinking methods by stop rule (``norm``, ``never``, ``steps:N``)
``ablation_target_modules`` accuracy by target-module set and method
``init_scale``            accuracy by the scale of A0, and ``init_scale_stability``: the
                          delta1/delta2 ratio and the growth of ||A||_F by the scale of A0
``reviewer_controls``     the controls (AdamW + large weight decay, shrink for N steps) next
                          to LoRA and Stable-LoRA
``overhead``              training time and peak memory relative to LoRA
``shrink_stops``          when the layers stopped shrinking
``shrink_stops_by_layer`` the same by projection (q_proj, v_proj...) and band of depth
``side_by_side``          methods side by side: accuracy before/after, layers stopped and
                          median stop step, ||A|| first -> last, mid-run delta1/delta2
``summary``               every (model, task, method) group: runs, status, metrics
``runs_not_completed``    every failed, diverged or incomplete run and its error
``gamma_width``           width exponents of the feature updates (:mod:`analysis.width_fit`),
                          from a width sweep's ``records.jsonl`` or runs of several widths
========================= ================================================================

Runs go to tables by what each recorded (``analysis.collect.TASK_FIELDS``): a run of a task
family of kind ``dialogue`` is in the dialogue table, an LLM-Adapters run in its benchmarks',
a run scored by generation in ``gsm8k``, every other accuracy run in Table 1 and the ablations.
Unknown methods, models and tasks come after the paper's (``METHOD_ORDER``...), never left out.

Seeds aggregate as mean ± std over the completed runs, with n (``seeds="mean"``), or as the
best run (``seeds="best"``, the paper's protocol: best of three). A cell whose runs did not
all complete says so (``n=2/3``) and the table's notes list the runs. Accuracies are in
percent; published numbers (:mod:`analysis.published`) appear beside ours with the difference.
Each table writes Markdown, LaTeX (booktabs) and CSV (numbers, not strings).

The package: :mod:`~analysis.tables.aggregation` (seeds -> cells, orders, run filters),
:mod:`~analysis.tables.formatting` (:class:`Table`, cell texts, layouts),
:mod:`~analysis.tables.selection` (``--select-lr``), :mod:`~analysis.tables.registry`
(``@register_table``), and one module per artefact.
"""

from __future__ import annotations

from collections.abc import Iterable

from analysis.collect import Collection
from analysis.discovery import discover
from analysis.tables.aggregation import SEED_MODES, aggregate, check_mode, metric_scale
from analysis.tables.formatting import Table, cell_text, latex_escape
from analysis.tables.ordering import METHOD_ORDER, sort_frame
from analysis.tables.registry import TABLES, register_table
from analysis.tables.selection import select_learning_rate

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
    "register_table",
    "select_learning_rate",
    "sort_frame",
]

#: The report's order: the tables of these modules first, each module's in the order they are
#: defined, then those of any other module of this package (alphabetically).
REPORT_ORDER = (
    "contamination",
    "table1",
    "paired",
    "paired_examples",
    "verdicts",
    "tuned_lr",
    "gsm8k",
    "llm_adapters",
    "dialogue",
    "stop_rule",
    "target_modules",
    "init_scale",
    "controls",
    "overhead",
    "shrink_stops",
    "side_by_side",
    "summary",
)


def _rank(name: str, build) -> tuple:
    """The report's order: by :data:`REPORT_ORDER` of the builder's module, then in the order
    the module defines its tables."""
    module = build.__module__.rsplit(".", 1)[-1]
    known = REPORT_ORDER.index(module) if module in REPORT_ORDER else len(REPORT_ORDER)
    return known, module, build.__code__.co_firstlineno


discover(__name__, __path__, TABLES, _rank)  # every module of this package, then the order


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
        if isinstance(table, list):  # a builder with a table per source (gamma_width)
            tables += table
        elif table is not None:
            tables.append(table)
    return tables
