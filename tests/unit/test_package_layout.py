"""`import xds` is xds-protos' package, in the test runner and in the processes the agent runs as: the repository
root (whose xds/ folder is planemesh.xds) is never on sys.path (issue #12; xds/__init__.py no longer patches
sys.modules)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import planemesh.xds
from planemesh import module_argv

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(sysconfig.get_paths()["purelib"]).resolve()
PROBE = "import sys, xds; import envoy.config.core.v3.base_pb2; print(xds.__path__[0]); print(sys.path)"


def _env_as_an_operator_has_it() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # tests/conftest.py sets it


def test_the_test_runner_imports_xds_protos() -> None:
    from envoy.config.core.v3 import base_pb2  # noqa: F401  (imports xds.core.v3)

    import xds

    assert Path(xds.__path__[0]).resolve().is_relative_to(SITE), xds.__path__
    assert all(Path(p or os.getcwd()).resolve() != ROOT for p in sys.path), sys.path
    assert Path(planemesh.xds.__path__[0]).resolve() == ROOT / "xds"  # ours, by its own name


def test_the_xds_folder_is_a_plain_package() -> None:  # no sys.modules or sys.path patching left
    body = ast.parse((ROOT / "xds" / "__init__.py").read_text()).body
    assert len(body) == 1 and isinstance(body[0], ast.Expr), "xds/__init__.py holds only its docstring"


def test_a_module_argv_child_started_in_the_checkout_imports_xds_protos() -> None:
    """How the agent starts its workers and the labs start the agent: planemesh.module_argv, from any directory
    (here the checkout, the worst case), without the test runner's PYTHONSAFEPATH."""
    out = subprocess.run([*module_argv("planemesh.agent.cli", "xds-server", "--help")], cwd=ROOT,
                         env=_env_as_an_operator_has_it(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr  # planemesh.xds.server imports the Envoy API (and with it xds.core)
    probe = subprocess.run([sys.executable, "-P", "-c", PROBE], cwd=ROOT, env=_env_as_an_operator_has_it(),
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.splitlines()[0]).resolve().is_relative_to(SITE)


def test_without_minus_p_the_checkout_would_hide_xds_protos() -> None:  # why module_argv passes -P
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=_env_as_an_operator_has_it(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "xds" in out.stderr


def test_the_console_script_imports_xds_protos() -> None:  # systemd and the DaemonSet run `planemesh agent`
    script = Path(sys.executable).with_name("planemesh")
    out = subprocess.run([str(script), "xds-server", "--help"], cwd=ROOT, env=_env_as_an_operator_has_it(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_python_minus_m_bench_in_the_checkout_imports_xds_protos() -> None:  # bench/__init__.py
    probe = "import bench, tests.support.procs, sys, xds; print(xds.__path__[0]); print(sys.path)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=_env_as_an_operator_has_it(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.splitlines()[0]).resolve().is_relative_to(SITE)
    assert all(Path(p or ROOT).resolve() != ROOT for p in ast.literal_eval(out.stdout.splitlines()[1]))


def test_run_module_runs_a_checkout_module_off_sys_path() -> None:  # ./run.sh bench, fuzz children
    from tests.support.procs import dev_module_argv

    out = subprocess.run(dev_module_argv("bench"), cwd=ROOT, env=_env_as_an_operator_has_it(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "NAME is one of" in out.stderr, out.stderr  # bench's usage, not an ImportError


def test_every_product_package_is_in_the_wheel() -> None:
    """pyproject's package list is what a wheel (the image, a pip install) holds: agent/hbone, agent/tls and
    agent/workloads were missing, so the image's agent died on `import planemesh.agent.hbone` while the editable
    checkout (whose finder maps folders) worked."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for name, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "__pycache__" not in rel.parts:
                found.add(".".join([name, *rel.parts]))
    assert found <= listed, f"missing from pyproject's packages: {sorted(found - listed)}"
