"""Which tables there are: ``@register_table`` registers a builder under its function's name.

A builder takes the collection and the seed protocol (``"mean"`` or ``"best"``) and returns a
:class:`~analysis.tables.formatting.Table`, or None when the records do not support it (or a
list of tables, when the records hold several of its kind: ``gamma_width``'s). Its
docstring's first sentence is its description in ``python -m analysis.report --help``.
``analysis.tables`` imports every module of this package, so adding a table is one decorated
function in any of them (in a new module too); the report prints them in
``analysis.tables.REPORT_ORDER``.

``owns`` names runs that the table shows and the shared tables (Table 1, the paired
differences, the ablations, the GSM8K table) leave out, by a field each run records
(``analysis.collect.TASK_FIELDS``): ``@register_table(owns={"task_kind": "dialogue"})``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from analysis.collect import Collection
    from analysis.tables.formatting import Table

Builder = Callable[["Collection", str], "Table | list[Table] | None"]
#: Every table builder, by name (in the report's order once ``analysis.tables`` is imported).
TABLES: dict[str, Builder] = {}
#: Runs shown by a table of their own: a run field -> the values its tables own.
OWNED: dict[str, set[str]] = {}


def register_table(build: Builder | None = None, *, owns: dict[str, str] | None = None):
    """Register ``build`` as the table named after it; use as ``@register_table`` or
    ``@register_table(owns={"task_family": "llm_adapters"})``."""

    def register(function: Builder) -> Builder:
        name = function.__name__
        if name in TABLES and TABLES[name].__module__ != function.__module__:
            raise ValueError(f"two tables are named {name!r}: rename one builder.")
        TABLES[name] = function
        for field, value in (owns or {}).items():
            OWNED.setdefault(field, set()).add(value)
        return function

    return register if build is None else register(build)


def owned_by_a_table(runs: pd.DataFrame) -> pd.Series:
    """Which ``runs`` a table of their own shows (:data:`OWNED`)."""
    owned = pd.Series(False, index=runs.index)
    for field, values in OWNED.items():
        owned |= runs[field].isin(values)
    return owned
