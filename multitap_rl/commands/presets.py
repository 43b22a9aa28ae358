"""``multitap-rl presets``: the weights presets and objective schemas that ship with the package
(and any in ``MULTITAP_WEIGHTS_DIR`` / ``MULTITAP_OBJECTIVES_DIR``), with their dimensions."""

from __future__ import annotations

import json

from ._common import emit


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")


def run(args) -> int:
    from ..combiner import Weights
    from ..presets import list_presets
    from ..schemas import list_schemas, load_schema

    weights = {name: Weights.parse(name).as_dict() for name in list_presets("weights")}
    schemas = {}
    for name in list_schemas():
        s = load_schema(name)
        cols = sorted({c for v in s.samples for c in (v.image, v.text, v.question) if c}
                      | {d.source(v.tag) for v in s.samples for d in s.dimensions})
        schemas[name] = {"task": s.task, "dimensions": list(s.names), "columns": cols}
    if args.json:
        emit(json.dumps({"weights": weights, "schemas": schemas}, indent=1))
        return 0
    emit("weights presets (--weights NAME):")
    for name, w in weights.items():
        emit(f"  {name:<20} " + ", ".join(f"{k}={v:g}" for k, v in w.items()))
    emit("\nobjective schemas (--schema NAME): task, dimensions; columns each data row needs")
    for name, s in schemas.items():
        dims = ", ".join(s["dimensions"]) or "(none: features only)"
        emit(f"  {name:<20} {s['task']:<12} {dims}\n  {'':<20} columns: {', '.join(s['columns'])}")
    return 0
