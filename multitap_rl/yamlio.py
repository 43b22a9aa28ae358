"""Reading the YAML users write (weights, schemas, recipes): strictly UTF-8, ``yaml.safe_load``
only (no tags run code), and one-line :class:`~multitap_rl.errors.ConfigError` naming the file."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

__all__ = ["load_yaml_file", "load_yaml_text"]


def load_yaml_text(text: str, where: str):
    """The YAML document ``text`` (``where`` names it in errors)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None


def load_yaml_file(path: str | os.PathLike):
    """The YAML document in the file ``path``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc.reason}); re-save it as UTF-8") from None
    return load_yaml_text(text, str(p))
