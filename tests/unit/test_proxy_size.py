"""agent/proxy/ stays readable (issue 12, STYLE.md): no module over MAX_MODULE_LINES, no function over
MAX_FUNCTION_LINES, no import inside a function or class body (except the lazy third-party imports named in LAZY,
each with its reason), and no mixin that declares its host's state (composition instead). A module grows past
these limits by splitting it into single-job modules."""

from __future__ import annotations

import ast
from pathlib import Path

PROXY = Path(__file__).resolve().parents[2] / "agent" / "proxy"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# Imported where used, on purpose: cryptography costs every worker ~9 MB of RSS, and only planes with TLS need it
# (agent/identity/ca.py imports it at module level).
LAZY = {"cryptography", "planemesh.agent.identity.ca"}


def _modules() -> list[tuple[Path, ast.Module, int]]:
    out = []
    for f in sorted(PROXY.glob("*.py")):
        text = f.read_text()
        out.append((f, ast.parse(text), text.count("\n")))
    return out


def _long_functions(tree: ast.Module) -> list[tuple[str, int]]:
    return [
        (node.name, node.end_lineno - node.lineno + 1)  # type: ignore[operator]
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES  # type: ignore[operator]
    ]


def _nested_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """Imports inside a function or class body (module-level `if TYPE_CHECKING:` blocks are fine)."""
    found = []
    for scope in ast.walk(tree):
        if not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for node in ast.walk(scope):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or "."]
            else:
                continue
            found += [(node.lineno, n) for n in names if n not in LAZY and n.split(".")[0] not in LAZY]
    return found


def _late_imports(tree: ast.Module) -> list[int]:
    """Module-level imports after the first class or function (a bottom-of-module import hides a cycle)."""
    seen_def = False
    late = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            seen_def = True
        elif seen_def and isinstance(node, (ast.Import, ast.ImportFrom)):
            late.append(node.lineno)
    return late


def _mixins(tree: ast.Module) -> list[str]:
    """Classes with `__slots__ = ()` that annotate attributes (state their host class declares and holds), or that
    declare their host's methods under `if TYPE_CHECKING:`: the mixin pattern the Exchange used to be built of."""
    found = []
    for cls in ast.walk(tree):
        if not isinstance(cls, ast.ClassDef) or any(ast.unparse(b).endswith("Protocol") for b in cls.bases):
            continue
        empty_slots = any(
            isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__slots__" for t in n.targets)
            and isinstance(n.value, ast.Tuple) and not n.value.elts
            for n in cls.body
        )
        annotated = any(isinstance(n, ast.AnnAssign) and n.value is None for n in cls.body)
        stubs = any(isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING" for n in cls.body)
        if (empty_slots and annotated) or stubs:
            found.append(cls.name)
    return found


def test_no_mixin_declares_its_hosts_state() -> None:
    mixins = [(f.name, name) for f, tree, _ in _modules() for name in _mixins(tree)]
    assert not mixins, mixins


def test_no_module_over_the_limit() -> None:
    big = [(f.name, n) for f, _, n in _modules() if n > MAX_MODULE_LINES]
    assert not big, big


def test_no_function_over_the_limit() -> None:
    long = [(f.name, name, n) for f, tree, _ in _modules() for name, n in _long_functions(tree)]
    assert not long, long


def test_no_function_local_or_late_imports() -> None:
    nested = [(f.name, line, name) for f, tree, _ in _modules() for line, name in _nested_imports(tree)]
    late = [(f.name, line) for f, tree, _ in _modules() for line in _late_imports(tree)]
    assert not nested and not late, (nested, late)


def test_the_checks_see_violations() -> None:  # the walkers above find what they look for
    tree = ast.parse("def f():\n    import os\n" + "    x = 1\n" * 90 + "class C:\n    pass\nimport sys\n")
    assert _long_functions(tree) == [("f", 92)]
    assert _nested_imports(tree) == [(2, "os")]
    assert _late_imports(tree) == [95]
    mixin = "class M:\n    __slots__ = ()\n    ds: object\nclass S:\n    if TYPE_CHECKING:\n        def f(self): ...\n"
    assert _mixins(ast.parse(mixin)) == ["M", "S"]
    assert _mixins(ast.parse("class P(Protocol):\n    __slots__ = ()\n    ds: object\n")) == []
