"""Run records: ``metrics.jsonl``, ``summary.json`` and the W&B mirror of both.

A run directory holds (the analysis reads these; the README documents the schema):

- ``config.yaml``: the resolved config (Hydra's own copy is in ``.hydra/``);
- ``metrics.jsonl``: one JSON object per logged step, always with ``step``;
- ``layers.parquet``: the probe's per-layer values (:mod:`stablelora.layer_records`);
- ``summary.json``: ``status`` (``running`` | ``completed`` | ``diverged`` | ``failed``), final,
  best and initial metrics, steps, wall time, peak memory, versions, git commit, shrink stops;
- ``adapter/``: the LoRA adapter saved with peft's ``save_pretrained``;
- ``checkpoint.pt``: the latest resumable state (written atomically).

W&B is a mirror: any W&B error is a warning and the local records stay complete.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import uuid
import warnings
from importlib import metadata
from pathlib import Path

from stablelora.layer_records import LayerRecords, split_per_layer, wandb_per_layer

STATUSES = ("running", "completed", "diverged", "failed")
PACKAGES = ("torch", "transformers", "peft", "datasets", "hydra-core", "wandb", "stablelora")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on."""
    versions = {}
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
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit or None


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (a torn last line is skipped)."""
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunRecorder:
    """Writes a run's records; on ranks other than 0 every method does nothing.

    Args:
        run_dir: the run directory.
        config: the resolved config as a plain dict (stored in W&B and the summary).
        logger_cfg: the ``logger/`` config (mode, project, entity, group, tags).
        run_name: the run's name in W&B.
        enabled: False on non-zero ranks.
    """

    def __init__(self, run_dir: Path, config: dict, logger_cfg, run_name: str, enabled=True):
        self.run_dir, self.config, self.enabled = Path(run_dir), config, enabled
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        self.wandb_run = None
        self.layers = LayerRecords(self.run_dir, enabled=enabled)  # per-layer probe values
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
            return wandb.init(
                project=logger_cfg.project, entity=logger_cfg.entity, group=logger_cfg.group,
                tags=list(logger_cfg.tags), name=run_name, config=self.config, id=run_id,
                resume="allow", mode=logger_cfg.mode, dir=str(self.run_dir),
                settings=wandb.Settings(console="off", silent=True),
            )  # fmt: skip
        except Exception as error:  # noqa: BLE001 - W&B must never take the run down
            warnings.warn(
                f"W&B is off for this run ({type(error).__name__}: {error}); "
                "the local records in the run directory are complete.",
                stacklevel=2,
            )
            return None

    def _wandb(self, action) -> None:
        """Call ``action(run)``; a W&B error turns W&B off instead of failing the run."""
        if self.wandb_run is None:
            return
        try:
            action(self.wandb_run)
        except Exception as error:  # noqa: BLE001
            warnings.warn(f"W&B failed ({error}); W&B is off from here.", stacklevel=2)
            self.wandb_run = None

    # ------------------------------------------------------------------ records
    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint (they will be logged again)."""
        self.layers.truncate_after(step)
        if not self.enabled or not self.metrics_path.exists():
            return
        kept = [row for row in read_jsonl(self.metrics_path) if row["step"] <= step]
        tmp = self.metrics_path.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        os.replace(tmp, self.metrics_path)

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
        with self.metrics_path.open("a") as stream:
            stream.write(json.dumps(row, default=_jsonable) + "\n")
        self._wandb(lambda run: run.log(metrics, step=step))

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
            flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}
            for section in ("final", "best"):
                flat.update({f"{section}/{k}": v for k, v in summary.get(section, {}).items()})
            self._wandb(lambda run: run.summary.update(flat))

    def finish(self, exit_code: int = 0) -> None:
        """Write the per-layer file and close the W&B run."""
        self.layers.close()
        self._wandb(lambda run: run.finish(exit_code=exit_code))
        self.wandb_run = None


def _finite_or_none(value):
    # JSON has no NaN or infinity: a diverged loss is recorded as null.
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
        "| metric | before | after |",
        "|---|---|---|",
    ]
    for key in keys:
        before, after = initial.get(key), final.get(key)
        lines.append(f"| {key} | {_fmt(before)} | {_fmt(after)} |")
    if summary.get("train_loss_final") is not None:
        lines.append(f"| train/loss (last step) | | {summary['train_loss_final']:.4f} |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}"
