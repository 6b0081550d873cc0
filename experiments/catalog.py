"""Which experiments there are and what they compose: the row of each
(:data:`EXPERIMENTS`: its tables and plots, the scale it is built for) and its Hydra
configuration at a scale (:func:`compose`, :func:`sweep_params`, :func:`sweep_name`).
:mod:`experiments.common` runs them; :mod:`experiments.reproduce` copies their records.
An experiment ``<name>`` is ``conf/experiment/<name>.yaml`` plus its row here.
"""

from __future__ import annotations

import functools
import itertools
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
    },
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
    #: built for this machine. The one place that says so: the preset states what is compared,
    #: ``conf/scale/`` what a scale sets, and ``python -m experiments <name>`` passes
    #: ``scale=<this>`` (by hand: ``run.py -m experiment=<name> scale=cpu``).
    scale: str = "paper"
    #: (tables, plots) at a scale whose report differs from ``tables``/``plots``. The smoke
    #: scale draws every table and plot of every scale, so CI exercises them all.
    reports: dict[str, Report] = field(default_factory=dict)
    #: A sweep parameter whose values each run in a process of their own, one after the
    #: other (one ``run.py -m ... <key>=<value>`` per value): for per-process measures such as
    #: the peak memory (max RSS) of the overhead table.
    process_per: str | None = None
    #: The selection experiment whose ``tuned_lr.json`` sets each method's ``optim.lr``
    #: (one sweep command per method); see :mod:`experiments.common`.
    lr_from: str | None = None
    #: Other experiments whose sweeps run into this one's sweep folder after its own (same
    #: ``experiment_name``), before the one report of the folder: e.g. the A0 axis of the lr
    #: range study. Each is a row of its own too (``part_of`` names this one), so that it can
    #: run alone.
    parts: tuple[str, ...] = ()
    #: The experiment whose sweep folder and report this one adds to (see ``parts``).
    part_of: str | None = None

    def report(self, scale: str) -> Report:
        """The tables and plots of its report at ``scale``; every report opens with the runs'
        train/eval overlap (``contamination``, built where the runs carry a record)."""
        if scale != "smoke":
            tables, plots = self.reports.get(scale, (self.tables, self.plots))
        else:
            every = [(self.tables, self.plots), *self.reports.values()]
            tables = tuple(dict.fromkeys(t for r in every for t in r[0]))
            plots = tuple(dict.fromkeys(p for r in every for p in r[1]))
        return tuple(dict.fromkeys(("contamination", *tables))), plots


#: The lr range study's report (both of its sweeps, one folder): the verdicts per setting (lr,
#: A0 x4), per-task accuracies, the paired tests and the mechanism per lr.
LR_RANGE_REPORT: Report = (
    (
        "contamination",
        "verdicts",
        "table1",
        "paired_bootstrap",
        "stable_vs_baselines",
        "paired_examples",
        "lr_mechanism",
        "shrink_stops",
        "shrink_stops_by_layer",
        "side_by_side",
        "summary",
        "runs_not_completed",
    ),
    ("lr_range", "figure2_norms", "delta_ratio", "loss"),
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
        # Built for CPU scale: SmolLM2-135M (a 4-bit GGUF shipped offline) on this machine's
        # budget.
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
            (
                "contamination",
                "shrink_stops",
                "shrink_stops_by_layer",
                "summary",
                "runs_not_completed",
            ),
            ("figure2_norms", "deltas", "delta_ratio", "shrink_stops", "eval"),
            scale="cpu",
        ),
        Experiment(
            "tuned_select",
            "Tuned study, stage 1: each method trained at every lr of a shared log-spaced "
            "grid on ARC-Easy, ARC-Challenge and BBC News, scored on held-out validation; "
            "the lr picked per method (tuned_lr.json).",
            ("contamination", "tuned_lr", "summary", "runs_not_completed"),
            ("lr_sweep", "loss"),
            scale="cpu",
        ),
        Experiment(
            "tuned_final",
            "Tuned study, stage 2: each method at its picked lr x 3 seeds, scored on the full "
            "test splits, with example-level paired tests against LoRA.",
            (
                "contamination",
                "table1",
                "paired_difference",
                "paired_examples",
                "paired_bootstrap",
                "stable_vs_baselines",
                "verdicts",
                "shrink_stops",
                "shrink_stops_by_layer",
                "side_by_side",
                "summary",
                "runs_not_completed",
            ),
            ("figure2_norms", "delta_ratio", "loss"),
            scale="cpu",
            lr_from="tuned_select",
        ),
        Experiment(
            "lr_range",
            "Stable-LoRA against LoRA across the lr range (1e-4 .. 3.16e-3, 3 seeds) and at "
            "A0 x4 (lr_range_a0, run after it into the same folder): verdict per lr at +-1 pp "
            "(Holm across the settings), delta1/delta2, stop steps and ||A||_F per lr.",
            *LR_RANGE_REPORT,
            scale="cpu",
            parts=("lr_range_a0",),
        ),
        Experiment(
            "lr_range_a0",
            "The A0 axis of lr_range alone (A0 x4 at lr 3.16e-3, both methods, 3 seeds), into "
            "lr_range's sweep folder and report.",
            *LR_RANGE_REPORT,
            scale="cpu",
            part_of="lr_range",
        ),
        Experiment(
            "main",
            "The main job (bash scripts/setup.sh run): LoRA and Stable-LoRA side by side on "
            "BBC News at lr 1e-3, lambda 5e-3, 100 steps, where the stop rule fires.",
            ("contamination", "side_by_side", "runs_not_completed"),
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
    """The experiments that have a configuration at ``scale``: every one at the smoke scale;
    at another scale those built for it and those with a ``conf/experiment/<name>/<scale>.yaml``
    (at the paper's scale: every experiment but those built for CPU alone)."""
    return [
        e.name
        for e in EXPERIMENTS.values()
        if scale in (e.scale, "smoke") or (PRESETS / e.name / f"{scale}.yaml").exists()
    ]


#: Experiments with their own command line (not a sweep + report pair).
OWN_COMMAND = ("width_sweep",)


def compose(name: str, scale: str, overrides: tuple[str, ...] = ()):
    """The experiment's configuration at ``scale`` as ``run.py -m`` composes it (with the
    Hydra node, so that its sweep is there)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from stablelora.config.identity import register_resolvers

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


@functools.cache
def plan_options(name: str, scale: str) -> tuple[str, ...]:
    """The experiment's analysis plan (``analysis.primary`` of its composed preset) as
    ``analysis.report --plan`` options (``KEY=VALUE``, values in JSON, which YAML reads): the
    plan of runs recorded before their config held one (:mod:`analysis.tables.equivalence`)."""
    import json

    from omegaconf import OmegaConf

    primary = OmegaConf.to_container(compose(name, scale).analysis.primary, resolve=True)
    return tuple(f"{key}={json.dumps(value)}" for key, value in primary.items())


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


def sweep_jobs(name: str, scale: str) -> list[list[str]]:
    """The overrides of every job of the experiment's sweep at ``scale`` (``key=value``, one
    list per job), in the order Hydra's basic sweeper runs them: the last key varies fastest."""
    params = sweep_params(name, scale)
    return [
        [f"{key}={value}" for key, value in zip(params, values)]
        for values in itertools.product(*params.values())
    ]
