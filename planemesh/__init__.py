"""planemesh: a node-level, multi-plane service-mesh agent.

The repository's top-level folders (agent/, model/, ebpf/, netplanes/, xds/, labs/) are the subpackages
planemesh.agent, planemesh.model, ... (see pyproject.toml). The repository root itself is never put on
sys.path: its xds/ folder would hide the xds-protos distribution's top-level `xds` package, which every
Envoy API module imports (docs/configuration.md, "Running from a checkout").
"""

from __future__ import annotations

import sys

__version__ = "0.1.0"


def module_argv(module: str, *args: str) -> list[str]:
    """argv for `python -m module args` with this interpreter, and without the working directory on sys.path
    (-P): a process started from a checkout must import the installed packages, never the checkout's folders."""
    return [sys.executable, "-P", "-m", module, *args]
