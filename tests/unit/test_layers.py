"""The layers' import rules (issue #12, "the package layout tells the truth"):

- model/ (planemesh.model, the configuration model every layer shares) imports nothing of planemesh but itself;
- the kernel side (ebpf/, netplanes/) never imports the daemon's folder (planemesh.agent);
- translation (xds/) never imports the data plane (planemesh.agent.proxy).

Checked twice: on the source (every import statement, TYPE_CHECKING and function-local ones too) and by
importing the modules in a fresh interpreter and looking at what got loaded."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"model": "planemesh.model", "ebpf": "planemesh.ebpf", "netplanes": "planemesh.netplanes",
           "xds": "planemesh.xds", "agent": "planemesh.agent"}
# folder -> the planemesh packages it must not import (a prefix also forbids everything below it)
FORBIDDEN = {
    "model": ("planemesh.agent", "planemesh.ebpf", "planemesh.netplanes", "planemesh.xds", "planemesh.labs"),
    "ebpf": ("planemesh.agent",),
    "netplanes": ("planemesh.agent",),
    "xds": ("planemesh.agent.proxy",),
}


def imported_names(tree: ast.AST) -> list[tuple[str, int]]:
    """Every module an import statement names, `from a import b` counting as a.b too (b may be a module)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.module, node.lineno)]
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return out


def violations(folder: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name, line in imported_names(ast.parse(path.read_text())):
            for prefix in FORBIDDEN[folder]:
                if name == prefix or name.startswith(prefix + "."):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layer_imports_in_the_source(folder: str) -> None:
    assert not violations(folder)


def test_the_rules_see_real_imports(tmp_path: Path) -> None:  # the check above is not vacuous
    code = "from planemesh.agent.proxy import server\nimport planemesh.agent.daemon\nfrom planemesh.model import config"
    names = [n for n, _ in imported_names(ast.parse(code))]
    assert "planemesh.agent.proxy.server" in names and "planemesh.agent.daemon" in names
    assert "planemesh.model.config" in names
    assert any(n.startswith("planemesh.model.") for n, _ in imported_names(ast.parse((ROOT / "xds/translate.py")
                                                                                     .read_text())))


def _modules(folder: str) -> list[str]:
    return sorted(f"{FOLDERS[folder]}.{p.stem}" for p in (ROOT / folder).glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layer_imports_at_run_time(folder: str) -> None:
    """Import every module of the folder in a fresh interpreter: none of the forbidden packages gets loaded."""
    modules = _modules(folder)
    probe = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print('\\n'.join(m for m in sys.modules if m.startswith({FORBIDDEN[folder]!r})))\n"
    )
    out = subprocess.run([sys.executable, "-P", "-c", probe], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [], f"{folder}/ loads {out.stdout.split()}"
