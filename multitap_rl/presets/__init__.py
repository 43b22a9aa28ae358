"""Built-in presets shipped with the package (read with ``importlib.resources``, so they work from an
installed wheel): user **weights** presets (``weights/*.yaml``) and user-style **objective schemas**
(``objectives/*.yaml``). ``recipes/weights`` and ``recipes/objectives`` in a source checkout point here.

A directory named by ``MULTITAP_WEIGHTS_DIR`` / ``MULTITAP_OBJECTIVES_DIR`` is searched first, so
a team can add or override presets without touching the package. A file there that cannot be read
or parsed never hides the others: :func:`load_presets` returns the good presets and, separately,
each broken one with the error naming its file and field.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import TypeVar

from ..errors import ConfigError

__all__ = ["list_presets", "load_presets", "preset_text", "user_dir"]

T = TypeVar("T")

_KINDS = {"weights": "MULTITAP_WEIGHTS_DIR", "objectives": "MULTITAP_OBJECTIVES_DIR"}


def user_dir(kind: str) -> Path | None:
    """The directory ``MULTITAP_WEIGHTS_DIR`` (``kind="weights"``) or ``MULTITAP_OBJECTIVES_DIR``
    (``"objectives"``) names, if set."""
    value = os.environ.get(_KINDS[kind], "").strip()
    return Path(value).expanduser() if value else None


def _packaged(kind: str):
    return resources.files(__name__).joinpath(kind)


def list_presets(kind: str) -> list[str]:
    """Names of the ``kind`` presets: the user directory's, then the packaged ones (sorted, unique)."""
    names: list[str] = []
    d = user_dir(kind)
    if d is not None and d.is_dir():
        names += sorted(p.stem for p in d.glob("*.yaml") if p.is_file())
    names += sorted(e.name[: -len(".yaml")] for e in _packaged(kind).iterdir() if e.name.endswith(".yaml"))
    return list(dict.fromkeys(names))


def preset_text(kind: str, name: str) -> tuple[str, str] | None:
    """(where it came from, YAML text) of the ``kind`` preset ``name``, or None if there is none."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    d = user_dir(kind)
    if d is not None and (d / f"{name}.yaml").is_file():
        path = d / f"{name}.yaml"
        return str(path), _read(path, str(path))
    entry = _packaged(kind).joinpath(f"{name}.yaml")
    if entry.is_file():
        where = f"multitap_rl/presets/{kind}/{name}.yaml"
        return where, _read(entry, where)
    return None


def _read(entry, where: str) -> str:
    """The UTF-8 text of a preset file; a ``ConfigError`` naming it if it cannot be read."""
    try:
        return entry.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text ({exc.reason}); re-save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read ({exc.strerror or type(exc).__name__})") from None


def load_presets(names: Iterable[str], load: Callable[[str], T]) -> tuple[dict[str, T], dict[str, str]]:
    """``(good, broken)``: ``load(name)`` of each name that loads, and for each that raises a
    ``ConfigError`` its message (naming the file and field). One broken file hides no other."""
    good: dict[str, T] = {}
    broken: dict[str, str] = {}
    for name in names:
        try:
            good[name] = load(name)
        except ConfigError as exc:
            broken[name] = str(exc)
    return good, broken
