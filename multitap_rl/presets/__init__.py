"""Built-in presets shipped with the package (read with ``importlib.resources``, so they work from an
installed wheel): user **weights** presets (``weights/*.yaml``) and user-style **objective schemas**
(``objectives/*.yaml``). ``recipes/weights`` and ``recipes/objectives`` in a source checkout point here.

A directory named by ``MULTITAP_WEIGHTS_DIR`` / ``MULTITAP_OBJECTIVES_DIR`` is searched first, so
a team can add or override presets without touching the package.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

__all__ = ["list_presets", "preset_text", "user_dir"]

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
        names += sorted(p.stem for p in d.glob("*.yaml"))
    names += sorted(e.name[: -len(".yaml")] for e in _packaged(kind).iterdir() if e.name.endswith(".yaml"))
    return list(dict.fromkeys(names))


def preset_text(kind: str, name: str) -> tuple[str, str] | None:
    """(where it came from, YAML text) of the ``kind`` preset ``name``, or None if there is none."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    d = user_dir(kind)
    if d is not None and (d / f"{name}.yaml").is_file():
        path = d / f"{name}.yaml"
        return str(path), path.read_text(encoding="utf-8")
    entry = _packaged(kind).joinpath(f"{name}.yaml")
    if entry.is_file():
        return f"multitap_rl/presets/{kind}/{name}.yaml", entry.read_text(encoding="utf-8")
    return None
