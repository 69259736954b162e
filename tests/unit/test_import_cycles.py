"""No import cycle among the product's modules (agent/, model/, ebpf/, netplanes/, xds/, labs/): every import
counts, TYPE_CHECKING and function-local ones too, as /work/shared/tools/import_cycles.py counts them. A lower
layer that calls back declares a typing.Protocol (agent/agent_protocols.py, agent/proxy/contracts.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("agent", "model", "ebpf", "netplanes", "xds", "labs")


def _module_name(path: Path) -> str:
    parts = ["planemesh", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))}


def _edges(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            candidates = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        for c in candidates:
            while c and c not in known:  # `from pkg.mod import name`: the longest known module prefix
                c = c.rpartition(".")[0]
            if c and c != name:
                out.add(c)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_the_product() -> None:
    modules = _modules()
    graph = {name: _edges(name, path, set(modules)) for name, path in modules.items()}
    assert "planemesh.agent.xds_source" in graph["planemesh.agent.daemon"]  # the edges are read
    assert not cycles(graph), cycles(graph)


def test_the_check_sees_a_cycle() -> None:  # not vacuous
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
