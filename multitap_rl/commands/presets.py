"""``multitap-rl presets``: the weights presets and objective schemas that ship with the package
(and any in ``MULTITAP_WEIGHTS_DIR`` / ``MULTITAP_OBJECTIVES_DIR``), with their dimensions.

A preset file that cannot be read or parsed does not hide the others: each good preset is listed,
and each broken one is named on stderr (one warning line with its file and field) and, with
``--json``, under ``"broken"``."""

from __future__ import annotations

import json
import sys

from ._common import emit


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")


def _schema_entry(name: str) -> dict:
    """Task, dimensions and the columns each data row needs, of the schema preset ``name``."""
    from ..errors import ConfigError
    from ..schemas import preset_schema

    s = preset_schema(name)
    if s is None:  # listed a moment ago, removed since
        raise ConfigError(f"schema preset {name!r} is gone")
    cols = sorted({c for v in s.samples for c in (v.image, v.text, v.question) if c}
                  | {d.source(v.tag) for v in s.samples for d in s.dimensions})
    return {"task": s.task, "dimensions": list(s.names), "columns": cols}


def run(args) -> int:
    from ..combiner import Weights
    from ..presets import list_presets, load_presets
    from ..schemas import list_schemas

    weights, broken_weights = load_presets(list_presets("weights"), lambda n: Weights.preset(n).as_dict())
    schemas, broken_schemas = load_presets(list_schemas(), _schema_entry)
    for kind, broken in (("weights preset", broken_weights), ("objective schema", broken_schemas)):
        for name, message in broken.items():
            print(f"multitap-rl presets: warning: {kind} {name!r} is broken and not listed: {message}",
                  file=sys.stderr)
    if args.json:
        emit(json.dumps({"weights": weights, "schemas": schemas,
                         "broken": {"weights": broken_weights, "schemas": broken_schemas}}, indent=1))
        return 0
    emit("weights presets (--weights NAME):")
    for name, w in weights.items():
        emit(f"  {name:<20} " + ", ".join(f"{k}={v:g}" for k, v in w.items()))
    emit("\nobjective schemas (--schema NAME): task, dimensions; columns each data row needs")
    for name, s in schemas.items():
        dims = ", ".join(s["dimensions"]) or "(none: features only)"
        emit(f"  {name:<20} {s['task']:<12} {dims}\n  {'':<20} columns: {', '.join(s['columns'])}")
    return 0
