"""Hydra/OmegaConf glue: resolvers used by ``conf/`` (registered by run.py and by tests)."""

from __future__ import annotations

from omegaconf import OmegaConf


def run_dir_name(override_dirname: str, fallback: str) -> str:
    """A run's folder name: its command-line overrides, or ``fallback`` when there are none."""
    return override_dirname or fallback


def width_scaled_lr(lr: float, width: int, exponent: float, base_width: int = 128) -> float:
    """``lr * (base_width / width) ** exponent``: exponent 1/2 keeps the paper's
    self-stability condition gamma[s] + 2 gamma[eta] + 1 = 0 with a width-free scale s."""
    return float(lr) * (base_width / width) ** float(exponent)


def method_name(*, _root_) -> str:
    """``method.name``: the preset's name (``stable_lora``) when the composed adapter and
    optimizer are those the preset selects, else ``"<adapter>+<optimizer>"`` (``dora+riemann``)."""
    method, adapter, optimizer = _root_.method, _root_.adapter.name, _root_.optimizer.name
    preset = method.get("preset")
    if preset and (method.get("adapter"), method.get("optimizer")) == (adapter, optimizer):
        return str(preset)
    return f"{adapter}+{optimizer}"


RESOLVERS = {
    "run_dir_name": run_dir_name,
    "width_scaled_lr": width_scaled_lr,
    "method_name": method_name,
}


def register_resolvers() -> None:
    """Register the resolvers the configs use (idempotent)."""
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
