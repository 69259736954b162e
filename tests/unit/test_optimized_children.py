"""The product's processes run with -OO (planemesh.module_argv): no docstrings in memory (~0.8 MB of RSS per process,
bench/footprint.py) and no asserts. So nothing in the product may read a docstring (argparse descriptions are
constants) or need an assert to hold (the asserts left are `x is not None` narrowing for the type checker)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from planemesh import module_argv

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("agent", "model", "ebpf", "netplanes", "xds", "planemesh")  # labs/ are test tools, run without -OO


def _modules() -> list[tuple[str, ast.Module]]:
    return [
        (str(f.relative_to(ROOT)), ast.parse(f.read_text())) for d in FOLDERS for f in sorted((ROOT / d).rglob("*.py"))
    ]


def test_product_children_run_with_OO() -> None:
    argv = module_argv("planemesh.agent.worker_process", "--plane", "oam")
    assert argv[:4] == [sys.executable, "-P", "-OO", "-m"]
    assert argv[4:] == ["planemesh.agent.worker_process", "--plane", "oam"]


def test_no_product_module_reads_a_docstring() -> None:
    reads = [
        (name, node.lineno)
        for name, tree in _modules()
        for node in ast.walk(tree)
        if (isinstance(node, ast.Name) and node.id == "__doc__")
        or (isinstance(node, ast.Attribute) and node.attr == "__doc__")
        # lean_loop compares the doc it gave its own stand-in module at run time (ModuleType keeps it under -OO)
        if name != "agent/lean_loop.py"
    ]
    assert not reads, reads


def _narrowing(test: ast.expr) -> bool:
    """`x is not None`, or several of them joined with `and`."""
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return all(_narrowing(v) for v in test.values)
    return (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.IsNot)
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value is None)  # fmt: skip


def test_every_product_assert_is_only_none_narrowing() -> None:
    checks = [(name, node.lineno) for name, tree in _modules() for node in ast.walk(tree)
              if isinstance(node, ast.Assert) and not _narrowing(node.test)]  # fmt: skip
    assert not checks, f"-OO removes these asserts: make them real checks: {checks}"


@pytest.mark.parametrize("module", ["planemesh.agent.hbone", "planemesh.xds.server", "planemesh.agent.cli"])
def test_command_lines_build_their_help_under_OO(module: str) -> None:
    # The old hbone/xds-server parsers took their description from __doc__: None under -OO, so .split crashed.
    out = subprocess.run(module_argv(module, "--help"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_the_lean_loop_recognises_its_stand_in_under_OO() -> None:
    code = ("import planemesh.agent.worker_process, sys\n"
            "from planemesh.agent.lean_loop import loaded_without_ssl\n"
            "print(sys.flags.optimize, loaded_without_ssl())")  # fmt: skip
    out = subprocess.run([sys.executable, "-P", "-OO", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "True"], out.stderr


def test_the_systemd_unit_and_the_image_run_the_agent_with_OO_too() -> None:
    # The agent itself is started by `planemesh agent` (a console script): the environment carries the flag.
    unit = (ROOT / "systemd" / "planemesh-agent.service").read_text().splitlines()
    assert "Environment=PYTHONOPTIMIZE=2" in unit
    image = (ROOT / "deploy" / "Containerfile").read_text()
    assert "    PYTHONOPTIMIZE=2 \\" in image.splitlines()
    build = (ROOT / "deploy" / "build-image.sh").read_text()  # and the image has the .opt-2.pyc files -OO reads
    assert "compileall -q -j 0 -o 0 -o 2" in build and "/usr/lib/python$pyver /usr/lib/python3/dist-packages" in build
