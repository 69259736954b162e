"""planemesh benchmarks: `./run.sh bench NAME [ARGS]` (python -m bench NAME). They measure; they never assert.

`python -m bench` from the checkout puts the repository root first on sys.path, where its xds/ folder would hide
xds-protos' `xds` (and every Envoy API module with it). So the root leaves sys.path here, before a benchmark
imports anything, and tests/ (whose harnesses some benchmarks reuse) is registered by its location, as
scripts/run_module.py (what ./run.sh bench runs) and pytest's importlib import mode do.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def _leave_the_checkout_off_sys_path() -> None:
    kept = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
    if len(kept) == len(sys.path):
        return  # ./run.sh bench (scripts/run_module.py), or a test runner: never on it
    sys.path[:] = kept
    if "tests" in sys.modules:
        return
    init = _ROOT / "tests" / "__init__.py"
    spec = importlib.util.spec_from_file_location("tests", init, submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    sys.modules["tests"] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_leave_the_checkout_off_sys_path()
