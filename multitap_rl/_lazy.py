"""Lazy public names for package ``__init__`` modules: importing the package stays cheap (the CLI's
``--help`` does not import torch); each name loads its module on first use."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable

__all__ = ["lazy_exports"]


def lazy_exports(package: str, table: dict[str, str], names: Iterable[str]) -> tuple[Callable, Callable]:
    """(``__getattr__``, ``__dir__``) for the module ``package``: ``table`` maps a public name to the
    relative module that defines it."""
    names = list(names)

    def __getattr__(name: str):
        if name in table:
            return getattr(importlib.import_module(table[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__
