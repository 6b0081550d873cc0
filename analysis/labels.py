"""Labels of runs: the method and the hyper-parameters that tell a run apart from the other
runs of its (model, task, method) (its *distinguishing settings*, ``distinguished_by``), e.g.
``"stable_lora, stop_rule=never"``; how a config value is written in a label or a table; and
recorded config values renamed since, under their current names (:func:`current_names`)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd

from stablelora.config.identity import RECORDED_NAMES, current_name

#: Keys that name the optimizer config rather than set one of its options.
OPTIMIZER_IDENTITY = ("optimizer.name", "optimizer.builder")
#: Config keys that can tell runs of one method apart (besides the seed): the label of a run
#: shows those that vary within its (model, task, method), and every ``optimizer.*``.
DISTINGUISHING_KEYS = (
    "adapter.target_modules",
    "adapter.rank",
    "adapter.alpha",
    "adapter.scaling",
    "adapter.init",
    "adapter.init_scale",
    "adapter.use_dora",
    "adapter.dropout",
    "optimizer.shrink_ratio",
    "optimizer.stop_rule",
    "optimizer.loraplus_lr_ratio",
    "optim.lr",
    "optim.weight_decay",
    "optim.schedule",
    "optim.warmup_steps",
    "trainer.max_steps",
    "trainer.batch_size",
    "trainer.grad_accum",
    "model.config.hidden_size",
    "model.width",
    "lr_width_exponent",
)


def format_value(value) -> str:
    """A config value as it appears in a label or a table: compact and exact enough."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def short_key(key: str) -> str:
    """``optimizer.large_weight_decay`` -> ``large_weight_decay``."""
    return key.rsplit(".", 1)[-1]


def _group_ids(runs: pd.DataFrame, within: Iterable[str]) -> pd.Series:
    return runs[list(within)].astype(str).agg("\x1f".join, axis=1)


def current_names(runs: pd.DataFrame) -> pd.DataFrame:
    """Set the recorded values renamed since (``stablelora.config.identity.RECORDED_NAMES``:
    ``optimizer.builder`` ``lora`` -> ``adamw``) to their current names in place, and return
    ``runs``: old and new records of one run say the same in every table."""
    for key in RECORDED_NAMES:
        if key in runs.columns:
            runs[key] = runs[key].map(lambda value, key=key: current_name(key, value))
    return runs


def distinguishing_keys(
    runs: pd.DataFrame,
    exclude: Iterable[str] = (),
    within: tuple[str, ...] = ("model", "task", "method"),
) -> list[str]:
    """The config keys whose value differs between runs of some (model, task, method)."""
    exclude = set(exclude)
    candidates = [
        *DISTINGUISHING_KEYS,
        *sorted(
            c
            for c in runs.columns
            if c.startswith("optimizer.") and c not in (*DISTINGUISHING_KEYS, *OPTIMIZER_IDENTITY)
        ),
    ]
    groups = _group_ids(runs, within)
    keys = []
    for key in candidates:
        if key in exclude or key not in runs.columns:
            continue
        if (runs[key].map(format_value).groupby(groups).nunique() > 1).any():
            keys.append(key)
    return keys


def label_runs(runs: pd.DataFrame, exclude: Iterable[str] = ()) -> pd.DataFrame:
    """Set ``runs["distinguished_by"]`` and ``runs["label"]`` in place and return ``runs``.

    ``distinguished_by`` names the hyper-parameters that tell a run apart from the other runs
    of its (model, task, method), e.g. ``"stop_rule=never, lr=0.0002"`` (see
    :data:`DISTINGUISHING_KEYS` and ``optimizer.*``); the label is the method name followed
    by them (``"stable_lora, stop_rule=never"``; just ``"lora"`` when its runs differ only in
    seed). ``exclude`` keys are left out: a table that shows them in a column of their own.
    """
    if runs.empty:
        runs["distinguished_by"], runs["label"] = pd.Series(dtype=str), pd.Series(dtype=str)
        return runs
    groups = _group_ids(runs, ("model", "task", "method"))
    distinguished_by = pd.Series("", index=runs.index)
    for key in distinguishing_keys(runs, exclude):
        values = runs[key].map(format_value)
        varies = values.groupby(groups).transform("nunique") > 1
        part = (short_key(key) + "=" + values).where(varies, "")
        distinguished_by = distinguished_by.str.cat(part, sep=", ").str.strip(", ")
    runs["distinguished_by"] = distinguished_by
    methods = runs["method"].map(format_value)
    runs["label"] = methods.where(distinguished_by == "", methods + ", " + distinguished_by)
    return runs


def setting_keys(runs: pd.DataFrame) -> list[str]:
    """The keys of :func:`distinguishing_keys` that every method has (not an ``optimizer.*``
    option): the hyper-parameters of a *setting* that several methods are run at, e.g.
    ``optim.lr`` and ``adapter.init_scale`` in an lr sweep of LoRA and Stable-LoRA."""
    return [key for key in distinguishing_keys(runs) if not key.startswith("optimizer.")]


def setting_labels(runs: pd.DataFrame) -> pd.Series:
    """Each run's setting, ``"init_scale=4, lr=0.00316"`` (the values of :func:`setting_keys`
    for every run, so that the runs of two methods at one setting have the same text; ``""``
    when the runs' methods are each run at one setting). The paired tables pair a method's run
    with the reference's run of the same model, task, seed *and setting*."""
    keys = setting_keys(runs)
    setting = pd.Series("", index=runs.index, dtype=object)
    for key in keys:
        part = short_key(key) + "=" + runs[key].map(format_value)
        setting = setting.str.cat(part, sep=", ").str.strip(", ")
    return setting
