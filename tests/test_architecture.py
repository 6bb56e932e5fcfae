"""The package graph of ``vargpt`` has no cycle, and no source file outgrows 500 lines.

Every import is read from the source (function-local ones too, since a lazy import is still a dependency), so
the test sees the real graph, not only what importing a package happens to execute. A top-level module
(``vargpt/config.py``) is a node of its own, like a package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "vargpt"
MAX_LINES = 500


def _node(path: Path) -> str:
    """The graph node a source file belongs to: its first-level package, or its own module name."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imported_nodes(path: Path) -> set[str]:
    """The first-level ``vargpt`` packages or modules a file imports, at any depth of the file."""
    nodes: set[str] = set()
    for stmt in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(stmt, ast.Import):
            names = [alias.name for alias in stmt.names]
        elif isinstance(stmt, ast.ImportFrom) and stmt.level == 0 and stmt.module:
            names = [stmt.module] + [f"{stmt.module}.{alias.name}" for alias in stmt.names]
            if stmt.module != "vargpt":
                names = [stmt.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "vargpt" and len(parts) > 1:
                nodes.add(parts[1])
    return nodes


def package_graph() -> dict[str, set[str]]:
    """``{node: nodes it imports}`` over ``src/vargpt``, self-edges left out."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue
        node = _node(path)
        graph.setdefault(node, set()).update(_imported_nodes(path) - {node})
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (depth-first search with a path stack)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_graph_has_no_cycle():
    graph = package_graph()
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle between vargpt packages: {' -> '.join(cycle)}"


# Each layer and the packages above it that it must never import (function-local imports included).
LAYERS = {
    "tokens": {"model", "data", "checkpoint", "inference", "training", "eval", "backbones", "preference"},
    "model": {"data", "inference", "training", "eval", "backbones", "preference"},
    "data": {"model", "checkpoint", "inference", "training", "eval", "backbones", "preference"},
    "inference": {"training", "eval", "backbones", "preference"},
    "training": {"backbones", "eval", "preference"},
    "eval": {"preference"},
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_lower_layers_do_not_import_upper_ones(layer):
    assert not package_graph().get(layer, set()) & LAYERS[layer]


def test_no_source_file_is_over_500_lines():
    long = {
        str(p.relative_to(SRC.parent)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these files by concern (over {MAX_LINES} lines): {long}"
