"""The TLS engine (agent/tls/), loaded with the first TLS context or connection: pyOpenSSL and the cryptography
wheel cost a worker ~13 MB of RSS (measured: 29.9 vs 43.4 MB after importing the proxy), and only planes with
TLS need them."""

from __future__ import annotations

from types import ModuleType

from planemesh.agent.lazy_modules import load


def engine() -> ModuleType:
    """agent/tls/engine.py (contexts, TlsConn, TlsPeerView)."""
    return load("planemesh.agent.tls.engine")  # here: ~13 MB of RSS that workers without TLS do not pay


def transport() -> ModuleType:
    """agent/tls/transport.py (serve_tls, accept_tls, connect_tls)."""
    return load("planemesh.agent.tls.transport")
