"""The package's shape: no import cycle (module-level, function-level and TYPE_CHECKING imports all
count), test helpers in ``multitap_rl.testing``, structured errors, public names visible to tools,
and no citation of a document outside the repository."""

import ast
import pickle
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("multitap_rl", "reward_fns")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every package module ``name`` imports, anywhere in the file (a ``from X import y`` that names a
    submodule ``X.y`` counts as importing it)."""
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def test_no_import_cycle_anywhere_in_the_packages():
    mods = _modules()
    known = set(mods)
    graph = {m: _imports(m, p, known) for m, p in mods.items()}
    # A package's __init__ importing its own submodules is how re-exports work; a cycle through it
    # still counts when a submodule imports the package back.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_private_helper_modules_at_the_top_of_the_package():
    top = sorted(p.name for p in (ROOT / "multitap_rl").glob("*.py"))
    assert not [n for n in top if n.startswith(("_tiny", "_reference", "_shapes"))], top
    assert (ROOT / "multitap_rl" / "testing" / "__init__.py").is_file()


def test_testing_keeps_every_public_name():
    import multitap_rl.testing as testing

    expected = {
        "LLAMA32_VISION_CHAT_TEMPLATE", "MllamaReferenceScorer", "QWEN2_VL_CHAT_TEMPLATE", "QWEN_SPECIAL_TOKENS",
        "ReferenceScorer", "SHAPE_ATTRIBUTES", "SHAPE_COLORS", "SHAPE_KINDS", "SHAPE_POSITIONS", "ShapeScene",
        "TINY_SD_PROMPTS", "build_tiny_mllama", "build_tiny_mllama_multitap", "build_tiny_multitap",
        "build_tiny_qwen2_vl", "build_tiny_stable_diffusion", "draw_shapes_image", "make_image", "make_shapes_dataset",
        "make_shapes_pairs", "make_shapes_records", "shape_caption", "tiny_qwen2_vl_config",
        "tiny_stable_diffusion_pipeline",
    }
    assert expected <= set(testing.__all__)
    for name in expected:
        assert getattr(testing, name) is not None


def test_sample_error_is_structured_named_and_picklable():
    from multitap_rl.errors import DataError, MultiTapError, SampleError

    e = SampleError(3, "image", "file not found: a.png")
    assert (e.index, e.field, e.message) == (3, "image", "file not found: a.png")
    assert str(e) == "image 3: file not found: a.png"
    assert isinstance(e, MultiTapError) and isinstance(e, DataError) and isinstance(e, ValueError)
    row = e.at(7, unit="row", source="rows.jsonl")
    assert str(row) == "rows.jsonl: row 7: image: file not found: a.png" and row.index == 7
    back = pickle.loads(pickle.dumps(row))
    assert str(back) == str(row) and back.index == 7 and back.field == "image"


def test_every_lazy_public_name_resolves_and_is_declared_for_type_checkers():
    import multitap_rl
    import multitap_rl.training
    import reward_fns

    for mod in (multitap_rl, multitap_rl.training, reward_fns):
        source = Path(mod.__file__).read_text()
        block = source[source.index("if TYPE_CHECKING:"):]
        for name in mod.__all__:
            if name == "__version__":
                continue
            assert getattr(mod, name) is not None
            assert re.search(rf"\b{name}\b", block), f"{mod.__name__}.{name} is not in the TYPE_CHECKING block"
    assert multitap_rl.Weights.parse("overall=1").names == ("overall",)
    assert "overall" in multitap_rl.list_presets("weights")


def test_nothing_cites_a_document_outside_the_repository():
    hits = []
    for pkg in (*PACKAGES, "tests", "examples", "benchmarks", "tools"):
        for p in (ROOT / pkg).rglob("*.py"):
            if p.resolve() != Path(__file__).resolve() and re.search(r"DESIGN\s*§|DESIGN\.md|shared/DESIGN", p.read_text()):
                hits.append(str(p.relative_to(ROOT)))
    assert not hits, hits
    assert (ROOT / "docs" / "ARCHITECTURE.md").is_file()
