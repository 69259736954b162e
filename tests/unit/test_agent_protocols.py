"""agent/daemon.py's Agent provides everything agent/agent_protocols.py says the glue modules (admin_glue.py,
xds_source.py) use: each protocol attribute is set in Agent.__init__, each protocol method is an Agent method with
the same parameters. Read from the source: building an Agent opens cgroups and BPF."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from planemesh.agent.agent_protocols import AgentForAdmin, AgentForXds
from planemesh.agent.daemon import Agent

DAEMON = Path(inspect.getfile(Agent))


def _members(protocol: type) -> tuple[set[str], dict[str, list[str]]]:
    """The protocol's attributes and its methods (name -> parameter names)."""
    attrs = set(protocol.__annotations__)
    methods = {
        name: list(inspect.signature(fn).parameters)
        for name, fn in vars(protocol).items()
        if inspect.isfunction(fn) and not name.startswith("_")
    }
    return attrs, methods


def _init_attributes(source: str, cls: str) -> set[str]:
    """`self.x = ...` / `self.x: T = ...` targets in the class's __init__ (a chained `self.a = self.b = ...` too)."""
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    found = set()
    for stmt in ast.walk(init):
        if isinstance(stmt, ast.Assign):
            targets = stmt.targets
        else:
            targets = [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                found.add(t.attr)
    return found


def _missing(protocol: type, cls: type, source: str) -> list[str]:
    attrs, methods = _members(protocol)
    have = _init_attributes(source, cls.__name__)
    out = [f"attribute {a}" for a in sorted(attrs - have)]
    for name, params in sorted(methods.items()):
        fn = getattr(cls, name, None)
        if not callable(fn):
            out.append(f"method {name}")
        elif list(inspect.signature(fn).parameters)[: len(params)] != params:
            out.append(f"method {name}{params} != {list(inspect.signature(fn).parameters)}")
    return out


@pytest.mark.parametrize("protocol", [AgentForAdmin, AgentForXds])
def test_the_agent_provides_what_its_glue_uses(protocol: type) -> None:
    assert not _missing(protocol, Agent, DAEMON.read_text())


def test_the_glue_modules_do_not_import_the_daemon() -> None:
    for name in ("admin_glue.py", "xds_source.py", "agent_protocols.py"):
        tree = ast.parse((DAEMON.parent / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "planemesh.agent.daemon" not in imported, name


class _Half:  # provides some of each protocol only
    def __init__(self) -> None:
        self.options = self.snapshot = None
        self.interfaces: dict[int, object] = {}

    def healthy(self) -> bool:
        return True

    def spawn(self, coro: object) -> None:  # a parameter short
        pass


def test_the_check_sees_a_missing_member() -> None:  # not vacuous
    source = inspect.getsource(_Half)
    missing = _missing(AgentForAdmin, _Half, source)
    assert "attribute kernel" in missing and "attribute worker_stats" in missing
    assert "attribute options" not in missing and "attribute interfaces" not in missing
    assert "method healthy" not in missing
    missing = _missing(AgentForXds, _Half, source)
    assert "method apply" in missing and any(m.startswith("method spawn[") for m in missing)
