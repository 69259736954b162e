"""The TLS engine: pyOpenSSL over the OpenSSL that the `cryptography` wheel bundles (4.x), not the stdlib's.

Why: Python's `ssl` links the system OpenSSL (3.0 on Debian 12), whose server handshake spends a quarter of its
work setting up provider decoders for every certificate it parses; OpenSSL >= 3.2 caches them. Measured with
callgrind on an in-memory mTLS handshake (ECDSA P-256, the same client): the server's OpenSSL work is 5.25 M
instructions here vs 8.41 M with the stdlib (docs/benchmarks.md, "TLS engine on pyOpenSSL").

This module is the sans-IO half: SSL contexts from the TLS model, and `TlsConn`, one connection's TLS state
over memory BIOs (feed ciphertext in, take plaintext and ciphertext out). agent/tls/transport.py drives it
under asyncio. Keys reach OpenSSL from memory (never a file on disk).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from OpenSSL.crypto import _bio_to_string, _new_mem_buf  # private: pinned in pyproject.toml

from planemesh.agent.tls.failure import TlsFailure
from planemesh.model.tls_config import CertSecret, TlsContext, TrustSecret

_VERSION = {
    "TLSv1_0": SSL.TLS1_VERSION,
    "TLSv1_1": SSL.TLS1_1_VERSION,
    "TLSv1_2": SSL.TLS1_2_VERSION,
    "TLSv1_3": SSL.TLS1_3_VERSION,
}
# The stdlib's defaults for a new SSLContext, which the previous engine had.
_OPTIONS = SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_SINGLE_DH_USE | SSL.OP_SINGLE_ECDH_USE
_SESSION_ID_CONTEXT = b"planemesh"  # server-side resumption with client certificates needs one (CPython: "Python")
READ_SIZE = 65536
TlsError = TlsFailure  # what the engine raises (OpenSSL's SSL.Error, converted: callers need not load pyOpenSSL)


def build_engine_context(
    tls: TlsContext, cert: CertSecret | None, trust: TrustSecret | None, server: bool
) -> SSL.Context:
    """A pyOpenSSL context for one TlsContext and its secrets' material (ValueError when the material is
    unusable: a malformed PEM, a key that does not match its certificate)."""
    try:
        return _context(tls, cert, trust, server)
    except SSL.Error as exc:
        raise ValueError(f"TLS material refused by OpenSSL: {exc}") from exc


def refusing_context() -> SSL.Context:
    """A server context without a certificate: every handshake on it fails."""
    return SSL.Context(SSL.TLS_SERVER_METHOD)


def _context(tls: TlsContext, cert: CertSecret | None, trust: TrustSecret | None, server: bool) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD if server else SSL.TLS_CLIENT_METHOD)
    ctx.set_options(_OPTIONS)
    ctx.set_min_proto_version(_VERSION[tls.min_version])
    ctx.set_max_proto_version(_VERSION[tls.max_version])
    if tls.ciphers:
        ctx.set_cipher_list(":".join(tls.ciphers).encode())
    if cert is not None:
        chain = x509.load_pem_x509_certificates(cert.chain_pem)
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(load_pem_private_key(cert.key_pem, None))  # type: ignore[arg-type]
        ctx.check_privatekey()
    if trust is not None:
        store = ctx.get_cert_store()
        assert store is not None
        for root in x509.load_pem_x509_certificates(trust.ca_pem):
            store.add_cert(crypto.X509.from_cryptography(root))
        mode = SSL.VERIFY_PEER
        if tls.require_client_cert or not server:
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        ctx.set_verify(mode)
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    if server:
        _server_options(ctx, tls)
    elif tls.alpn:
        ctx.set_alpn_protos([p.encode() for p in tls.alpn])
    return ctx


def _server_options(ctx: SSL.Context, tls: TlsContext) -> None:
    ctx.set_session_id(_SESSION_ID_CONTEXT)
    if tls.alpn:
        ours = [p.encode() for p in tls.alpn]

        def select(_conn: SSL.Connection, offered: list[bytes]) -> bytes:
            # The stdlib's choice (SSL_select_next_proto): our order first; no overlap is no ALPN, not an error.
            return next((p for p in ours if p in offered), SSL.NO_OVERLAPPING_PROTOCOLS)  # type: ignore[arg-type]

        ctx.set_alpn_select_callback(select)
    if not tls.session_tickets:  # no ticket, no session cache: every connection is a full handshake
        ctx.set_options(SSL.OP_NO_TICKET)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    # Tickets on: OpenSSL's stateless TLS 1.3 tickets. OpenSSL >= 3.2 no longer re-decodes the client's
    # certificate per ticket (the reason the stdlib engine used stateful ones, bench/tls_stdlib.py), and
    # a stateless ticket keeps no server memory; the session cache stays on for TLS 1.2 session IDs.


class TlsConn:
    """One TLS connection over memory BIOs (sans-IO): `feed` ciphertext, `handshake()` until True, `read()`
    plaintext, `write()` plaintext, and send what `outgoing()` returns. Errors are TlsError (SSL.Error).

    The per-record calls (read, write, feed, outgoing) go to OpenSSL through pyOpenSSL's cffi `lib` directly:
    pyOpenSSL's methods allocate a buffer of the requested size per call (a 256 KiB bio_read is an mmap) and
    report "nothing more" with an exception, which cost more than the record itself on a reused connection."""

    __slots__ = ("conn", "done", "inbio", "outbio", "server", "ssl")

    def __init__(self, ctx: SSL.Context, server: bool, sni: str | None = None, session: Any = None) -> None:
        """`session` (a client's): an earlier connection's SSL.Session to resume (`get_session`)."""
        self.conn = conn = SSL.Connection(ctx, None)
        self.ssl = conn._ssl  # type: ignore[attr-defined]
        self.inbio, self.outbio = conn._into_ssl, conn._from_ssl  # type: ignore[attr-defined]
        self.server = server
        self.done = False
        if server:
            conn.set_accept_state()
        else:
            if sni:
                conn.set_tlsext_host_name(sni.encode("idna"))
            if session is not None:
                conn.set_session(session)
            conn.set_connect_state()

    def get_session(self) -> Any:
        """This connection's session (None before the handshake), for a later client connection to the same
        server to resume. TLS 1.3 makes it resumable once a ticket was read; OpenSSL does a full handshake with a
        session that is not."""
        return self.conn.get_session() if self.done else None

    def feed(self, data: bytes) -> None:
        if _lib.BIO_write(self.inbio, data, len(data)) != len(data):  # a memory BIO grows: never short
            raise TlsFailure("memory BIO write failed")

    def handshake(self) -> bool:
        """True once the handshake is complete; TlsError when it failed (send outgoing() first: the alert)."""
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            return False
        except SSL.Error as exc:
            raise TlsFailure(str(exc)) from exc
        self.done = True
        return True

    def read(self) -> bytes | None:
        """Plaintext available now (b"" when none); None when the peer sent close_notify."""
        buf = _buffer()
        n = _lib.SSL_read(self.ssl, buf, READ_SIZE)
        if n > 0:
            return _ffi.buffer(buf, n)[:]
        err = _lib.SSL_get_error(self.ssl, n)
        if err == _WANT_READ:
            return b""
        if err == _ZERO_RETURN:
            return None
        self._raise(n)
        return b""

    def write(self, data: bytes) -> None:
        if len(data) <= _RECORD and _lib.SSL_write(self.ssl, data, len(data)) == len(data):
            return  # one record: the common case
        with _ffi.from_buffer(data) as src:
            left, sent = len(data), 0
            while left:  # partial writes are records (16 KiB): a memory BIO takes them all, never WantWrite
                n = _lib.SSL_write(self.ssl, src + sent, left)
                if n <= 0:
                    self._raise(n)
                    return
                sent, left = sent + n, left - n

    def _raise(self, result: int) -> None:
        try:
            self.conn._raise_ssl_error(self.ssl, result)  # type: ignore[attr-defined]  # OpenSSL's error
        except SSL.Error as exc:
            raise TlsFailure(str(exc)) from exc

    def outgoing(self) -> bytes:
        """Ciphertext to send (b"" when none)."""
        buf = _buffer()
        n = _lib.BIO_read(self.outbio, buf, READ_SIZE)
        if n <= 0:
            return b""
        out = _ffi.buffer(buf, n)[:]
        if n < READ_SIZE:
            return out
        parts = [out]  # more waiting (a large write): joined once, not re-concatenated per 64 KiB
        while n == READ_SIZE:
            n = _lib.BIO_read(self.outbio, buf, READ_SIZE)
            if n > 0:
                parts.append(_ffi.buffer(buf, n)[:])
        return b"".join(parts)

    def tls13(self) -> bool:
        return _lib.SSL_version(self.ssl) == SSL.TLS1_3_VERSION

    def close_notify(self) -> None:
        with contextlib.suppress(SSL.Error):
            self.conn.shutdown()

    def alpn(self) -> str | None:
        proto = self.conn.get_alpn_proto_negotiated()
        return proto.decode("ascii", "replace") if proto else None


_RECORD = 16384  # the largest TLS record's plaintext: SSL_write takes it in one call
_WANT_READ = _lib.SSL_ERROR_WANT_READ
_ZERO_RETURN = _lib.SSL_ERROR_ZERO_RETURN
_LOCAL = threading.local()  # one read buffer per thread (cffi releases the GIL during OpenSSL's calls)


def _buffer() -> Any:
    try:
        return _LOCAL.buf
    except AttributeError:
        _LOCAL.buf = _ffi.new("char[]", READ_SIZE)
        return _LOCAL.buf


def _rdn_name(attr: x509.NameAttribute) -> str:
    return attr.oid._name  # OpenSSL's long names ("commonName"), as the stdlib's getpeercert() gave


class PeerFacts:
    """What the proxy reads of a peer certificate, parsed once per distinct certificate (PEER_FACTS_KEPT)."""

    __slots__ = ("der", "dns", "subject", "uris")

    def __init__(self, der: bytes) -> None:
        self.der = der
        cert = x509.load_der_x509_certificate(der)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            self.uris = san.get_values_for_type(x509.UniformResourceIdentifier)
            self.dns = san.get_values_for_type(x509.DNSName)
        except (ValueError, x509.ExtensionNotFound):
            self.uris, self.dns = [], []
        self.subject = ",".join(f"{_rdn_name(a)}={a.value!s}" for rdn in reversed(cert.subject.rdns) for a in rdn)


# A client presents the same certificate on every connection until it rotates: parsing it (cryptography, ~50 us)
# once per certificate instead of once per handshake. Keyed by the whole DER (a verified certificate), so two
# certificates never share facts; cleared when full.
PEER_FACTS_KEPT = 1024
_FACTS: dict[bytes, PeerFacts] = {}


def peer_facts(der: bytes) -> PeerFacts:
    facts = _FACTS.get(der)
    if facts is None:
        if len(_FACTS) >= PEER_FACTS_KEPT:
            _FACTS.clear()
        facts = _FACTS[der] = PeerFacts(der)
    return facts


def _peer_der(conn: SSL.Connection) -> bytes | None:
    """The peer certificate's DER straight from OpenSSL (pyOpenSSL's get_peer_certificate wraps it twice)."""
    ssl_ptr = conn._ssl  # type: ignore[attr-defined]
    x = _lib.SSL_get_peer_certificate(ssl_ptr)  # a new reference (SSL_get1_peer_certificate)
    if x == _ffi.NULL:
        return None
    try:
        bio = _new_mem_buf()
        if _lib.i2d_X509_bio(bio, x) != 1:
            return None
        return _bio_to_string(bio)
    finally:
        _lib.X509_free(x)


class TlsPeerView:
    """The connection's `ssl_object` (transport.get_extra_info): the peer's certificate and what the proxy
    attaches for the access log, XFCC and RBAC (planemesh_peer, planemesh_local, planemesh_xfcc)."""

    __slots__ = ("_facts", "conn", "planemesh_local", "planemesh_peer", "planemesh_xfcc")

    def __init__(self, conn: TlsConn) -> None:
        self.conn = conn
        self._facts: PeerFacts | bool | None = False  # False: not read yet; None: no certificate
        self.planemesh_peer: str | None = None
        self.planemesh_local: str | None = None
        self.planemesh_xfcc: object = None

    def facts(self) -> PeerFacts | None:
        if self._facts is False:
            der = _peer_der(self.conn.conn)
            self._facts = peer_facts(der) if der else None
        return self._facts  # type: ignore[return-value]

    def sans(self) -> tuple[list[str], list[str]]:
        """(URI SANs, DNS SANs) of the peer's certificate; empty without one."""
        facts = self.facts()
        return (facts.uris, facts.dns) if facts is not None else ([], [])

    def subject(self) -> str:
        """The peer's subject, most specific first, OpenSSL's long names (the stdlib engine's XFCC Subject)."""
        facts = self.facts()
        return facts.subject if facts is not None else ""

    def getpeercert(self, binary_form: bool = False) -> bytes | dict | None:
        facts = self.facts()
        if binary_form:
            return facts.der if facts is not None else None
        if facts is None:
            return {}
        return {"subjectAltName": tuple([("URI", u) for u in facts.uris] + [("DNS", d) for d in facts.dns])}

    def selected_alpn_protocol(self) -> str | None:
        return self.conn.alpn()

    def version(self) -> str | None:
        return self.conn.conn.get_protocol_version_name()

    def session_reused(self) -> bool:
        return bool(_lib.SSL_session_reused(self.conn.conn._ssl))  # type: ignore[attr-defined]
