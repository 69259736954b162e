"""The stdlib `ssl` server and client contexts that the TLS engine (agent/tls/engine.py) replaced in session 6,
kept as the baseline of bench/tls.py's side-by-side runs (`--in-memory`, `--handshakes`) and of
tests/proxy/test_tls_tickets.py. Not product code: nothing under agent/ imports it.

Session resumption for these contexts: stateful TLS 1.3 tickets and a bounded session cache.

Why not OpenSSL's default (stateless tickets): OpenSSL 3.0 builds each stateless ticket by serializing the
session, *parsing it back* (d2i_SSL_SESSION, to drop the session ID) and serializing it again; the parse
decodes the client's certificate through 3.0's provider decoders (OSSL_DECODER_CTX_new_for_pkey), about 0.15 ms
per ticket, two tickets per handshake: +40 % on a full mTLS handshake (docs/benchmarks.md, "TLS handshakes:
stateful tickets"). With SSL_OP_NO_TICKET, TLS 1.3 servers issue *stateful* tickets instead (the ticket is a
session ID; the session stays in the context's cache) and TLS 1.2 clients resume by session ID: clients resume
as before, the ticket costs a hash insert, and a resumption is a cache lookup instead of a ticket decryption and
a second certificate decode. Like stateless tickets (whose keys are random per SSLContext), a session resumes
only on the context (worker, secret version) that issued it.

The cache holds each client's parsed certificate (~11 KB per session), so it is bounded (SESSION_CACHE_SIZE;
OpenSSL's default is 20,480 sessions): Python's ssl has no setter, so SSL_CTX_ctrl(SSL_CTRL_SET_SESS_CACHE_SIZE)
is called through ctypes on the SSLContext's SSL_CTX, found in CPython's PySSLContext (the first field after the
object header) and checked against the context's own options and verify mode before use. Where that check fails
(another interpreter or layout), the context keeps stateless tickets: slower, never wrong.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import ssl

from planemesh.model.tls_config import CertSecret, TlsContext, TrustSecret

log = logging.getLogger("planemesh.proxy.tls")
# Sessions kept per server context (one per full handshake, oldest evicted first). Each holds the client's
# parsed certificate: ~11 KB of RSS per session with OpenSSL 3.0 (measured), so 256 is ~3 MB per context at most;
# OpenSSL's default, 20,480, would be ~220 MB. A client whose session was evicted does a full handshake.
SESSION_CACHE_SIZE = 256
_SSL_CTRL_SET_SESS_CACHE_SIZE = 42  # openssl/ssl.h
_SSL_CTRL_GET_SESS_CACHE_SIZE = 43


def _libssl() -> ctypes.CDLL | None:
    """The libssl the stdlib's _ssl module is linked to (dlsym on _ssl's handle searches its dependencies)."""
    try:
        lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
        lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    return lib


_LIB = _libssl() if platform.python_implementation() == "CPython" else None
_VERIFY = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}  # SSL_VERIFY_PEER | FAIL_IF_NO_PEER_CERT


def ssl_ctx_pointer(ctx: ssl.SSLContext) -> int | None:
    """The SSL_CTX* inside a CPython SSLContext, or None when it cannot be confirmed."""
    if _LIB is None:
        return None
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        return None
    # Two independent fields must match what Python reports for this very context: a wrong pointer is
    # never written through.
    if _LIB.SSL_CTX_get_options(ptr) != int(ctx.options) or _LIB.SSL_CTX_get_verify_mode(ptr) != _VERIFY.get(
        ctx.verify_mode
    ):
        return None
    return ptr


def session_cache_size(ctx: ssl.SSLContext) -> int | None:
    """The context's session cache bound, None when it cannot be read."""
    ptr = ssl_ctx_pointer(ctx)
    if ptr is None or _LIB is None:
        return None
    return int(_LIB.SSL_CTX_ctrl(ptr, _SSL_CTRL_GET_SESS_CACHE_SIZE, 0, None))


def use_stateful_tickets(ctx: ssl.SSLContext, cache_size: int = SESSION_CACHE_SIZE) -> bool:
    """Switch a server context (its verify mode already set) to stateful resumption with a bounded cache;
    False (context unchanged: stateless tickets) when the cache cannot be bounded."""
    ptr = ssl_ctx_pointer(ctx)
    if ptr is None or _LIB is None:
        log.info("SSL_CTX not reachable from this interpreter: stateless session tickets (slower handshakes)")
        return False
    _LIB.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_SESS_CACHE_SIZE, cache_size, None)
    ctx.options |= ssl.OP_NO_TICKET  # TLS 1.3: stateful tickets (num_tickets stays 2); TLS 1.2: session IDs
    return True


_VERSION = {
    "TLSv1_0": ssl.TLSVersion.TLSv1,
    "TLSv1_1": ssl.TLSVersion.TLSv1_1,
    "TLSv1_2": ssl.TLSVersion.TLSv1_2,
    "TLSv1_3": ssl.TLSVersion.TLSv1_3,
}


def _memfd_with(data: bytes) -> int:
    fd = os.memfd_create("planemesh-tls", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def build_context(tls: TlsContext, cert: CertSecret | None, trust: TrustSecret | None, server: bool) -> ssl.SSLContext:
    """An SSLContext for one TlsContext and its secrets' material."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _VERSION[tls.min_version]
    ctx.maximum_version = _VERSION[tls.max_version]
    if tls.ciphers:
        ctx.set_ciphers(":".join(tls.ciphers))
    if cert is not None:
        fd = _memfd_with(cert.chain_pem + b"\n" + cert.key_pem)
        try:
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    ctx.check_hostname = False  # SPIFFE identities are URIs: the SAN matchers decide (check_peer)
    if trust is not None:
        ctx.load_verify_locations(cadata=trust.ca_pem.decode("ascii", "replace"))
        ctx.verify_mode = ssl.CERT_REQUIRED if (tls.require_client_cert or not server) else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if tls.alpn:
        ctx.set_alpn_protocols(list(tls.alpn))
    if server and not tls.session_tickets:  # no ticket to make per handshake (TLS 1.3), none in TLS 1.2
        ctx.num_tickets = 0
        ctx.options |= ssl.OP_NO_TICKET
    elif server:  # resumption without OpenSSL 3.0's costly stateless tickets (above)
        use_stateful_tickets(ctx)
    return ctx
