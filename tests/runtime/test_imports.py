"""The runtime package's modules import each other without a cycle (type-checking imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    """Every runtime.* module a file imports, including imports only made for type checking."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("runtime"):
            out.add(node.module if node.module != "runtime" else f"runtime.{node.names[0].name}")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("runtime."))
    return out


def test_the_runtime_package_has_no_import_cycle() -> None:
    graph = {f"runtime.{f.stem}": _imports(f) for f in (ROOT / "runtime").glob("*.py") if f.stem != "__init__"}

    def visit(mod: str, path: list[str]) -> None:
        if mod in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(mod):], mod]))
        for dep in graph.get(mod, ()):
            visit(dep, [*path, mod])

    for mod in graph:
        visit(mod, [])
