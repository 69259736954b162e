"""Child processes running the checkout's own modules (tests/, bench/)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN_MODULE = ROOT / "scripts" / "run_module.py"


def dev_module_argv(module: str, *args: str) -> list[str]:
    """argv for `python -m module args` where the module lives in tests/ or bench/ (scripts/run_module.py: the
    repository root stays off sys.path). The product's own modules: planemesh.module_argv."""
    return [sys.executable, "-P", str(RUN_MODULE), module, *args]
