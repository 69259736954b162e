"""uvloop (or asyncio) without OpenSSL, for a process whose event loop never does TLS itself.

uvloop imports the stdlib's `ssl` unconditionally (for `ssl=` in create_connection/create_server), and `ssl`
maps libssl and libcrypto: ~4.1 MB of RSS in every process (docs/benchmarks.md, lean4). A proxy worker does TLS
with its own engine (agent/tls/, pyOpenSSL) over plain transports and never passes `ssl=` to its loop, so it
imports uvloop here with a stand-in `ssl` module, which is removed again right after: a later `import ssl`, by
whatever needs the stdlib's module, loads the real one then. What the stand-in leaves behind: this
process's loop refuses loop-level TLS (`ssl=`) with NoLoopTls, a clear error, instead of handshaking.
The agent runs its control loop on the stdlib's asyncio, imported here with `ssl` absent when nothing it is
configured with does loop-level TLS (agent/cli.py).
"""

from __future__ import annotations

import sys
import types
from typing import Any

STAND_IN_DOC = "planemesh: stand-in for `ssl` while uvloop was imported (agent/lean_loop.py); no TLS here"


class NoLoopTls(RuntimeError):
    """Raised by the stand-in when the loop is asked for TLS (`ssl=`): this process loaded uvloop without ssl."""


def _refuse(*_args: Any, **_kwargs: Any) -> Any:
    raise NoLoopTls("this process's event loop was loaded without OpenSSL (agent/lean_loop.py): no ssl= here")


def _stand_in() -> types.ModuleType:
    """The names uvloop (uvloop/includes/stdlib.pxi) and asyncio read from `ssl` at import, no more."""
    mod = types.ModuleType("ssl", STAND_IN_DOC)

    class SSLError(OSError):
        pass

    mod.SSLError = SSLError  # type: ignore[attr-defined]
    for name in ("SSLWantReadError", "SSLWantWriteError", "SSLSyscallError", "SSLZeroReturnError"):
        setattr(mod, name, type(name, (SSLError,), {}))
    mod.CertificateError = type("CertificateError", (ValueError,), {})  # type: ignore[attr-defined]
    # Classes uvloop checks and calls: any use of them is loop-level TLS.
    mod.SSLContext = type("SSLContext", (), {"__new__": _refuse})  # type: ignore[attr-defined]
    mod.MemoryBIO = type("MemoryBIO", (), {"__new__": _refuse})  # type: ignore[attr-defined]
    mod.SSLObject = type("SSLObject", (), {"__new__": _refuse})  # type: ignore[attr-defined]
    mod.create_default_context = _refuse  # type: ignore[attr-defined]
    mod.SSL_ERROR_WANT_READ, mod.SSL_ERROR_WANT_WRITE, mod.SSL_ERROR_SYSCALL = 2, 3, 5  # type: ignore[attr-defined]
    mod.PROTOCOL_TLS_CLIENT, mod.PROTOCOL_TLS_SERVER = 16, 17  # type: ignore[attr-defined]
    return mod


def import_uvloop_without_ssl() -> types.ModuleType:
    """uvloop, imported with the stand-in for `ssl` when neither is loaded yet (call it before anything imports
    asyncio, or asyncio will have loaded the real ssl); else the plain import."""
    if "uvloop" in sys.modules or "ssl" in sys.modules:
        import uvloop

        return uvloop
    stand_in = sys.modules["ssl"] = _stand_in()
    try:
        import uvloop
    finally:
        if sys.modules.get("ssl") is stand_in:
            del sys.modules["ssl"]
    return uvloop


def import_asyncio_without_ssl() -> None:
    """The stdlib's asyncio with `ssl` absent while it imports (asyncio's own path for a Python without ssl: its
    loop then refuses `ssl=` with "SSL is not supported"); the agent's control loop (agent/cli.py). A later
    `import ssl` loads the real module. No-op when asyncio or ssl is already loaded."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # import ssl -> ImportError, asyncio sets ssl = None
    try:
        import asyncio  # noqa: F401
    finally:
        if sys.modules.get("ssl", ...) is None:
            del sys.modules["ssl"]


def loaded_without_ssl() -> bool:
    """True when this process's uvloop was imported with the stand-in (its loop refuses `ssl=`)."""
    import asyncio.sslproto

    return getattr(asyncio.sslproto.ssl, "__doc__", None) == STAND_IN_DOC
