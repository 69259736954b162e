"""agent/proxy/ imports as a tree: no cycle among its modules (every import counts, TYPE_CHECKING ones too), and
no module imports another proxy module inside a function. Lower layers call back through contracts.py's
Protocols instead."""

from __future__ import annotations

import ast
from pathlib import Path

PROXY = Path(__file__).resolve().parents[2] / "agent" / "proxy"
PREFIX = "planemesh.agent.proxy."


def _imports(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out += [(n[len(PREFIX):], node) for n in names if n.startswith(PREFIX)]
        elif isinstance(node, ast.Import):
            out += [(a.name[len(PREFIX):], node) for a in node.names if a.name.startswith(PREFIX)]
    return out


def _graph() -> dict[str, set[str]]:
    modules = {f.stem for f in PROXY.glob("*.py")}
    graph = {}
    for f in PROXY.glob("*.py"):
        targets = {name for name, _ in _imports(ast.parse(f.read_text()))}
        graph[f.stem] = {t for t in targets if t in modules and t != f.stem}
    return graph


def test_no_import_cycle_in_agent_proxy() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_no_function_local_proxy_imports() -> None:
    local = []
    for f in PROXY.glob("*.py"):
        tree = ast.parse(f.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                local += [f"{f.name}:{node.lineno} {name}" for name, node in _imports(fn)]
    assert not local, local


def test_the_graph_is_read() -> None:  # the checks above look at real edges
    graph = _graph()
    assert "pipeline" in graph["exchange"] and "attempts" in graph["h2_stream"] and "h2_support" in graph["attempts"]
