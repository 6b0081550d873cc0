"""A composed config's identity and the resolvers ``conf/`` uses (registered by run.py and by
tests): what a run computes (:func:`computed_config`, without :data:`DISPLAY_KEYS`), its hash
and its folder's name (:func:`run_dir_name`)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

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
    # How the results are analysed (the pre-declared primary analysis, conf/config.yaml): a
    # plan declared for runs already made must not rename them.
    "analysis",
)
#: Keys added after runs were recorded, with the value that computes what runs did before the
#: key existed: left out of the identity while they hold that value, so that adding a key
#: never renames the committed runs (``{"trainer.packing": False}``).
NEUTRAL_DEFAULTS: dict[str, Any] = {"trainer.packing": False}
#: Values renamed after runs were recorded, mapped back to the recorded name before hashing
#: (``{"optimizer.builder": {"new_name": "old_name"}}``), so that a rename keeps every folder;
#: readers of recorded configs map the other way (:func:`current_name`).
RECORDED_NAMES: dict[str, dict[str, str]] = {
    # AdamW's builder (conf/optimizer/adamw.yaml) was "lora", also an adapter's and a method's
    # name; every run recorded before the rename holds "lora".
    "optimizer.builder": {"adamw": "lora"},
}
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
        node, leaf = _parent(computed, key)
        if node is not None:
            node.pop(leaf, None)
    for key, neutral in NEUTRAL_DEFAULTS.items():
        node, leaf = _parent(computed, key)
        if node is not None and leaf in node and node[leaf] == neutral:
            del node[leaf]
    for key, renames in RECORDED_NAMES.items():
        node, leaf = _parent(computed, key)
        if node is not None and isinstance(node.get(leaf), str) and node[leaf] in renames:
            node[leaf] = renames[node[leaf]]
    return computed


def _parent(tree: dict, dotted_key: str) -> tuple[dict | None, str]:
    """The dict holding ``dotted_key``'s leaf (None where a parent is missing) and the leaf."""
    *parents, leaf = dotted_key.split(".")
    node: Any = tree
    for parent in parents:
        node = node.get(parent) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), leaf


def current_name(key: str, value: Any) -> Any:
    """``value`` of the dotted ``key`` as today's configs name it: a recorded name of
    :data:`RECORDED_NAMES` becomes its new name (``current_name("optimizer.builder", "lora")``
    is ``"adamw"``); any other value is returned as it is. What readers of recorded configs
    use: ``create_optimizer`` and the analysis (``analysis.labels.current_names``)."""
    for new, old in RECORDED_NAMES.get(key, {}).items():
        if isinstance(value, str) and value == old:
            return new
    return value


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


def subtask_eval_split(mixture_split: str, own_split: str) -> str:
    """The split a mixture's subtask scores: validation when the mixture scores validation,
    else the subtask's own eval split (stablelora.tasks.merged_qa.subtask_configs)."""
    return "validation" if mixture_split == "validation" else own_split


RESOLVERS: dict[str, Callable[..., Any]] = {
    "subtask_eval_split": subtask_eval_split,
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
