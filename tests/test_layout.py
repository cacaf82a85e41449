"""The package's layers, as docs/ARCHITECTURE.md states them: each imports only those below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Lowest first. A module may import its own layer and the layers before it, never after.
LAYERS = (
    (
        "pagedbatch.outputs",
        "pagedbatch.sampling_params",
        "pagedbatch.constraint",
        "pagedbatch.files",
    ),
    ("pagedbatch.kernels",),
    ("pagedbatch.models",),
    ("pagedbatch.engine",),
    ("pagedbatch.requests",),
    ("pagedbatch.llm", "pagedbatch.generator"),
    ("pagedbatch.inputs",),
    ("pagedbatch.plan",),
    ("pagedbatch.job",),
    ("pagedbatch.ray",),
    ("pagedbatch.bench",),
    ("pagedbatch.cli",),
    ("pagedbatch.__init__", "pagedbatch.__main__"),
)


def _modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "pagedbatch").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts).removesuffix(".__init__") or "pagedbatch"] = path
    for path in (ROOT / "kernels").rglob("*.py"):
        found[("pagedbatch.kernels." + path.stem).removesuffix(".__init__")] = path
    found["pagedbatch.__init__"] = found.pop("pagedbatch")
    return found


def _layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add it")


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n == "pagedbatch" or n.startswith("pagedbatch.")}


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_lower_layers(module: str) -> None:
    own = _layer(module)
    for name in _imports(MODULES[module], top_level_only=False):
        target = name if name in MODULES else name.rsplit(".", 1)[0]
        if target == "pagedbatch":
            target = "pagedbatch.__init__"
        assert _layer(target) <= own, f"{module} (layer {own}) imports {name} (layer above)"


def test_no_import_cycles() -> None:
    # Imports inside functions count too: a cycle through a deferred import is still one.
    graph = {
        m: {n for n in _imports(p, top_level_only=False) if n in MODULES and n != m}
        for m, p in MODULES.items()
    }
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join((*path, module))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_a_layer_violation_is_caught(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from pagedbatch.cli.common import fail\n")
    names = _imports(bad, top_level_only=False)
    assert "pagedbatch.cli.common" in names
    assert _layer("pagedbatch.cli.common") > _layer("pagedbatch.engine.engine")
