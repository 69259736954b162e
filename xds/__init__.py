"""planemesh.xds: xDS client (sans-IO state machine + grpc.aio transport), translation, management server.

The repository folder `xds/` is this package, but the top-level import name `xds` belongs to the
xds-protos distribution (its `xds.core.v3` messages are imported by every Envoy API module). When the
repository root is on sys.path (`python -m pytest` run from the checkout), `import xds` would find this
folder instead and every `envoy.*` import would fail. Import the real one first, once, so that
`from envoy... import ...` works however the process was started.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _import_real_xds_protos() -> None:
    repo_root = Path(__file__).resolve().parent.parent
    loaded = sys.modules.get("xds")
    if loaded is not None:
        paths = [Path(p).resolve() for p in getattr(loaded, "__path__", [])]
        if all(p.parent != repo_root for p in paths):
            return  # already the real one
        del sys.modules["xds"]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != repo_root]
    try:
        import xds  # noqa: F401  (the xds-protos package)
    finally:
        sys.path[:] = saved


_import_real_xds_protos()
