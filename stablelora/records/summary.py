"""``summary.json``: built by :func:`make_summary` only, checked against
:data:`SUMMARY_SCHEMA` and read by :func:`parse_summary` only (the analysis and the W&B reader
use it): ``status`` (see :data:`STATUSES`), final, best and initial metrics, steps, times over
all attempts, peak memory, versions, git commit and the optimizer's own summary fields
(Stable-LoRA: ``shrink``).

JSON has no NaN or infinity: in ``summary.json`` a non-finite number is the string ``"nan"``,
``"inf"`` or ``"-inf"`` (a diverged run's ``train_loss_final``), and :func:`parse_summary`
turns it back into a float; in ``metrics.jsonl`` it is ``null``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from stablelora.records.atomic import fsync_replace, writing
from stablelora.records.layers import (
    RecordsError,
)
from stablelora.records.provenance import git_commit, package_versions

#: ``interrupted``: stopped by a signal after a checkpoint; rerunning the command resumes it.
STATUSES = ("completed", "diverged", "failed", "interrupted")


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON through a temporary file, fsync and a rename: readers never see half a file,
    and a failed write (a full disk) leaves the previous file in place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(path):
            text = json.dumps(_encode(payload), indent=2, sort_keys=True, default=_jsonable)
            tmp.write_text(text)
            fsync_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# ---------------------------------------------------------------------------- summary schema
#: The fields of ``summary.json`` (besides those an optimizer adds through its
#: ``record_summary()``: see :func:`optimizer_summary`), in the README's order.
SUMMARY_FIELDS = (
    "status",
    "error",
    "traceback",
    "steps",
    "max_steps",
    "main_metric",
    "initial",
    "final",
    "best",
    "train_loss_final",
    "wall_time_s",
    "train_time_s",
    "attempts",
    "peak_memory_mb",
    "world_size",
    "device",
    "versions",
    "git_commit",
    "method",
    "task",
    "task_family",
    "task_kind",
    "protocol",
    "model",
    "base_model",
    "seed",
)
SECTIONS = ("initial", "final", "best")
#: Summary statuses the analysis may see besides :data:`STATUSES`: a run with no summary.
INCOMPLETE = "incomplete"
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _config_name(config: dict, part: str):
    value = config.get(part)
    return value.get("name") if isinstance(value, dict) else value


def make_summary(status: str, config: dict, *, extra: dict | None = None, **fields) -> dict:
    """The one builder of ``summary.json``: every field of :data:`SUMMARY_FIELDS` (None or
    empty when not given), the run's method, task, model and seed read from its resolved
    ``config``, the versions and commit of the code, and the optimizer's ``extra`` fields."""
    if status not in STATUSES:
        raise ValueError(f"summary status must be one of {STATUSES}, got {status!r}")
    unknown = set(fields) - set(SUMMARY_FIELDS)
    if unknown:
        raise TypeError(f"unknown summary fields {sorted(unknown)}; add them to SUMMARY_FIELDS")
    summary = dict.fromkeys(SUMMARY_FIELDS)
    summary.update({section: {} for section in SECTIONS})
    summary.update(
        max_steps=(config.get("trainer") or {}).get("max_steps"),
        method=_config_name(config, "method"),
        task=_config_name(config, "task"),
        model=_config_name(config, "model"),
        seed=config.get("seed"),
        versions=package_versions(),
        git_commit=git_commit(),
    )
    summary.update(fields, status=status)
    summary.update(extra or {})
    return summary


def _encode(value):
    """Non-finite floats as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (JSON has none)."""
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _number(value):
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    return value


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int in Python


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_metrics(value) -> bool:
    return isinstance(value, dict) and all(v is None or _is_number(v) for v in value.values())


#: What each field of ``summary.json`` holds when it is not null, as (check, what it is): the
#: analysis and the rerun act on these values, so a summary holding anything else is damaged
#: or foreign and is refused as a whole (:func:`summary_problem`). The optimizer's own fields
#: (:func:`optimizer_summary`) are its own: not checked here.
_TEXT = (lambda v: isinstance(v, str), "a string")
SUMMARY_SCHEMA = {
    **dict.fromkeys(("error", "traceback", "main_metric", "device", "git_commit"), _TEXT),
    **dict.fromkeys(("method", "task", "task_family", "task_kind", "protocol", "model"), _TEXT),
    **dict.fromkeys(
        ("steps", "max_steps", "attempts", "world_size", "seed"), (_is_count, "an integer")
    ),
    **dict.fromkeys(
        ("train_loss_final", "wall_time_s", "train_time_s", "peak_memory_mb"),
        (_is_number, "a number"),
    ),
    **dict.fromkeys(SECTIONS, (_is_metrics, "a mapping of names to numbers")),
    **dict.fromkeys(("versions", "base_model"), (lambda v: isinstance(v, dict), "a mapping")),
}
#: Fields whose non-finite numbers are written as strings (:func:`_encode`): decoded first.
_DECODED = ("train_loss_final", "wall_time_s", "train_time_s", "peak_memory_mb")


def _shown(value) -> str:
    """``value`` for a one-line message: its repr when short and scalar, else its type."""
    text = repr(value)
    if isinstance(value, (dict, list)) or len(text) > 40:
        return f"a {type(value).__name__}"
    return text


def summary_problem(summary: dict) -> str | None:
    """What in ``summary`` (non-finite numbers decoded) breaks :data:`SUMMARY_SCHEMA`, in a
    few words (``final['eval/acc'] is 'abc', not a number``); None when nothing does. A missing
    ``status`` is allowed here (a W&B run still going); an unknown one is not."""
    status = summary.get("status")
    if status is not None and status not in STATUSES:
        return f"status is {_shown(status)}, not one of {', '.join(STATUSES)}"
    for field, (check, what) in SUMMARY_SCHEMA.items():
        value = summary.get(field)
        if value is None or check(value):
            continue
        if field in SECTIONS and isinstance(value, dict):  # name the metric that is wrong
            key, bad = next((k, v) for k, v in value.items() if not _is_number(v))
            return f"{field}[{key!r}] is {_shown(bad)}, not a number"
        return f"{field} is {_shown(value)}, not {what}"
    return None


def parse_summary(raw: dict) -> dict:
    """The one reader of a summary (from ``summary.json`` or W&B): checked against
    :data:`SUMMARY_SCHEMA`, the sections as dicts, non-finite numbers back as floats,
    ``incomplete`` for a run that has no status.

    Raises:
        RecordsError: a field holds a value of another type (what, without the file's name).
    """
    summary = dict(raw or {})
    for section in SECTIONS:
        values = summary.get(section)
        if isinstance(values, dict):
            summary[section] = {k: _number(v) for k, v in values.items()}
    for key in _DECODED:
        summary[key] = _number(summary.get(key))
    problem = summary_problem(summary)
    if problem:
        raise RecordsError(problem)
    if summary.get("status") is None:
        summary["status"] = INCOMPLETE
    for section in SECTIONS:
        summary[section] = summary.get(section) or {}
    return summary


def read_summary(run_dir: Path) -> dict:
    """:func:`parse_summary` of ``run_dir/summary.json``; ``{}`` when there is none.

    Raises:
        RecordsError: the file exists but is not a JSON object with a status, or a field holds
            a value of another type (it is written atomically by :func:`make_summary`, so only
            a foreign or damaged file): one line naming it.
    """
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
        raise RecordsError(f"{path} cannot be read ({type(error).__name__})") from None
    if not isinstance(raw, dict):
        raise RecordsError(f"{path} cannot be read (a JSON {type(raw).__name__}, not an object)")
    if raw.get("status") is None:  # the runner always writes one
        raise RecordsError(f"{path} cannot be read (it has no status)")
    try:
        return parse_summary(raw)
    except RecordsError as error:
        raise RecordsError(f"{path} cannot be read ({error})") from None


#: Summary fields that are dicts W&B gets flat (``base_model/<k>``) with their scalar values.
FLAT_RECORDS = ("base_model",)


def wandb_summary(summary: dict) -> dict:
    """The flat W&B summary of a run: scalar fields plus ``final/<k>``, ``best/<k>`` and
    ``base_model/<k>`` (its scalar values)."""
    summary = _encode(summary)
    flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}
    for section in (*SECTIONS, *FLAT_RECORDS):
        values = (summary.get(section) or {}).items()
        flat.update({f"{section}/{k}": v for k, v in values if not isinstance(v, (dict, list))})
    return flat


def summary_from_wandb(flat: dict) -> dict:
    """Inverse of :func:`wandb_summary` (W&B's own ``_``-keys dropped), then parsed."""
    summary = {k: v for k, v in flat.items() if "/" not in k and not k.startswith("_")}
    for section in (*SECTIONS, *FLAT_RECORDS):
        prefix = f"{section}/"
        values = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
        if section in SECTIONS or values:
            summary[section] = values
    return parse_summary(summary)


def optimizer_summary(optimizer) -> dict:
    """The optimizer's own summary fields: the records protocol an optimizer may implement
    (the runner names no optimizer):

    - ``record_metrics() -> dict[str, float]``: scalars logged on every logging step
      (Stable-LoRA: ``shrink/num_shrinking``, ``shrink/fraction_shrinking``);
    - ``record_summary() -> dict``: JSON-able fields added to ``summary.json``
      (Stable-LoRA: ``shrink``, per layer ``shrinking`` and ``stop_step``);
    - ``record_layers() -> dict[str, dict[str, float | None]]``: per-layer scalars the
      feature probe logs as ``lora/<layer>/<key>`` (Stable-LoRA: ``shrinking``, ``stop_step``).
    """
    method = getattr(optimizer, "record_summary", None)
    return dict(method()) if method is not None else {}


def optimizer_metrics(optimizer) -> dict[str, float]:
    """``optimizer.record_metrics()`` when the optimizer implements it (see
    :func:`optimizer_summary`), else ``{}``."""
    method = getattr(optimizer, "record_metrics", None)
    return dict(method()) if method is not None else {}
