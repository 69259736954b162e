#!/usr/bin/env python3
"""Run a module of the checkout's non-product folders (bench/, tests/) without the repository root on sys.path.

    .venv/bin/python -P scripts/run_module.py bench xds_scale --one     # what `./run.sh bench` does
    .venv/bin/python -P scripts/run_module.py tests.fuzz.run TARGET ...

`python -m bench` from the checkout would put the root first on sys.path, where its xds/ folder hides
xds-protos' `xds` (and every Envoy API module with it). Here `bench` and `tests` are registered as packages
by their location, as pytest's importlib import mode does for tests/, and the product comes from the install
(planemesh.*). With -P, Python does not put this script's folder on sys.path either.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "tests")  # the checkout's folders importable by their own name here


def register_packages(root: Path = ROOT) -> None:
    """tests/ by its location (as tests/support/procs.register_package does), then the others with that."""
    init = root / "tests" / "__init__.py"
    spec = importlib.util.spec_from_file_location("tests", init, submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    sys.modules["tests"] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from tests.support.procs import register_package

    for name in PACKAGES:
        register_package(name, root)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    module = sys.argv[1]
    register_packages()
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
