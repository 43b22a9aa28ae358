"""Dimension names: ``overall`` (the stage-1 head) and the rule every stage-2 dimension name follows."""

from __future__ import annotations

import re

from .errors import ConfigError

__all__ = ["OVERALL", "check_dimension_name", "is_dimension_name"]

OVERALL = "overall"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def is_dimension_name(name) -> bool:
    """Letters, digits, ``_``, ``.``, ``-``; not starting with a digit or punctuation."""
    return isinstance(name, str) and bool(_NAME.match(name))


def check_dimension_name(name, what: str = "dimension name", error: type[Exception] = ConfigError) -> str:
    """``name`` if it is a valid dimension name, else ``error`` saying what is allowed."""
    if not is_dimension_name(name):
        raise error(f"bad {what} {name!r} (letters, digits, '_', '.', '-'; not starting with a digit)")
    return name
