"""Runs synced to W&B as a :class:`~analysis.frames.Collection`, the same frames as runs
read from disk (``analysis.collect.collect``)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from analysis.frames import Collection, build_collection
from analysis.run_rows import run_row, shrink_rows, unique_rows
from stablelora.records.layers import RecordsError
from stablelora.records.summary import summary_from_wandb

#: W&B run states for runs whose summary has no ``status`` (the runner writes one at the end).
WANDB_STATES = {
    "finished": "completed",
    "running": "incomplete",
    "crashed": "failed",
    "failed": "failed",
    "killed": "failed",
    "preempted": "interrupted",
}


def wandb_run_records(run, *, history: bool = True) -> tuple[dict, list[dict], list[tuple]]:
    """One W&B run (an object of ``wandb.Api().runs(...)``) -> (run row, metric rows, shrink
    rows), the same shapes as a run read from disk.

    The runner's W&B run holds the resolved config, the metrics logged with ``step=`` (W&B's
    ``_step``) and a flat summary: the scalar fields of ``summary.json`` plus ``final/<k>`` and
    ``best/<k>`` (the initial metrics and the shrink stops are only on disk).
    """
    config = dict(run.config or {})
    raw = getattr(run.summary, "_json_dict", None)
    path = "/".join(getattr(run, "path", None) or [run.id])
    try:
        summary = summary_from_wandb(dict(raw if raw is not None else run.summary or {}))
    except RecordsError as error:  # as a damaged summary.json: the run is kept, incomplete
        warnings.warn(
            f"W&B run {path}: its summary cannot be read ({error}); the run is shown as "
            "incomplete.",
            stacklevel=2,
        )
        summary = summary_from_wandb({})
    else:
        if summary["status"] == "incomplete":  # no runner summary: W&B's own state says more
            summary["status"] = WANDB_STATES.get(getattr(run, "state", None), "incomplete")
    metrics = []
    if history:
        for row in run.scan_history():
            if "_step" not in row:
                continue
            values = {k: v for k, v in row.items() if not k.startswith("_") and v is not None}
            if values:
                metrics.append({"step": int(row["_step"]), **values})
    metrics = unique_rows(f"wandb:{run.id}", metrics)
    row = run_row(
        config,
        summary,
        run_id=f"wandb:{path}",
        sweep=f"wandb:{getattr(run, 'group', '')}",
        run=getattr(run, "name", None) or run.id,
        history_steps=max((m["step"] for m in metrics), default=None),
    )
    return row, metrics, shrink_rows(row["run_id"], summary.get("shrink"))


def collect_wandb(
    path: str,
    *,
    group: str | None = None,
    tags: Iterable[str] = (),
    filters: dict | None = None,
    history: bool = True,
    per_layer_probes: bool = False,
    api=None,
) -> Collection:
    """The runs of a W&B project (``"entity/project"``) that were synced, as a Collection.

    Args:
        path: ``"entity/project"``.
        group: keep runs of this W&B group (the runner's group is the sweep name).
        tags: keep runs having any of these tags.
        filters: further W&B (MongoDB-style) filters, e.g. ``{"config.task.name": "hellaswag"}``.
        history: also download the metric histories (``run.scan_history()``).
        per_layer_probes: as in :func:`collect` (the runner sends W&B the per-layer values
            only as tables and histograms every ``logger.per_layer_every`` steps: the
            per-layer series are in the run directories).
        api: a ``wandb.Api()`` (made here when None).
    """
    if api is None:
        import wandb

        api = wandb.Api()
    query = dict(filters or {})
    if group:
        query["group"] = group
    tags = list(tags)
    if tags:
        query["tags"] = {"$in": tags}
    records = [
        (*wandb_run_records(run, history=history), None) for run in api.runs(path, filters=query)
    ]
    return build_collection(records, per_layer_probes)
