"""How optorch reports a bad config: one error type, one way to show a value, one suggestion.

Every layer raises :class:`ConfigError` for a config it cannot use and words its messages with the
helpers here, so an unknown name reads the same wherever it is caught: the value as :func:`shown`
cuts it, then :func:`suggest`'s closest known name.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Sequence
from typing import Any

import pydantic

__all__ = ["ConfigError", "closest", "first_location", "problems", "shown", "suggest"]

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = _SHOWN.maxlong = 60
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 6


class ConfigError(ValueError):
    """A config dict or file that cannot be turned into an optimizer config. ``key`` is where in the
    config the problem is (a path of keys and list indices), when one key is at fault."""

    def __init__(self, message: str, key: Sequence[Any] = ()):
        super().__init__(message)
        self.key = tuple(key)


def shown(value: Any) -> str:
    """``repr(value)``, cut to a line: what an error message shows of a value, however large it is."""
    return _SHOWN.repr(value)


def closest(name: Any, known: Sequence[str]) -> str | None:
    """The one of ``known`` that ``name`` was most likely meant to be, or None when none is close."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return close[0] if close else None


def suggest(name: Any, known: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` with the closest of ``known`` to ``name``, or ``""``: one hint for every
    unknown key."""
    close = closest(name, known)
    return f" (did you mean {close!r}?)" if close is not None else ""


def problems(error: pydantic.ValidationError) -> str:
    """A ``pydantic.ValidationError`` in one line: ``lr: must be >= 0, got -1.0; betas.1: ...``."""
    parts = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] not in ("value_error", "missing", "model_type") and "input" in item:
            message += f", got {shown(item['input'])}"
        location = ".".join(map(str, item["loc"]))
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts)


def first_location(error: pydantic.ValidationError) -> tuple:
    """Where the first problem of ``error`` is: a path of keys and list indices (empty for the whole)."""
    errors = error.errors()
    return tuple(errors[0]["loc"]) if errors else ()
