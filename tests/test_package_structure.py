"""The package's import graph: no cycles (lazy, function-level imports included: they are cycles of responsibility
too, e.g. build <-> runner once), and ``ovseg_lab/data`` stays below the models, the Lightning modules and the runner
(directly or through anything it imports)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ovseg_lab"
# what ovseg_lab/data may never reach: code that runs models, trains, or writes run folders
ABOVE_DATA = (
    "ovseg_lab.models",
    "ovseg_lab.lit",
    "ovseg_lab.runner",
    "ovseg_lab.build",
    "ovseg_lab.cli",
    "ovseg_lab.ovseg_chain",
    "ovseg_lab.pipeline",
    "ovseg_lab.tools",
    "ovseg_lab.clip",
    "ovseg_lab.demo",
    "ovseg_lab.checkpoints",
)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the ovseg_lab modules it imports (any depth in the file, relative imports resolved)."""
    modules = {}
    for path in package.rglob("*.py"):
        rel = path.relative_to(package.parent).with_suffix("")
        modules[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        package_name = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package_name.split(".")[: len(package_name.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                candidates = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            targets |= {owner(c) for c in candidates if c.startswith("ovseg_lab")}
        graph[name] = targets - {name, ""}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_walker_sees_a_cycle_and_a_layer_breach(tmp_path):
    package = tmp_path / "ovseg_lab"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "__init__.py").write_text("")
    (package / "build.py").write_text("def f():\n    from ovseg_lab.runner import g\n")
    (package / "runner.py").write_text("from ovseg_lab import build\n")
    (package / "data" / "pairs.py").write_text("from . import loader\n")
    (package / "data" / "loader.py").write_text("def h():\n    from ..runner import g\n")
    graph = import_graph(package)
    assert cycles(graph) == [["ovseg_lab.build", "ovseg_lab.runner"]]
    assert "ovseg_lab.runner" in reachable(graph, "ovseg_lab.data.pairs")


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_data_imports_nothing_above_it():
    graph = import_graph()
    breaches = {
        name: sorted(m for m in reachable(graph, name) if m.startswith(ABOVE_DATA))
        for name in graph
        if name.startswith("ovseg_lab.data")
    }
    assert {k: v for k, v in breaches.items() if v} == {}
