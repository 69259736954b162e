"""Dispatch `python -m bench NAME [ARGS]` to bench/NAME.py's main()."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in ("common", "__main__"))


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in available():
        print(f"usage: python -m bench NAME [ARGS]; NAME is one of: {', '.join(available())}", file=sys.stderr)
        sys.exit(2)
    from planemesh.agent.cli import exit_on_sigterm

    exit_on_sigterm()  # a killed benchmark still tears its lab down
    module = importlib.import_module(f"bench.{sys.argv[1]}")
    if inspect.signature(module.main).parameters:
        module.main(sys.argv[2:])
    else:  # scripts that parse sys.argv themselves
        sys.argv = [f"bench {sys.argv[1]}", *sys.argv[2:]]
        module.main()


if __name__ == "__main__":
    main()
