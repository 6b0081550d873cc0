"""Hydra/OmegaConf glue: resolvers used by ``conf/`` (registered by run.py and by tests), the
run folder naming, thread defaults and the multirun summary callback."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stablelora.records import STATUSES  # the run statuses, counted in this order

#: Keys that change where or how a run is shown, not what it computes: left out of the run
#: folder's hash and of the check that a folder holds the same configuration.
DISPLAY_KEYS = (
    "hydra",
    "logger",
    "output_root",
    # Where local dataset copies live: what a run reads is its resolved task.data_dir, so a
    # task that does not read data_root (BBC News) computes the same with or without it.
    "data_root",
    "sweep_name",
    "experiment_name",
    "trainer.progress_bar",
    "trainer.num_threads",
    "trainer.device",
    "trainer.resume",
    # The same loss, gradients and scores either way (within 1e-6 relative, tested), like
    # num_threads: changing it must not start a new run.
    "trainer.lm_head",
)
#: The readable prefix of a run folder: ``<method>-<task>-<model>-s<seed>``.
NAME_PARTS = ("method", "task", "model")
HASH_LENGTH = 10


def computed_config(cfg) -> dict:
    """The resolved configuration as a plain dict, without :data:`DISPLAY_KEYS`: what a run
    computes. Accepts a DictConfig (resolved here) or an already resolved dict."""
    if isinstance(cfg, DictConfig):
        top = [str(key) for key in cfg if key != "hydra"]
        cfg = OmegaConf.to_container(OmegaConf.masked_copy(cfg, top), resolve=True)
    computed = json.loads(json.dumps(cfg, default=str))  # a deep copy with plain values
    for key in DISPLAY_KEYS:
        *parents, leaf = key.split(".")
        node = computed
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return computed


def config_hash(cfg) -> str:
    """A short hash of :func:`computed_config`: equal exactly when two runs compute the same."""
    text = json.dumps(computed_config(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


def _name_part(computed: dict, part: str) -> str | None:
    value = computed.get(part)
    if isinstance(value, dict):
        value = value.get("name")
    if value is None or isinstance(value, (dict, list)):
        return None
    return re.sub(r"[^A-Za-z0-9._]+", "_", str(value)).strip("_")[:40] or None


def run_dir_name(*, _root_) -> str:
    """A run's folder name, one level deep: ``<method>-<task>-<model>-s<seed>-<hash>``, the
    hash over the resolved configuration without display-only keys, so two runs share a
    folder exactly when they compute the same thing (and rerunning a command resumes it)."""
    computed = computed_config(_root_)
    parts = [_name_part(computed, part) for part in NAME_PARTS]
    if computed.get("seed") is not None:
        parts.append(f"s{_name_part(computed, 'seed')}")
    return "-".join([p for p in parts if p] + [config_hash(computed)])


def width_scaled_lr(lr: float, width: int, exponent: float, base_width: int = 128) -> float:
    """``lr * (base_width / width) ** exponent``: exponent 1/2 keeps the paper's
    self-stability condition gamma[s] + 2 gamma[eta] + 1 = 0 with a width-free scale s."""
    return float(lr) * (base_width / width) ** float(exponent)


def data_dir(folder: str, *, _root_) -> str | None:
    """``task.data_dir`` of a preset that reads local copies: ``<data_root>/<folder>`` when the
    top-level ``data_root`` is set, else None (the task loads from the Hub by its id)."""
    root = _root_.get("data_root")
    return None if root in (None, "") else str(Path(str(root)) / folder)


def method_name(*, _root_) -> str:
    """``method.name``: the preset's name (``stable_lora``) when the composed adapter and
    optimizer are those the preset selects, else ``"<adapter>+<optimizer>"`` (``dora+riemann``)."""
    method, adapter, optimizer = _root_.method, _root_.adapter.name, _root_.optimizer.name
    preset = method.get("preset")
    if preset and (method.get("adapter"), method.get("optimizer")) == (adapter, optimizer):
        return str(preset)
    return f"{adapter}+{optimizer}"


RESOLVERS: dict[str, Callable[..., Any]] = {
    "run_dir_name": run_dir_name,
    "width_scaled_lr": width_scaled_lr,
    "method_name": method_name,
    "data_dir": data_dir,
}


def register_resolvers() -> None:
    """Register the resolvers the configs use (idempotent)."""
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


# ---------------------------------------------------------------------------- command line
#: Hydra's flags that take the next argument as their value (not an override).
_VALUED_FLAGS = (
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--info",
)


def group_options(conf_dir: Path, group: str) -> list[str]:
    """The options of a config group (``conf/<group>/**.yaml``) a user may pick: files and
    folders starting with ``_`` are shared bases, not options, and so are the files of a
    folder named like an option (``experiment/table1/cpu.yaml``: Table 1's settings at CPU
    scale, composed by ``experiment=table1 scale=cpu``)."""
    folder = Path(conf_dir) / group

    def is_option(relative: Path) -> bool:
        if any(part.startswith("_") for part in relative.parts):
            return False
        return not any(
            (folder / parent).with_suffix(".yaml").exists()
            for parent in relative.parents
            if parent != Path(".")
        )

    return sorted(
        path.relative_to(folder).with_suffix("").as_posix()
        for path in folder.rglob("*.yaml")
        if is_option(path.relative_to(folder))
    )


def check_command_line(args: list[str], conf_dir: Path) -> list[str]:
    """Check what Hydra only finds with a long error and exit code 1, before it composes:
    an override picking an option a config group does not have (``model=nope``, or a shared
    base such as ``task=_base``). Returns one warning per key given twice (Hydra silently
    takes the last value).

    Raises:
        ValueError: one line naming the override and the group's options.
    """
    if any(arg.startswith("hydra.searchpath") for arg in args):
        return []  # options may come from other config folders
    overrides, skip = [], False
    for arg in args:
        if skip or arg.startswith("-"):
            skip = not skip and arg in _VALUED_FLAGS
            continue
        if "=" in arg and not arg.startswith("~"):
            overrides.append(arg)
    warnings: list[str] = []
    seen: dict[str, str] = {}
    for override in overrides:
        key, _, value = override.lstrip("+").partition("=")
        if key in seen and seen[key] != value:
            warnings.append(
                f"{key} is given twice on the command line ({key}={seen[key]}, {key}={value}); "
                f"Hydra takes the last: {key}={value}."
            )
        seen[key] = value
        if "." in key or "/" in key or not (Path(conf_dir) / key).is_dir():
            continue  # a value, or a group of Hydra's own (hydra/launcher=joblib)
        if "(" in value or value in ("null", ""):
            continue  # a sweep function (range(), glob()) or no option
        options = group_options(Path(conf_dir), key)
        for choice in (choice.strip() for choice in value.split(",")):
            if choice not in options:
                base = any(part.startswith("_") for part in choice.split("/"))
                raise ValueError(
                    f"{key}={choice} is not an option of conf/{key}/"
                    + (" (a shared base)" if base else "")
                    + f"; choose one of {', '.join(options)}"
                    + ("." if base else f" (or add conf/{key}/{choice}.yaml).")
                )
    return warnings


def save_hydra_config_or_exit(cfg, filename: str, output_dir: Path) -> None:
    """Hydra's ``_save_config`` (its copy of the config in ``.hydra/``), with a full disk
    turned into one line instead of a traceback (installed by :func:`guard_hydra_save`)."""
    try:
        _hydra_save_config(cfg, filename, output_dir)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        sys.exit(
            f"stablelora: no space left on device ({Path(output_dir) / filename}): free some "
            "space and rerun the same command."
        )


def guard_hydra_save() -> None:
    """Route Hydra's ``_save_config`` through :func:`save_hydra_config_or_exit` (idempotent)."""
    global _hydra_save_config
    import hydra.core.utils

    if hydra.core.utils._save_config is not save_hydra_config_or_exit:
        _hydra_save_config = hydra.core.utils._save_config
        hydra.core.utils._save_config = save_hydra_config_or_exit


_hydra_save_config: Callable[..., None]


# ---------------------------------------------------------------------------- threads
def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_num_threads(launcher_cfg, cores: int | None = None) -> int | None:
    """torch CPU threads for one job of a parallel (joblib) sweep: ``cores // n_jobs``, so
    that jobs do not oversubscribe the cores (two processes using every core each were
    measured about 8x slower); None (torch's default) outside such a sweep."""
    n_jobs = OmegaConf.select(launcher_cfg, "n_jobs") if launcher_cfg is not None else None
    if not n_jobs:
        return None
    cores = cores or available_cores()
    if n_jobs < 0:  # joblib: -1 uses every core, -2 all but one, ...
        n_jobs = max(cores + 1 + n_jobs, 1)
    return max(cores // n_jobs, 1)


# ---------------------------------------------------------------------------- sweeps
#: Set by :class:`SweepSummary` for the jobs of a multirun: the file they report to.
SWEEP_LOG_ENV = "STABLELORA_SWEEP_LOG"


#: The status a job reports when it starts (with its pid): whom a stopped sweep signals.
STARTED = "started"


def report_to_sweep(run_dir: Path, status: str) -> None:
    """A job's outcome (or :data:`STARTED`), one appended line in the sweep log, with the
    job's pid (a no-op outside a multirun)."""
    path = os.environ.get(SWEEP_LOG_ENV)
    if not path:
        return
    line = json.dumps({"run_dir": str(run_dir), "status": status, "pid": os.getpid()}) + "\n"
    with open(path, "a") as stream:  # one short append: atomic between processes
        stream.write(line)


def _stop_path() -> Path | None:
    path = os.environ.get(SWEEP_LOG_ENV)
    return Path(path + ".stop") if path else None


def stop_sweep(signum: int) -> None:
    """Mark the sweep as stopped by ``signum``: its jobs that have not started yet record
    themselves ``interrupted`` without running (a no-op outside a multirun)."""
    path = _stop_path()
    if path is not None and not path.exists():
        path.write_text(f"{signum}\n")


def sweep_stopped() -> int | None:
    """The signal that stopped this sweep (:func:`stop_sweep`), or None."""
    path = _stop_path()
    if path is None or not path.exists():
        return None
    text = path.read_text().strip()
    return int(text) if text.isdigit() else 0


def sweep_summary_line(outcomes: list[dict]) -> tuple[str, bool]:
    """``("sweep: 3 completed, 1 diverged, 1 failed (<dir>), 0 interrupted", any_failed)``."""
    by_status: dict[str, list[str]] = {status: [] for status in STATUSES}
    for outcome in outcomes:
        by_status.setdefault(outcome["status"], []).append(outcome["run_dir"])
    counts = []
    for status, folders in by_status.items():
        text = f"{len(folders)} {status}"
        if status in ("failed", "interrupted") and folders:
            text += f" ({', '.join(sorted(folders))})"
        counts.append(text)
    return "stablelora sweep: " + ", ".join(counts), bool(by_status["failed"])


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency of the runner only
    Callback = object  # type: ignore[misc,assignment]  # a plain base class stands in


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): jobs report their status to
    a log file named in the environment (inherited by joblib workers and SLURM jobs); at the
    end of the multirun one line counts them and the process exits 1 if any job failed.

    A stop signal (SIGTERM, SIGUSR1, SIGUSR2; SIGINT too, which a terminal already sends to
    every process of the group) stops the sweep: the launching process passes it on to the
    jobs running in other processes (joblib workers), each of which checkpoints and records
    itself ``interrupted``; jobs not started yet record themselves ``interrupted`` without
    running; the line is printed and the process exits with 128 + the signal number."""

    def on_multirun_start(self, config, **kwargs) -> None:
        import signal
        import threading

        from stablelora.run_folder import STOP_SIGNALS

        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log = sweep_dir / f".outcomes-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
        log.touch()
        os.environ[SWEEP_LOG_ENV] = str(log.resolve())
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self.previous[signum] = signal.signal(signum, self._stop)

    def _stop(self, signum, frame) -> None:
        import signal

        stop_sweep(signum)
        path = os.environ.get(SWEEP_LOG_ENV)
        if signum == signal.SIGINT or not path:
            return  # Ctrl-C reached every process of the terminal's group already
        for outcome in _outcomes(Path(path)):
            pid = outcome.get("pid")
            if outcome["status"] == STARTED and isinstance(pid, int) and pid != os.getpid():
                with contextlib.suppress(OSError):  # finished already
                    os.kill(pid, signum)

    def on_multirun_end(self, config, **kwargs) -> None:
        import signal

        for signum, handler in getattr(self, "previous", {}).items():
            signal.signal(signum, handler)
        stopped = sweep_stopped()
        path = os.environ.pop(SWEEP_LOG_ENV, None)
        if not path or not Path(path).exists():
            return
        Path(path + ".stop").unlink(missing_ok=True)
        outcomes = [o for o in _outcomes(Path(path)) if o["status"] != STARTED]
        line, failed = sweep_summary_line(outcomes)
        print(line, flush=True)
        if stopped is not None:
            sys.exit(128 + stopped)
        if failed:
            sys.exit(1)


def _outcomes(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
