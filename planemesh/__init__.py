"""planemesh: a node-level, multi-plane service-mesh agent.

The repository's top-level folders (agent/, model/, ebpf/, netplanes/, xds/, labs/) are the subpackages
planemesh.agent, planemesh.model, ... (see pyproject.toml). The repository root itself is never put on
sys.path: its xds/ folder would hide the xds-protos distribution's top-level `xds` package, which every
Envoy API module imports (docs/configuration.md, "Running from a checkout").
"""

from __future__ import annotations

import os
import sys

__version__ = "0.1.0"

# gRPC's fork handlers serve children that go on using gRPC. Ours exec at once (workers, HBONE, the BPF build
# helper) or fork before any gRPC thread exists (the zygote); with the handlers on, a fork while the xDS
# client's threads ran could abort the child inside gRPC (ev_epoll1_linux.cc check, exit -6). Read by grpc at
# import, so it is set here, before anything imports it; an operator's own setting wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def module_argv(module: str, *args: str) -> list[str]:
    """argv for `python -m module args` with this interpreter, and without the working directory on sys.path
    (-P): a process started from a checkout must import the installed packages, never the checkout's folders.
    -OO: no docstrings in memory, ~0.8 MB of RSS less per process (docs/benchmarks.md, lean6), where the
    `.opt-2.pyc` caches exist (scripts/setup.sh, deploy/build-image.sh write them; without them each start
    compiles from source: slower and larger, never failing). Nothing in the product reads a docstring or relies
    on an assert (tests/unit/test_optimized_children.py)."""
    return [sys.executable, "-P", "-OO", "-m", module, *args]
