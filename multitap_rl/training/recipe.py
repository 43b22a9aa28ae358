"""Dataclass-backed YAML recipes: a YAML file is an instance of a (nested) config dataclass.

``load_recipe(Stage1Config, "recipe.yaml", ["train.learning_rate=1e-5"])`` reads the file, applies
``section.key=value`` overrides (values parsed as YAML), checks every key and type, and returns
the dataclass. Unknown keys and wrong types are a ``ConfigError`` naming the key (with a
suggestion for typos); nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..yamlio import load_yaml_file

__all__ = ["config_to_dict", "load_recipe", "parse_overrides", "save_recipe"]


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    """``["a.b=1", "c=[x, y]"]`` -> ``{"a": {"b": 1}, "c": ["x", "y"]}`` (values are YAML)."""
    import yaml

    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. train.learning_rate=1e-5)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: bad key {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is set both as a value and a section")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    """``value`` checked against the annotation ``tp`` (lenient only where YAML is: ints for
    floats, "1e-5" strings for floats, lists for tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is typing.Literal:
        if isinstance(value, bool) and ("yes" if value else "no") in args:
            value = "yes" if value else "no"  # YAML 1.1 reads a bare no/yes as a boolean
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {type(value).__name__}")
        return _build(tp, value, where + ".")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _build(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; known: {', '.join(fields)}"
            raise ConfigError(f"unknown key {where + str(key)!r}{hint}")
    kwargs = {key: _coerce(value, hints[key], where + key) for key, value in data.items()}
    # sections left out of the file still get their defaults (built from a default factory)
    return cls(**kwargs)


def load_recipe(cls, source: str | os.PathLike | dict | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """An instance of dataclass ``cls`` from a YAML file (or a dict), with overrides applied.

    Raises ``ConfigError`` naming the file and key for unknown keys, wrong types and values the
    dataclass's own validation rejects."""
    label = "recipe"
    if source is None:
        data = {}
    elif isinstance(source, dict):
        data = source
    else:
        path = Path(os.fspath(source))
        label = str(path)
        if not path.is_file():
            raise ConfigError(f"recipe {label}: no such file")
        data = load_yaml_file(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {label}: expected a mapping at the top level, got {type(data).__name__}")
    data = _merge(data, parse_overrides(list(overrides)))
    try:
        return _build(cls, data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{label}: {exc}") from None


def config_to_dict(obj) -> dict:
    """A dataclass as plain YAML-able data (tuples become lists)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(obj)


def save_recipe(obj, path: str | os.PathLike, header: str = "") -> Path:
    """Write a dataclass as YAML (round-trips through :func:`load_recipe`)."""
    import yaml

    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(obj), sort_keys=False, default_flow_style=None)
    comment = "".join(f"# {line}\n" for line in header.splitlines()) if header else ""
    path.write_text(comment + text)
    return path
