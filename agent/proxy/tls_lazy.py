"""The TLS engine (agent/tls/), loaded with the first TLS context or connection: pyOpenSSL and the cryptography
wheel cost a worker ~13 MB of RSS (measured: 29.9 vs 43.4 MB after importing the proxy), and only planes with
TLS need them."""

from __future__ import annotations

from types import ModuleType


def engine() -> ModuleType:
    """agent/tls/engine.py (contexts, TlsConn, TlsPeerView)."""
    from planemesh.agent.tls import engine as tls_engine  # here: ~13 MB of RSS that workers without TLS do not pay

    return tls_engine


def transport() -> ModuleType:
    """agent/tls/transport.py (serve_tls, accept_tls, connect_tls)."""
    from planemesh.agent.tls import transport as tls_transport  # here: see engine()

    return tls_transport
