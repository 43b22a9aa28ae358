"""Shared by the stored-reference comparison tests (transformers 4.46.1, remote code): the
stdlib-only tool module, the rebuild-or-skip rule for the tiny model the stored numbers were
computed for, and the two fixtures every such test module uses."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "reference_446.py"


def load_tool():
    """tools/reference_446.py as a module (it does not need transformers 4.46.1 to import)."""
    spec = importlib.util.spec_from_file_location("reference_446_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rebuilt_or_skip(stored: dict, out: Path, build, what: str, family: str, regenerate: str | None = None) -> Path:
    """Rebuild the tiny model with ``build(out)``; skip (naming the files that differ and the
    versions) when its bytes are not the fingerprinted ones the stored numbers belong to."""
    import tokenizers
    import torch
    import transformers

    build(out)
    info = stored["model"]
    got, want = load_tool().fingerprint(out), info["fingerprint"]
    if got["sha256"] != want["sha256"]:
        differ = sorted(k for k in set(got["files"]) | set(want["files"])
                        if got["files"].get(k) != want["files"].get(k))
        pytest.skip(
            f"the rebuilt seed-{info['seed']} {what} differs from the one the stored reference scores were computed for "
            f"(files {differ}); stored from {info.get('builder_versions')}, here torch {torch.__version__}, "
            f"tokenizers {tokenizers.__version__}, transformers {transformers.__version__}. "
            f"Regenerate: {regenerate or f'bash tools/regenerate_reference_446.sh {family}'}"
        )
    return out


def stored_fixtures(data: Path, build, what: str, family: str, regenerate: str | None = None):
    """(``stored``, ``model_dir``) module fixtures: the stored numbers in ``data``, and the tiny model
    they were computed for, rebuilt with ``build(out, **stored["model"]-derived kwargs)`` or skipped.
    ``build(out, info)`` gets the stored model info (seed, size, ...)."""

    @pytest.fixture(scope="module")
    def stored():
        return json.loads(data.read_text())

    @pytest.fixture(scope="module")
    def model_dir(stored, tmp_path_factory):
        """The tiny model the stored numbers were computed for, rebuilt; skip if its bytes differ."""
        info = stored["model"]
        return rebuilt_or_skip(stored, tmp_path_factory.mktemp(f"tiny_{family}_ref"), lambda out: build(out, info),
                               what, family, regenerate=regenerate)

    return stored, model_dir
