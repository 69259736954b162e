"""Child processes running the checkout's own modules (tests/, bench/)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
RUN_MODULE = ROOT / "scripts" / "run_module.py"


def dev_module_argv(module: str, *args: str) -> list[str]:
    """argv for `python -m module args` where the module lives in tests/ or bench/ (scripts/run_module.py: the
    repository root stays off sys.path). The product's own modules: planemesh.module_argv."""
    return [sys.executable, "-P", str(RUN_MODULE), module, *args]


def register_package(name: str, root: Path = ROOT) -> ModuleType:
    """Import the checkout's folder `name` (bench, tests) as a package by its location, as pytest's importlib
    import mode does for tests/: the repository root stays off sys.path."""
    if name in sys.modules:
        return sys.modules[name]
    init = root / name / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
