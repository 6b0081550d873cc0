"""Run records: ``metrics.jsonl``, ``summary.json`` and the W&B mirror of both.

A run directory holds (the analysis reads these; docs/records.md documents the schema):

- ``config.yaml``: the resolved config (Hydra's own copy is in ``.hydra/``);
- ``metrics.jsonl``: one JSON object per logged row, always with ``step``; every row is
  written exactly once (a resumed run first cuts the file back to the rows its checkpoint
  had seen);
- ``layers.parquet``: the probe's per-layer values (:mod:`stablelora.layer_records`),
  cut back with ``metrics.jsonl`` on resume;
- ``examples.parquet``: every evaluation's per-example results
  (:mod:`stablelora.example_records`), each evaluation once, cut back likewise on resume;
- ``summary.json``: built by :func:`make_summary` only and read by :func:`parse_summary` only
  (the analysis and the W&B reader use it): ``status`` (see :data:`STATUSES`), final, best
  and initial metrics, steps, times over all attempts, peak memory, versions, git commit and
  the optimizer's own summary fields (Stable-LoRA: ``shrink``);
- ``adapter/``: the LoRA adapter saved with peft's ``save_pretrained``;
- ``checkpoint.pt`` and ``checkpoint.prev.pt``: the two latest resumable states.

JSON has no NaN or infinity: in ``summary.json`` a non-finite number is the string ``"nan"``,
``"inf"`` or ``"-inf"`` (a diverged run's ``train_loss_final``), and :func:`parse_summary`
turns it back into a float; in ``metrics.jsonl`` it is ``null``.

W&B is a mirror: any W&B error is one line on stderr and the local records stay complete.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid
import warnings
from importlib import metadata
from pathlib import Path

from stablelora.atomic_files import fsync_replace, writing
from stablelora.example_records import ExampleRecords
from stablelora.layer_records import (
    LayerRecords,
    RecordsError,
    split_per_layer,
    wandb_per_layer,
)

#: ``interrupted``: stopped by a signal after a checkpoint; rerunning the command resumes it.
STATUSES = ("completed", "diverged", "failed", "interrupted")
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "datasets",
    "hydra-core",
    "wandb",
    "rouge-score",  # the ROUGE-L of dialogue tasks
    "stablelora",
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the code that ran (with ``-dirty`` when the tree had changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit or None


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


def read_jsonl(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file: a torn last line is skipped, any other
    unreadable line too, with a warning naming the file and the line."""
    rows: list[dict] = []
    if not path.exists():
        return rows
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
        elif number < len(lines):
            warnings.warn(f"{path} line {number} cannot be read; skipped it.", stacklevel=2)
    return rows


def read_resumed_rows(path: Path, rows: int, step: int | None) -> list[dict]:
    """The first ``rows`` rows of ``metrics.jsonl``: those a checkpoint at ``step`` had seen.

    A torn last line (a kill mid-write) ends the file; any other unreadable line among them,
    or a row of a later step than the checkpoint's, means the file was damaged or edited:
    resuming on it would drop or repeat rows, so it stops with one line naming the file and
    the line.

    Raises:
        RecordsError: a damaged line, or fewer rows than ``rows``.
    """
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    kept: list[dict] = []
    where = f"the checkpoint at step {step}" if step is not None else "the checkpoint"
    for number, line in enumerate(lines[:rows], start=1):
        try:
            row = json.loads(line)
            problem = (
                None
                if isinstance(row, dict) and isinstance(row.get("step"), int)
                else ("not a row with a step")
            )
        except json.JSONDecodeError:
            row, problem = None, "not JSON"
        if problem and number == len(lines):
            break  # a torn last line: the short-records error below
        if problem is None and step is not None and row["step"] > step:
            problem = f"a row of step {row['step']}, after {where}"
        if problem:
            raise RecordsError(
                f"{path} line {number} is damaged ({problem}) among the {rows} rows {where} "
                "had written: resuming would lose or repeat rows; restore the file, or rerun "
                "with trainer.resume=false to start this run over."
            )
        kept.append(row)
    if len(kept) < rows:
        raise RecordsError(
            f"{path} has {len(kept)} rows but {where} had written {rows}: "
            "records are missing, so resuming would leave a gap; rerun with "
            "trainer.resume=false to start this run over."
        )
    return kept


def say(message: str) -> None:
    """One line to stderr, prefixed ``stablelora:``: what the runner tells the user."""
    print(f"stablelora: {message}", file=sys.stderr, flush=True)


def flatten(config: dict, prefix: str = "", *, join_lists: bool = False) -> dict:
    """Nested config -> ``{"optim.lr": 1e-4, ...}``. With ``join_lists``, lists become
    comma-joined strings so that they can be grouped on (``adapter.target_modules`` ->
    ``"q_proj,v_proj"``, as the analysis shows them); else they are kept as they are."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}.", join_lists=join_lists))
        elif join_lists and isinstance(value, (list, tuple)):
            flat[name] = ",".join(str(item) for item in value)
        else:
            flat[name] = value
    return flat


class RunRecorder:
    """Writes a run's records; on ranks other than 0 every method does nothing.

    Args:
        run_dir: the run directory.
        config: the resolved config as a plain dict (stored in W&B and the summary).
        logger_cfg: the ``logger/`` config (mode, project, entity, group, tags, init_timeout).
        run_name: the run's name in W&B.
        enabled: False on non-zero ranks.
    """

    def __init__(self, run_dir: Path, config: dict, logger_cfg, run_name: str, enabled=True):
        self.run_dir, self.config, self.enabled = Path(run_dir), config, enabled
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        self.rows = 0  # rows of metrics.jsonl this run stands on (set by keep_rows)
        self.wandb_run = None
        self.layers = LayerRecords(self.run_dir, enabled=enabled)  # per-layer probe values
        self.examples = ExampleRecords(self.run_dir, enabled=enabled)  # per-example results
        self.wandb_layers_every = int(logger_cfg.get("per_layer_every", 50) or 0)
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.wandb_run = self._start_wandb(logger_cfg, run_name)

    # ------------------------------------------------------------------ W&B
    def _start_wandb(self, logger_cfg, run_name):
        if logger_cfg.mode == "disabled":
            return None
        id_file = self.run_dir / "wandb_id.txt"
        try:
            import wandb

            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            timeout = logger_cfg.get("init_timeout", 30)

            def init(mode):
                return wandb.init(
                    project=logger_cfg.project,
                    entity=logger_cfg.entity,
                    group=logger_cfg.group,
                    tags=list(logger_cfg.tags),
                    name=run_name,
                    config=self.config,
                    id=run_id,
                    resume="allow",
                    mode=mode,
                    dir=str(self.run_dir),
                    settings=wandb.Settings(console="off", silent=True, init_timeout=timeout),
                )

            if logger_cfg.mode != "online":
                return init(logger_cfg.mode)
            try:
                return init("online")
            except Exception as error:  # noqa: BLE001 - no network, server down, no login
                first = (str(error).strip().splitlines() or [""])[0]
                say(
                    f"W&B online did not start within logger.init_timeout={timeout}s "
                    f"({type(error).__name__}: {first}); the run continues with W&B offline "
                    f"(`wandb sync {self.run_dir}/wandb/offline-run-*` later)."
                )
                return init("offline")
        except Exception as error:  # noqa: BLE001 - W&B must never take the run down
            first = (str(error).strip().splitlines() or [""])[0]
            say(
                f"W&B is off for this run ({type(error).__name__}: {first}); "
                "the local records in the run directory are complete."
            )
            return None

    def _wandb(self, action) -> None:
        """Call ``action(run)``; a W&B error turns W&B off instead of failing the run."""
        if self.wandb_run is None:
            return
        try:
            action(self.wandb_run)
        except Exception as error:  # noqa: BLE001
            say(f"W&B failed ({error}); W&B is off from here, the local records go on.")
            self.wandb_run = None

    # ------------------------------------------------------------------ records
    def keep_rows(
        self, rows: int, step: int | None = None, example_steps: list[int] | None = None
    ) -> None:
        """Cut ``metrics.jsonl`` back to its first ``rows`` rows: those a checkpoint (at
        ``step``) had seen, or none for a fresh start; they are logged again from there, so
        every row is in the file exactly once. ``example_steps``: the evaluations whose
        per-example rows the checkpoint had recorded (None: not recorded, not checked).

        Raises:
            RecordsError: the file holds fewer rows than the checkpoint had seen, or one of
                them is damaged (:func:`read_resumed_rows`); ``examples.parquet`` cannot be
                read or lacks rows the checkpoint had recorded
                (:meth:`ExampleRecords.truncate_after`); a per-layer file before the
                checkpoint's step cannot be read (:meth:`LayerRecords.truncate_after`).
        """
        if not self.enabled:
            return
        kept = read_resumed_rows(self.metrics_path, rows, step)  # checked before any cut
        # examples.parquet is one file, checked before it is cut: before the per-layer parts
        # are, so that a damaged one leaves every record as found
        self.examples.truncate_after(step if step is not None else -1, example_steps)
        self.layers.truncate_after(step if step is not None else -1)
        if self.metrics_path.exists():  # rewritten even when as long: drops a torn last line
            tmp = self.metrics_path.with_name("metrics.jsonl.tmp")
            with writing(self.metrics_path):
                tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
                fsync_replace(tmp, self.metrics_path)
        self.rows = rows

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one record to ``metrics.jsonl`` (the per-layer probe values to the
        :class:`~stablelora.layer_records.LayerRecords`) and W&B."""
        if not self.enabled or not metrics:
            return
        metrics, per_layer = split_per_layer(metrics)
        self.layers.append(step, per_layer)
        every = self.wandb_layers_every
        if per_layer and self.wandb_run is not None and every and step % every == 0:
            self._wandb(lambda run: run.log(wandb_per_layer(per_layer), step=step, commit=False))
        row = {"step": step, **{k: _finite_or_none(v) for k, v in metrics.items()}}
        with writing(self.metrics_path), self.metrics_path.open("a") as stream:
            stream.write(json.dumps(row, default=_jsonable) + "\n")
        self.rows += 1
        self._wandb(lambda run: run.log(metrics, step=step))

    def log_examples(self, step: int, rows: list[dict]) -> None:
        """Record the per-example results of the evaluation at ``step`` (``examples.parquet``)."""
        self.examples.write(step, rows)

    def flush(self) -> None:
        """Write the buffered per-layer rows (call it before saving a checkpoint)."""
        self.layers.flush()

    def write_summary(self, summary: dict) -> None:
        """Write ``summary.json`` (and the W&B summary)."""
        if not self.enabled:
            return
        assert summary["status"] in STATUSES, summary["status"]
        write_json_atomic(self.summary_path, summary)
        if self.wandb_run is not None:
            flat = wandb_summary(summary)
            self._wandb(lambda run: run.summary.update(flat))

    def finish(self, exit_code: int = 0) -> None:
        """Write the per-layer file and close the W&B run."""
        self.layers.close()
        self._wandb(lambda run: run.finish(exit_code=exit_code))
        self.wandb_run = None


def _finite_or_none(value):
    # JSON has no NaN or infinity: in metrics.jsonl a diverged loss is null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def result_table(summary: dict) -> str:
    """A short Markdown table of a run's evaluation before and after training."""
    initial, final = summary.get("initial", {}), summary.get("final", {})
    keys = [k for k in dict.fromkeys([*initial, *final]) if not k.endswith("/n")]
    lines = [
        f"run: {summary.get('method')} on {summary.get('task')} with {summary.get('model')}, "
        f"seed {summary.get('seed')}: {summary['status']} after {summary.get('steps')} steps"
        + (f" ({summary['error']})" if summary.get("error") else ""),
        "",
        *([model_line(summary["base_model"]), ""] if summary.get("base_model") else []),
        "| metric | before | after |",
        "|---|---|---|",
    ]
    for key in keys:
        before, after = initial.get(key), final.get(key)
        lines.append(f"| {key} | {_fmt(before)} | {_fmt(after)} |")
    loss = _number(summary.get("train_loss_final"))
    if loss is not None:
        lines.append(f"| train/loss (last step) | | {loss:.4f} |")
    counts = summary.get("shrink_layers")
    if counts:
        median = counts.get("median_stop_step")
        lines += [
            "",
            f"shrink: {counts['stopped']} of {counts['layers']} LoRA layers stopped shrinking"
            + (f" (median stop step {median:g})" if median is not None else "")
            + f", {counts['shrinking']} still shrinking"
            + (
                " (the stop rule never fired: A was shrunk on every step)"
                if not counts["stopped"]
                else ""
            ),
        ]
    return "\n".join(lines)


def model_line(record: dict) -> str:
    """One line saying what model was trained, from a summary's ``base_model``:
    ``model: llama, 30 layers, hidden 576, 9 heads (3 KV), vocab 49152; 134.5M parameters,
    460.8K trainable; 4-bit Q4_1 GGUF, dequantized to float32``."""

    def millions(count) -> str:
        for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
            if count is not None and count >= scale:
                return f"{count / scale:.4g}{unit}"
        return str(count if count is not None else "?")

    heads = record.get("num_attention_heads")
    kv = record.get("num_key_value_heads")
    parts = [
        str(record.get("model_type") or "?"),
        f"{record.get('num_hidden_layers')} layers",
        f"hidden {record.get('hidden_size')}",
        *([f"{heads} heads" + (f" ({kv} KV)" if kv not in (None, heads) else "")] if heads else []),
        *([f"vocab {record['vocab_size']}"] if record.get("vocab_size") else []),
    ]
    return (
        f"model: {', '.join(parts)}; {millions(record.get('parameters'))} parameters, "
        f"{millions(record.get('trainable_parameters'))} trainable"
        + (f"; {record['weights']}" if record.get("weights") else "")
    )


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}"
