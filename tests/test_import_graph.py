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


def _imports(tree: ast.Module, type_checking: bool) -> list[ast.stmt]:
    """Import statements; ``if TYPE_CHECKING:`` blocks (annotations only) when asked."""
    skipped = set()
    for node in ast.walk(tree):
        if (not type_checking and isinstance(node, ast.If)
                and getattr(node.test, "id", None) == "TYPE_CHECKING"):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return [n for n in ast.walk(tree)
            if isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in skipped]


def import_graph(type_checking: bool = False) -> nx.DiGraph:
    """Module -> the ditplan modules it imports (``from pkg import sub`` points at pkg.sub)."""
    modules = {module_name(p): p for top in PACKAGES for p in (ROOT / top).rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for node in _imports(ast.parse(path.read_text()), type_checking):
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


# The runtime's layers (design note, section 1.1): a module imports only its own layer or
# layers above it (lower numbers). Runtime and profiler modules not named here are layer 6.
RUNTIME_LAYERS = {
    "ditplan.runtime.layout": 1,
    "ditplan.runtime.permutation": 2,
    "ditplan.runtime.context": 2,
    "ditplan.runtime.sparse": 3,
    "ditplan.runtime.parallel": 3,
    "ditplan.runtime.adapters.base": 4,
    "ditplan.runtime.adapters.joint": 4,  # what the joint-attention families share
}
FAMILY_LAYER = 5


def runtime_layer(module: str) -> int | None:
    """The layer of a runtime or profiler module; None for other packages."""
    if module.startswith("ditplan.runtime.kernels"):
        return 0
    if module in RUNTIME_LAYERS:
        return RUNTIME_LAYERS[module]
    if module.startswith("ditplan.runtime.adapters."):
        return FAMILY_LAYER
    if module.startswith(("ditplan.runtime", "ditplan.profiler")):
        return 6
    return None


def test_runtime_modules_import_no_layer_below_their_own():
    graph = import_graph(type_checking=True)  # annotations count: they name a dependency
    layered = [(a, b) for a, b in graph.edges
               if runtime_layer(a) is not None and runtime_layer(b) is not None]
    assert len(layered) > 40
    upward = [(a, b) for a, b in layered if runtime_layer(b) > runtime_layer(a)]
    assert not upward, f"imports of a lower layer: {upward}"


def test_only_the_registry_reaches_a_family_adapter():
    graph = import_graph(type_checking=True)
    families = [m for m in graph if runtime_layer(m) == FAMILY_LAYER]
    assert "ditplan.runtime.adapters.wan" in families
    importers = {a for a, b in graph.edges if b in families and runtime_layer(a) is not None}
    assert not importers, f"modules importing a family adapter: {sorted(importers)}"
