"""One run's configuration resolved once into the arguments of what it builds: :class:`RunSpec`.

:func:`stablelora.config.check.check_config` returns it after checking the config; the runner
builds the run from it (:func:`stablelora.runner.setup.build_run`: ``apply_lora``'s and
``create_optimizer``'s arguments, the task's config) and records it (the resolved config of
``summary.json``, also on failure: :mod:`stablelora.runner.job`), so that turning config nodes
into call arguments happens here only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from stablelora.optim.adamw_settings import AdamWSettings
    from stablelora.tasks.data import TaskConfig


def plain_config(cfg: Any) -> dict[str, Any]:
    """A config node (a ``DictConfig``) as a plain dict, interpolations resolved."""
    from omegaconf import OmegaConf

    return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))


def optimizer_arguments(optimizer_cfg) -> tuple[str, dict]:
    """(create_optimizer method, its own options) of an ``optimizer`` config node."""
    options = {k: v for k, v in optimizer_cfg.items() if k not in ("name", "builder")}
    return optimizer_cfg["builder"], options


@dataclass(frozen=True)
class RunSpec:
    """A run's resolved config and the arguments the runner builds it with, each computed once
    (by :func:`run_spec`). Read it, never change it: its dicts are the run's."""

    #: The resolved config (interpolations resolved, Hydra's own node left out): what
    #: ``config.yaml`` and ``summary.json`` record and the run folder is checked against.
    config: dict[str, Any]
    #: :func:`stablelora.lora.apply_lora`'s keyword arguments (``adapter`` group).
    adapter: dict[str, Any]
    #: :func:`stablelora.optim.create_optimizer`'s method (the ``optimizer`` group's builder)...
    optimizer: str
    #: ...and that method's own options.
    optimizer_options: dict[str, Any]
    #: AdamW's shared hyper-parameters (``optim:`` in ``conf/config.yaml``).
    adamw: AdamWSettings
    #: The task's config (``task`` group), as :mod:`stablelora.tasks` takes it.
    task: TaskConfig


def run_spec(config: dict[str, Any]) -> RunSpec:
    """The :class:`RunSpec` of a resolved config (:func:`plain_config`). Checks nothing
    (:func:`stablelora.config.check.check_config` does); raises ValueError for a task without
    a name or family, KeyError for a config without a group."""
    from stablelora.lora import adapter_arguments
    from stablelora.optim.adamw_settings import ADAMW_SETTINGS, AdamWSettings
    from stablelora.tasks.data import TaskConfig

    builder, options = optimizer_arguments(config["optimizer"])
    adamw = {name: config["optim"][name] for name in ADAMW_SETTINGS}  # lr, weight_decay, ...
    return RunSpec(
        config=config,
        adapter=adapter_arguments(config["adapter"], config["trainer"]["max_steps"]),
        optimizer=builder,
        optimizer_options=options,
        adamw=AdamWSettings(**{**adamw, "betas": tuple(adamw["betas"])}),
        task=TaskConfig.from_any(config["task"]),
    )
