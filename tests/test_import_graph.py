"""No import cycles among ditplan's modules (module- and function-level imports, read with ast)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("policy", "runtime", "profiler", "reference")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["ditplan", *parts])


def _runtime_imports(tree: ast.Module) -> list[ast.stmt]:
    """Import statements, leaving out ``if TYPE_CHECKING:`` blocks (annotations only)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return [n for n in ast.walk(tree)
            if isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in skipped]


def import_graph() -> nx.DiGraph:
    """Module -> the ditplan modules it imports (``from pkg import sub`` points at pkg.sub)."""
    modules = {module_name(p): p for top in PACKAGES for p in (ROOT / top).rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif node.module:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else node.module for a in node.names]
            else:
                targets = []
            graph.add_edges_from((name, t) for t in targets if t in modules and t != name)
    return graph


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and graph.number_of_edges() > 50
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_adapter_contract_imports_no_family():
    graph = import_graph()
    assert "ditplan.runtime.adapters.wan" not in graph["ditplan.runtime.adapters.base"]
    assert not any(t.startswith("ditplan.runtime.adapters") for t in
                   nx.descendants(graph, "ditplan.runtime.sparse"))
