"""Test tiers, as pyroute2 and ztunnel do: unit (default, no root), bpf, netns.

Locally a privileged test may skip with a reason. Under CI=true a skipped privileged test is a
failure: root tests must never silently "pass" without root.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path

import pytest

from tests.support import watchdog
from tests.support.procs import register_package

# The repository root never goes on sys.path (its xds/ folder would hide xds-protos' `xds`): pytest imports
# tests/ by location (--import-mode=importlib in pyproject.toml); `python -m pytest` puts the working directory
# first, so it goes again here, before any test imports anything; and every Python child of a test starts
# without its working directory on sys.path (PYTHONSAFEPATH, Python's -P). tests/unit/test_package_layout.py.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != ROOT]
os.environ["PYTHONSAFEPATH"] = "1"
register_package("bench")  # some tests reuse a benchmark's harness (bench/common.py)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PRIVILEGED_MARKS = ("bpf", "netns")

# One prefix per test run: namespaces and pinned objects carry it, so an aborted run never
# collides with the next one, and leftovers are recognisable.
RUN_PREFIX = os.environ.get("PM_RUN_PREFIX") or f"pt{secrets.token_hex(2)}"
os.environ["PM_RUN_PREFIX"] = RUN_PREFIX


# The whole run (CI's own limit is 90 minutes with set-up; the suite takes ~15-20) and the exit after it are
# bounded: a hang that pytest-timeout cannot interrupt ends with stacks (tests/support/watchdog.py).
RUN_BUDGET_S = float(os.environ.get("PM_TEST_BUDGET_S", 3600))
EXIT_GRACE_S = 60.0


def pytest_sessionstart(session: pytest.Session) -> None:
    capture = session.config.pluginmanager.getplugin("capturemanager")
    watchdog.arm(RUN_BUDGET_S, f"the test run took over {RUN_BUDGET_S:g} s (PM_TEST_BUDGET_S)", capture)


def pytest_unconfigure(config: pytest.Config) -> None:
    watchdog.arm(EXIT_GRACE_S, f"pytest finished but the process did not exit within {EXIT_GRACE_S:g} s")


def _privileged(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(m) for m in PRIVILEGED_MARKS)


def _why_no_privilege() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "needs bcc (python3-bpfcc); run scripts/setup.sh"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PM_IMAGE_TEST") != "1":  # the container image test: slow, needs the image (tests/image)
        image = [item for item in items if item.get_closest_marker("image")]
        if image:
            config.hook.pytest_deselected(items=image)
            items[:] = [item for item in items if not item.get_closest_marker("image")]
    reason = _why_no_privilege()
    for item in items:
        if not _privileged(item):
            item.add_marker(pytest.mark.unit)
        elif reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[type-arg]
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and _privileged(item):
        report.outcome = "failed"
        report.longrepr = f"privileged test skipped under CI=true (a skip here is a failure): {report.longrepr}"


@pytest.fixture(scope="session")
def run_prefix() -> str:
    return RUN_PREFIX
