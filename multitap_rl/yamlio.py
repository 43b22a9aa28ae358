"""Reading the YAML users write (weights, schemas, recipes): strictly UTF-8, ``yaml.safe_load``
semantics only (no tags run code), a key written twice in one mapping is an error (plain YAML
loaders keep the last one silently), and one-line :class:`~multitap_rl.errors.ConfigError` naming
the file."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

__all__ = ["load_yaml_file", "load_yaml_text"]

_LOADER = None


def _unique_key_loader():
    """A ``yaml.SafeLoader`` subclass that refuses a key repeated in one mapping (merge keys
    ``<<`` may still be overridden, as YAML defines)."""
    global _LOADER
    if _LOADER is None:
        import yaml

        class UniqueKeyLoader(yaml.SafeLoader):
            def construct_mapping(self, node, deep=False):
                if isinstance(node, yaml.MappingNode):
                    seen = set()
                    for key_node, _ in node.value:
                        if key_node.tag == "tag:yaml.org,2002:merge":
                            continue
                        key = self.construct_object(key_node, deep=True)
                        try:
                            repeated = key in seen
                        except TypeError:  # an unhashable key: the base loader names that problem
                            continue
                        if repeated:
                            raise yaml.constructor.ConstructorError(
                                None, None, f"key {key!r} appears twice in one mapping (line "
                                            f"{key_node.start_mark.line + 1})", key_node.start_mark)
                        seen.add(key)
                return super().construct_mapping(node, deep=deep)

        _LOADER = UniqueKeyLoader
    return _LOADER


def load_yaml_text(text: str, where: str):
    """The YAML document ``text`` (``where`` names it in errors)."""
    import yaml

    try:
        return yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 -- a SafeLoader subclass
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
