"""Imports run one way, from the model up to the CLI: an AST scan of every module of daybreak.

Each top-level unit (a subpackage or a module of `daybreak/`) sits on a layer; a unit may import
its own layer's units and those below, never one above, and the graph between units has no cycle.
"""

import ast
from pathlib import Path

import daybreak

SRC = Path(daybreak.__file__).parent

# lowest first; the package's own __init__ (the lazy public API) stands above everything
LAYERS = [
    {"errors", "compat", "images", "metrics", "devices", "schema"},
    {"io"},
    {"model"},
    {"diffusion"},
    {"recipe"},
    {"data", "text", "space", "optim"},
    {"config"},  # checks each value against the lists its owners below define
    {"build"},
    {"pipeline"},
    {"training"},
    {"evaluate", "export", "bench", "precompute"},
    {"run"},
    {"demo", "study"},
    {"cli", "__main__"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_units(path: Path) -> set[str]:
    """daybreak units a module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "daybreak" and len(parts) > 1:
                found.add(parts[1])
    return found & set(LAYER)


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        if path == SRC / "__init__.py":
            continue
        unit = unit_of(path)
        edges.setdefault(unit, set()).update(imported_units(path) - {unit})
    return edges


def test_every_unit_has_a_layer():
    assert set(graph()) <= set(LAYER), sorted(set(graph()) - set(LAYER))


def test_no_unit_imports_a_higher_layer():
    upward = [f"{u} imports {v}" for u, vs in graph().items() for v in vs if LAYER[v] > LAYER[u]]
    assert upward == []


def test_no_import_cycle_between_units():
    edges = graph()
    cycles, state = [], {}

    def visit(u, stack):
        state[u] = "open"
        for v in sorted(edges.get(u, ())):
            if state.get(v) == "open":
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v, stack + [v])
        state[u] = "done"

    for u in sorted(edges):
        if u not in state:
            visit(u, [u])
    assert cycles == []


def test_the_scan_sees_imports():
    """Guard against a scan that finds nothing: the trainer's known imports are seen."""
    edges = graph()
    assert {"build", "diffusion", "recipe", "io"} <= edges["training"]
    assert "training" in edges["run"] and "pipeline" in edges["evaluate"]
