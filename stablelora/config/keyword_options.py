"""Strict keyword options: a misspelled option is an error naming the valid ones, never a
silent fall-back to a default."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping


def check_options(given: Iterable[str], valid: Iterable[str], where: str) -> None:
    """Raise a one-line ValueError if ``given`` has a name that is not in ``valid``.

    ``where`` names the receiver in the message, e.g. ``"optimizer 'riemann'"``.
    """
    valid = list(valid)
    unknown = [name for name in given if name not in valid]
    if unknown:
        listed = ", ".join(valid) if valid else "none"
        raise ValueError(
            f"{where} has no option {', '.join(map(repr, unknown))}: its options are {listed}."
        )


def keyword_options(function: Callable, exclude: Iterable[str] = ()) -> list[str]:
    """The names ``function`` takes by keyword (in signature order), less ``exclude``."""
    exclude = set(exclude)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [
        name
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind in kinds and name not in exclude
    ]


def defaults(function: Callable, names: Iterable[str]) -> Mapping[str, object]:
    """The default values of ``function``'s parameters ``names`` (those that have one)."""
    parameters = inspect.signature(function).parameters
    return {
        name: parameters[name].default
        for name in names
        if parameters[name].default is not inspect.Parameter.empty
    }
