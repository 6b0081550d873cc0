"""The run recorder (:class:`RunRecorder`): ``metrics.jsonl``, ``summary.json`` and the W&B
mirror of both.

A run directory holds (the analysis reads these; docs/records.md documents the schema):

- ``config.yaml``: the resolved config (Hydra's own copy is in ``.hydra/``);
- ``metrics.jsonl``: one JSON object per logged row, always with ``step``; every row is
  written exactly once (a resumed run first cuts the file back to the rows its checkpoint
  had seen: :mod:`stablelora.records.rows`);
- ``layers.parquet``: the probe's per-layer values (:mod:`stablelora.records.layers`),
  cut back with ``metrics.jsonl`` on resume;
- ``examples.parquet``: every evaluation's per-example results
  (:mod:`stablelora.records.examples`), each evaluation once, cut back likewise on resume;
- ``summary.json``: the run's outcome (:mod:`stablelora.records.summary`);
- ``adapter/``: the LoRA adapter saved with peft's ``save_pretrained``;
- ``checkpoint.pt`` and ``checkpoint.prev.pt``: the two latest resumable states.

W&B is a mirror: any W&B error is one line on stderr and the local records stay complete.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from stablelora.records.atomic import fsync_replace, writing
from stablelora.records.console import _finite_or_none, say
from stablelora.records.examples import ExampleRecords
from stablelora.records.layers import (
    LayerRecords,
    split_per_layer,
    wandb_per_layer,
)
from stablelora.records.rows import read_resumed_rows
from stablelora.records.summary import STATUSES, _jsonable, wandb_summary, write_json_atomic


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
        :class:`~stablelora.records.layers.LayerRecords`) and W&B."""
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
