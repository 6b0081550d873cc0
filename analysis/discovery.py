"""How :mod:`analysis.tables` and :mod:`analysis.plots` find their builders: each imports every
module of its package (a module registers its builders by a decorator as it is imported),
then puts its registry in the report's order."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable


def discover(
    package: str,
    path: Iterable[str],
    registry: dict[str, Callable],
    rank: Callable[[str, Callable], tuple],
) -> None:
    """Import every module of ``package`` (found on ``path``: the package's ``__path__``), then
    order ``registry`` (name -> builder, filled by those imports) by ``rank(name, builder)``,
    in place."""
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")
    ordered = sorted(registry.items(), key=lambda item: rank(*item))
    registry.clear()
    registry.update(ordered)
