"""Hydra/OmegaConf glue: resolvers used by ``conf/`` (registered by run.py and by tests)."""

from __future__ import annotations

from omegaconf import OmegaConf


def run_dir_name(override_dirname: str, fallback: str) -> str:
    """A run's folder name: its command-line overrides, or ``fallback`` when there are none."""
    return override_dirname or fallback


def register_resolvers() -> None:
    """Register the resolvers the configs use (idempotent)."""
    if not OmegaConf.has_resolver("run_dir_name"):
        OmegaConf.register_new_resolver("run_dir_name", run_dir_name)
