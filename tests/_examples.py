"""The example scripts as modules (tests call their ``main``/``parse_args``), and the tiny
text-to-image colour world they train in, built once per test session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
_WORLD: dict[str, str] = {}


def load_example(name: str):
    """``examples/<name>.py`` imported as a module (the examples folder on the path meanwhile)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLES))


def t2i_world_dir(tmp_path_factory) -> str:
    """The seeded tiny SD + judge of ``multitap_rl.world.t2i`` (seed 0), built on first use."""
    if "dir" not in _WORLD:
        from multitap_rl.world import t2i

        root = tmp_path_factory.mktemp("t2i-world")
        t2i.build_world(root, seed=0)
        _WORLD["dir"] = str(root)
    return _WORLD["dir"]
