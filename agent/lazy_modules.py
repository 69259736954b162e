"""The one way an optional feature's modules are loaded on first use (the h2 stack: agent/proxy/h2_support.py;
the TLS engine: agent/proxy/tls_lazy.py; json for a JSON access log: accesslog.py; http's status enum for a
reason phrase the proxy makes up: http1.py), so that a process that never uses the feature never pays its RSS
(bench/footprint.py). Loaded by name: the callers sit between the feature and its users in the import graph."""

from __future__ import annotations

import importlib
from types import ModuleType

_loaded: dict[str, ModuleType] = {}


def load(qualified_name: str) -> ModuleType:
    """The module, imported on the first call (a dict lookup after that: callers are on per-connection paths)."""
    module = _loaded.get(qualified_name)
    if module is None:
        module = _loaded[qualified_name] = importlib.import_module(qualified_name)
    return module
