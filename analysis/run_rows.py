"""One run's records -> its row of ``Collection.runs``: the resolved config, the summary, the
metric rows merged per step, the shrink stops, and the fields the tables route runs on
(:func:`task_fields`: recorded by the runner, derived for older records). The records
themselves are read by :class:`stablelora.records.folder.RunFolder` (:mod:`analysis.collect`)."""

from __future__ import annotations

import math
import warnings

from stablelora.records.rows import flatten


def unique_rows(run_id: str, metrics: list[dict]) -> list[dict]:
    """The rows of one run merged per step (ascending), each (step, key) once: the last value
    logged wins, and a warning says how many values were logged more than once."""
    by_step: dict[int, dict] = {}
    repeated = 0
    for row in metrics:
        merged = by_step.setdefault(row.get("step", 0), {})
        repeated += sum(1 for key in row if key in merged and key != "step")
        merged.update(row)
    if repeated:
        warnings.warn(
            f"{run_id}: {repeated} metric values were logged more than once for the same step "
            "(two processes on one run folder, or an older runner's resume); kept the last of "
            "each.",
            stacklevel=3,
        )
    return [by_step[step] for step in sorted(by_step)]


#: What a run is routed to its tables by (besides its main metric): recorded by the runner
#: (``stablelora.tasks.task_record``), or derived by :func:`task_fields` for older records.
TASK_FIELDS = ("task_family", "task_kind", "protocol")
#: The ``KIND`` of the task families that existed before ``summary.json`` recorded
#: ``task_kind``: runs recorded earlier get their kind from here. Frozen: a family added since
#: records its own kind (tests/test_analysis_tables.py checks these against the families).
LEGACY_KINDS = {
    "arc": "multiple_choice",
    "arithmetic": "math",
    "bbc_news": "multiple_choice",
    "chatterbot": "dialogue",
    "gsm8k": "math",
    "hellaswag": "multiple_choice",
    "llm_adapters": "math",
    "merged_qa": "multiple_choice",
    "obqa": "multiple_choice",
    "siqa": "multiple_choice",
    "toy_teacher": "regression",
    "wizardlm": "dialogue",
}


def task_fields(summary: dict, flat: dict, task: str) -> dict:
    """The run's :data:`TASK_FIELDS`: as its summary recorded them, else (a run recorded
    before the runner wrote them) from its config's ``task.family`` and ``task.protocol`` and
    :data:`LEGACY_KINDS`. The one place where old and new records are made to route alike.

    A record with no config at all takes its task's name as the family when that names a
    legacy family (``chatterbot``...); a maths task with no recorded protocol generates (the
    only protocol ``stablelora.tasks`` accepts for it)."""
    if any(key in summary for key in TASK_FIELDS):
        return {key: summary.get(key) for key in TASK_FIELDS}
    family = flat.get("task.family") or (task if task in LEGACY_KINDS else None)
    kind = LEGACY_KINDS.get(family)
    protocol = flat.get("task.protocol") or ("generate" if kind == "math" else None)
    return {"task_family": family, "task_kind": kind, "protocol": protocol}


def run_row(
    config: dict,
    summary: dict,
    *,
    run_id: str,
    sweep: str,
    run: str,
    history_steps: int | None = None,
) -> dict:
    """One row of ``Collection.runs`` from a run's resolved config and its summary.

    The summary has the runner's schema (``status``, ``initial``/``final``/``best`` dicts,
    ...); a run with no summary is ``incomplete`` and its ``steps`` are the last logged step.
    """
    config = {k: v for k, v in config.items() if k != "hydra"}
    flat = flatten(config, join_lists=True)
    status = summary.get("status") or "incomplete"
    main_metric = summary.get("main_metric") or "eval/acc"
    final = summary.get("final") or {}
    row = {
        "run_id": run_id,
        "sweep": sweep,
        "run": run,
        "status": status,
        "error": summary.get("error"),
        "steps": summary.get("steps", history_steps),
        "max_steps": summary.get("max_steps", flat.get("trainer.max_steps")),
        "main_metric": main_metric,
        # Never missing, so that grouping on them keeps every run.
        "model": summary.get("model") or flat.get("model.name") or "—",
        "task": summary.get("task") or flat.get("task.name") or "—",
        "method": summary.get("method") or flat.get("method.name") or "—",
        "seed": summary.get("seed", flat.get("seed")),
        "score": final.get(main_metric, math.nan) if status == "completed" else math.nan,
    }
    row.update(task_fields(summary, flat, row["task"]))
    for section in ("initial", "final", "best"):
        for key, value in (summary.get(section) or {}).items():
            row[f"{section}/{key}"] = value
    for key in ("train_loss_final", "wall_time_s", "train_time_s", "attempts", "peak_memory_mb"):
        row[key] = summary.get(key)
    row.update(_shrink_stats(summary))
    row.update(flat)
    return row


def _shrink_stats(summary: dict) -> dict:
    """Layers, stopped layers and the last stop step from the per-layer ``shrink``; the median
    stop step as the run recorded it (``shrink_layers``, from
    ``stablelora.optim.stable_lora.shrink_counts``), not computed a second time here."""
    shrink = summary.get("shrink")
    if not shrink:
        return {}
    stopped = [
        layer["stop_step"] for layer in shrink.values() if layer.get("stop_step") is not None
    ]
    median = (summary.get("shrink_layers") or {}).get("median_stop_step")
    return {
        "shrink/layers": len(shrink),
        "shrink/stopped": len(stopped),
        "shrink/stop_step_median": math.nan if median is None else median,
        "shrink/stop_step_max": max(stopped) if stopped else math.nan,
    }


def shrink_rows(run_id: str, shrink: dict | None) -> list[tuple]:
    return [
        (run_id, layer, bool(state.get("shrinking")), state.get("stop_step"))
        for layer, state in (shrink or {}).items()
    ]
