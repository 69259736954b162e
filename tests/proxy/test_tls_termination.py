"""TLS termination in the proxy with real sockets and real clients (curl, Python's ssl), certificates from the
built-in CA: mTLS works and the client's SPIFFE ID reaches the access log; a certificate from another CA, an
expired one, none, or one with the wrong SAN is refused and counted; plaintext on a strict port is refused, a
permissive port serves both; TLS to a plaintext port is refused; h2 over TLS (ALPN) works; a rotated certificate
is used by new handshakes while an open connection keeps going; failed handshakes leak no descriptor and never
take the proxy down."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import ssl
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest
from cryptography import x509

from planemesh.agent.identity.ca import key_pem, new_root, spiffe_ids, utcnow
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.agent.proxy.server import PlaneProxy
from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.model.tls_config import CertSecret, SanMatch, TlsContext, TrustSecret
from tests.proxy.proxy_harness import PLANE, Backend, ServingProxy, log_line_for, make_snapshot

NOW = utcnow()
ROOT = new_root("cluster.local", now=NOW)
OTHER = new_root("cluster.local", now=NOW)
GW = parse_spiffe_id("spiffe://cluster.local/ns/ran/sa/gw")
AMF = parse_spiffe_id("spiffe://cluster.local/ns/ran/sa/amf")
TLS = TlsContext(cert="default", trust="ROOTCA", require_client_cert=True, alpn=("h2", "http/1.1"),
                 san=(SanMatch("uri", prefix="spiffe://cluster.local/ns/ran/"),))  # fmt: skip


def secrets(server_issued) -> dict:
    return {
        "default": CertSecret(server_issued.cert_chain_pem(), server_issued.key_pem()),
        "ROOTCA": TrustSecret(ROOT.root_pem()),
    }


class TlsProxy(ServingProxy):
    def __init__(
        self, backend_port: int, *, permissive: bool = False, tls: TlsContext = TLS, sla=None, **listener
    ) -> None:
        sock = make_listener_socket(0, transparent=False, host="127.0.0.1")
        port = sock.getsockname()[1]
        base = make_snapshot(port, [("127.0.0.1", backend_port)], sla=sla)
        self.server_cert = ROOT.issue(GW, now=NOW)
        [plain] = base.listeners
        listeners = [replace(plain, name="mtls", tls=tls, transport_protocol="tls" if permissive else "", **listener)]
        if permissive:
            # istiod gives both chains the same filters; each transport is routed by its own chain (routing.py)
            listeners.append(replace(plain, name="plain", transport_protocol="raw_buffer", **listener))
        self.snapshot = replace(base, listeners=tuple(listeners), secrets=MappingProxyType(secrets(self.server_cert)))
        self.log_lines: list[str] = []
        proxy = (
            PlaneProxy(self.snapshot, PLANE, access_log=self.log_lines.extend_text, tick_s=0.05)
            if False
            else (
                PlaneProxy(
                    self.snapshot, PLANE, access_log=lambda t: self.log_lines.extend(t.splitlines()), tick_s=0.05
                )
            )
        )
        super().__init__(proxy, sock)

    def call(self, fn, *args):
        async def run():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def flush_log(self) -> list[str]:
        self.call(self.proxy.log.flush)
        return self.log_lines

    @property
    def stats(self) -> dict:
        return self.call(self.proxy.tls_stats.as_dict)


@pytest.fixture(scope="module")
def backend():
    with Backend() as b:
        yield b


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    (d / "root.pem").write_bytes(ROOT.root_pem())
    for name, ca, who, now, ttl in (
        ("amf", ROOT, AMF, NOW, 3600),
        ("foreign", OTHER, AMF, NOW, 3600),
        ("expired", ROOT, AMF, NOW - dt.timedelta(hours=2), 600),
        ("outsider", ROOT, parse_spiffe_id("spiffe://cluster.local/ns/other/sa/x"), NOW, 3600),
    ):
        issued = ca.issue(who, now=now, ttl_s=ttl)
        (d / f"{name}.pem").write_bytes(issued.cert_chain_pem())
        (d / f"{name}.key").write_bytes(key_pem(issued.key))
    return d


def client_ctx(certs: Path, name: str | None = "amf", alpn=("http/1.1",)) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs / "root.pem"))
    ctx.check_hostname = False  # the proxy's identity is a SPIFFE URI: checked below
    if name:
        ctx.load_cert_chain(certs / f"{name}.pem", certs / f"{name}.key")
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def get(port: int, ctx: ssl.SSLContext | None, path: str = "/", sock_out: list | None = None) -> bytes:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    s = ctx.wrap_socket(raw) if ctx is not None else raw
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nhost: svc\r\n\r\n".encode())
        reply = b""
        while not _complete(reply):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply
    finally:
        if sock_out is not None:
            sock_out.append(s)
        else:
            s.close()


def _complete(reply: bytes) -> bool:
    """A whole response: the head and content-length bytes of body (the backend always sends the length)."""
    head, sep, body = reply.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


def refused(port: int, ctx: ssl.SSLContext | None) -> bool:
    """No HTTP response: the connection was closed or reset (a reset is what unread bytes get)."""
    try:
        return not get(port, ctx).startswith(b"HTTP/")
    except (ssl.SSLError, ConnectionError):
        return True


def curl(port: int, certs: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "5", "--cacert", certs / "root.pem", "--cert", certs / f"{name}.pem",
         "--key", certs / f"{name}.key", "-k", *extra, f"https://127.0.0.1:{port}/curl", "-w", " %{http_code}"],
        capture_output=True, text=True, check=False)  # fmt: skip


def test_mtls_request_and_peer_identity_in_the_access_log(backend, certs):
    with TlsProxy(backend.port) as px:
        raw = socket.create_connection(("127.0.0.1", px.port), timeout=5)
        with client_ctx(certs).wrap_socket(raw) as tls:
            server = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
            assert spiffe_ids(server) == [str(GW)] and tls.version() in ("TLSv1.2", "TLSv1.3")
        done = curl(px.port, certs, "amf")
        assert done.returncode == 0 and done.stdout.endswith(" 200") and "hello /curl" in done.stdout, done
        line = log_line_for(px, "/curl")
        assert line.endswith(f'"{AMF}"'), line
        h2 = curl(px.port, certs, "amf", "--http2")  # ALPN h2 -> the h2 codec, unchanged
        assert h2.returncode == 0 and h2.stdout.endswith(" 200"), h2
        assert px.stats["handshakes"] >= 3 and px.stats["handshake_failed"] == 0


@pytest.mark.parametrize(
    ("client", "counter"),
    [("foreign", "peer_cert_refused"), ("expired", "peer_cert_refused"), (None, "handshake_failed"),
     ("outsider", "san_refused")],
)  # fmt: skip
def test_bad_client_certificates_are_refused_and_counted(backend, certs, client, counter):
    with TlsProxy(backend.port) as px:
        assert get(px.port, client_ctx(certs)).startswith(b"HTTP/1.1 200")  # the pooled upstream exists now
        time.sleep(0.2)
        fds = len(os.listdir("/proc/self/fd"))
        for _ in range(5):
            try:  # TLS 1.3: the server's verdict on the client certificate arrives after the client's handshake
                reply = get(px.port, client_ctx(certs, client))
            except (ssl.SSLError, ConnectionError) as exc:
                reply = repr(exc).encode()
            assert not reply.startswith(b"HTTP/1.1"), reply  # no request went through
        assert px.stats[counter] >= 5, px.stats
        time.sleep(0.3)
        assert len(os.listdir("/proc/self/fd")) <= fds  # no descriptor left behind by the refusals
        assert get(px.port, client_ctx(certs)).startswith(b"HTTP/1.1 200")  # other clients unaffected


def test_plaintext_on_strict_port_refused_permissive_serves_both(backend, certs):
    with TlsProxy(backend.port) as px:
        assert refused(px.port, None)
        assert px.stats["plaintext_refused"] == 1
    with TlsProxy(backend.port, permissive=True) as px:
        assert get(px.port, None, "/plain").startswith(b"HTTP/1.1 200")
        assert get(px.port, client_ctx(certs), "/tls").startswith(b"HTTP/1.1 200")
        assert px.stats["plaintext_accepted"] == 1 and px.stats["handshakes"] == 1
        plain, tls = log_line_for(px, "/plain"), log_line_for(px, "/tls")
        assert plain.endswith(PLANE) and tls.endswith(f'"{AMF}"')


def test_tls_to_a_plaintext_port_is_refused_and_the_proxy_goes_on(backend, certs):
    sock = make_listener_socket(0, transparent=False, host="127.0.0.1")
    snap = make_snapshot(sock.getsockname()[1], [("127.0.0.1", backend.port)])
    with ServingProxy(PlaneProxy(snap, PLANE), sock) as px:
        assert refused(px.port, client_ctx(certs))
        assert get(px.port, None).startswith(b"HTTP/1.1 200")


def test_rotation_applies_to_new_handshakes_and_open_connections_continue(backend, certs):
    with TlsProxy(backend.port) as px:
        kept: list = []
        assert get(px.port, client_ctx(certs), "/before", kept).startswith(b"HTTP/1.1 200")
        old_serial = x509.load_der_x509_certificate(kept[0].getpeercert(binary_form=True)).serial_number
        rotated = ROOT.issue(GW, now=utcnow())
        new = replace(px.snapshot, secrets=MappingProxyType(secrets(rotated)))
        px.call(px.proxy.update, new)
        fresh: list = []
        assert get(px.port, client_ctx(certs), "/after", fresh).startswith(b"HTTP/1.1 200")
        new_serial = x509.load_der_x509_certificate(fresh[0].getpeercert(binary_form=True)).serial_number
        assert new_serial == rotated.cert.serial_number != old_serial
        kept[0].sendall(b"GET /again HTTP/1.1\r\nhost: svc\r\n\r\n")  # the connection of before still works
        assert kept[0].recv(65536).startswith(b"HTTP/1.1 200")
        for s in kept + fresh:
            s.close()


def test_truncated_handshake_and_silent_client_time_out_counted(backend, certs, monkeypatch):
    from planemesh.agent.proxy import tls as tls_module

    monkeypatch.setattr(tls_module, "HANDSHAKE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(tls_module, "PEEK_TIMEOUT_S", 0.5)
    with TlsProxy(backend.port) as px:
        socket.create_connection(("127.0.0.1", px.port), timeout=5).close()  # a port probe: not a timeout
        silent = socket.create_connection(("127.0.0.1", px.port), timeout=5)
        truncated = socket.create_connection(("127.0.0.1", px.port), timeout=5)
        truncated.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello cut short
        assert get(px.port, client_ctx(certs)).startswith(b"HTTP/1.1 200")  # meanwhile others are served
        for s in (silent, truncated):
            s.settimeout(3)
            assert s.recv(100) == b""  # closed by the proxy
            s.close()
        stats = px.stats
        assert stats["timeouts"] == 2 and stats["handshake_failed"] == 1, stats
        assert px.call(lambda: px.proxy.stats.downstream_active) == 0  # handshakes gave their budget back


def test_handshakes_count_against_the_plane_connection_budget(backend, certs, monkeypatch):
    from planemesh.agent.proxy import tls as tls_module
    from planemesh.model.planes import SLA

    monkeypatch.setattr(tls_module, "PEEK_TIMEOUT_S", 30)
    with TlsProxy(backend.port, sla=SLA(max_connections=2)) as px:
        held = [socket.create_connection(("127.0.0.1", px.port), timeout=5) for _ in range(2)]
        time.sleep(0.2)  # both wait for their first byte: each holds a place
        assert refused(px.port, client_ctx(certs))  # the third is closed before any handshake work
        assert px.stats["overloaded"] == 1 and px.stats["handshakes"] == 0
        for s in held:
            s.close()
        time.sleep(0.2)
        assert get(px.port, client_ctx(certs)).startswith(b"HTTP/1.1 200")


def test_rotation_under_load_fails_no_request(backend, certs):
    """wrk over TLS for 10 s while the certificate is pushed twice, and new handshakes all along: nothing fails,
    and new connections present the newest certificate."""
    import re
    import threading

    server_only = replace(TLS, require_client_cert=False, san=())  # wrk sends no client certificate
    with TlsProxy(backend.port, tls=server_only) as px:
        wrk = subprocess.Popen(["wrk", "-t1", "-c8", "-d10s", f"https://127.0.0.1:{px.port}/load"],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
        serials, failures, done = [], [], threading.Event()

        def handshakes() -> None:
            while not done.is_set():
                kept: list = []
                try:
                    ok = get(px.port, client_ctx(certs), "/new", kept).startswith(b"HTTP/1.1 200")
                    serials.append(x509.load_der_x509_certificate(kept[0].getpeercert(True)).serial_number)
                    if not ok:
                        failures.append("status")
                except (OSError, ssl.SSLError) as exc:
                    failures.append(repr(exc))
                finally:
                    for s in kept:
                        s.close()
                time.sleep(0.05)

        thread = threading.Thread(target=handshakes)
        thread.start()
        pushed = []
        for _ in range(2):
            time.sleep(3)
            issued = ROOT.issue(GW, now=utcnow())
            px.call(px.proxy.update, replace(px.snapshot, secrets=MappingProxyType(secrets(issued))))
            pushed.append(issued.cert.serial_number)
        out, _ = wrk.communicate(timeout=30)
        done.set()
        thread.join(10)
        total = int(re.search(r"(\d+) requests in", out).group(1))
        assert total > 100 and "Socket errors" not in out and "Non-2xx" not in out, out
        assert failures == [] and serials[-1] == pushed[-1] and set(pushed) <= set(serials)


FORGED = "By=spiffe://cluster.local/ns/x/sa/x;URI=spiffe://cluster.local/ns/kube-system/sa/admin"


def _xfcc_seen(backend, path: str) -> str | None:
    for _method, p, headers in reversed(backend.seen):  # the latest request to `path`
        if p == path:
            return headers.get("x-forwarded-client-cert")
    raise AssertionError(f"{path} never reached the backend")


def _get_with(port: int, ctx, path: str, xfcc: str) -> bytes:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    s = ctx.wrap_socket(raw) if ctx is not None else raw
    with s:
        s.sendall(f"GET {path} HTTP/1.1\r\nhost: svc\r\nx-forwarded-client-cert: {xfcc}\r\n\r\n".encode())
        reply = b""
        while not _complete(reply):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


def test_xfcc_is_sanitized_by_default_and_set_from_the_client_certificate(backend, certs):
    """A client cannot forge x-forwarded-client-cert (Envoy's default: sanitize); sanitize_set and
    append_forward put the mTLS client's identity there, By= our own."""
    import hashlib

    with TlsProxy(backend.port, permissive=True) as px:  # default: sanitize
        assert _get_with(px.port, None, "/xfcc-plain", FORGED).startswith(b"HTTP/1.1 200")
        assert _get_with(px.port, client_ctx(certs), "/xfcc-mtls", FORGED).startswith(b"HTTP/1.1 200")
        assert _xfcc_seen(backend, "/xfcc-plain") is None and _xfcc_seen(backend, "/xfcc-mtls") is None
    der = ssl.PEM_cert_to_DER_cert((certs / "amf.pem").read_text().split("-----END CERTIFICATE-----")[0]
                                   + "-----END CERTIFICATE-----\n")  # fmt: skip
    ours = f"By={GW};Hash={hashlib.sha256(der).hexdigest()};URI={AMF}"
    with TlsProxy(backend.port, forward_client_cert="sanitize_set", client_cert_details=("uri",)) as px:
        assert _get_with(px.port, client_ctx(certs), "/xfcc-set", FORGED).startswith(b"HTTP/1.1 200")
        assert _xfcc_seen(backend, "/xfcc-set") == ours
    with TlsProxy(backend.port, forward_client_cert="append_forward", client_cert_details=("uri",)) as px:
        assert _get_with(px.port, client_ctx(certs), "/xfcc-append", "By=a;URI=b").startswith(b"HTTP/1.1 200")
        assert _xfcc_seen(backend, "/xfcc-append") == f"By=a;URI=b, {ours}"


def test_a_context_that_cannot_be_built_refuses_tls_and_never_takes_the_proxy_down(backend, certs):
    """Translation refuses unknown ciphers; a snapshot from elsewhere with them must still not crash the worker."""
    bad = replace(TLS, ciphers=("NOT-A-CIPHER",))
    with TlsProxy(backend.port, tls=bad, permissive=True) as px:
        assert refused(px.port, client_ctx(certs))
        assert get(px.port, None).startswith(b"HTTP/1.1 200")  # the plaintext chain of the port still serves
        good = replace(px.snapshot, listeners=tuple(replace(lsn, tls=TLS) if lsn.tls else lsn
                                                    for lsn in px.snapshot.listeners))  # fmt: skip
        px.call(px.proxy.update, good)
        assert get(px.port, client_ctx(certs)).startswith(b"HTTP/1.1 200")


def test_rbac_authorizes_by_spiffe_identity_for_http1_and_h2(backend, certs):
    """An ALLOW policy for sa/amf GET: amf's GET passes; its POST, another identity (h1 and h2) and plaintext get
    403 `RBAC: access denied`, counted; the backend never sees them."""
    from planemesh.agent.rbac import RbacFilter, RbacPolicy, Rule
    from planemesh.model.config import HeaderMatch
    from planemesh.model.tls_config import SanMatch as StringMatch

    allow = RbacFilter("allow", (RbacPolicy(
        "amf-get", (Rule("header", header=HeaderMatch(":method", exact="GET")),),
        (Rule("authenticated", string=StringMatch("any", exact=str(AMF))),)),))  # fmt: skip
    tls = replace(TLS, san=())  # authorization, not the SAN matchers, decides here
    with TlsProxy(backend.port, permissive=True, tls=tls, http_filters=(allow,)) as px:
        assert get(px.port, client_ctx(certs), "/rbac-ok").startswith(b"HTTP/1.1 200")
        raw = socket.create_connection(("127.0.0.1", px.port), timeout=5)
        with client_ctx(certs).wrap_socket(raw) as s:
            s.sendall(b"POST /rbac-post HTTP/1.1\r\nhost: svc\r\ncontent-length: 0\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 403")
        assert get(px.port, client_ctx(certs, "outsider"), "/rbac-other").startswith(b"HTTP/1.1 403")
        h2 = curl(px.port, certs, "outsider", "--http2")
        assert h2.stdout.endswith(" 403") and "RBAC: access denied" in h2.stdout, h2
        assert get(px.port, None, "/rbac-plain").startswith(b"HTTP/1.1 403")
        assert px.stats["rbac_denied"] == 4
        seen = {p for _m, p, _h in backend.seen}
        assert "/rbac-ok" in seen and not {"/rbac-post", "/rbac-other", "/rbac-plain"} & seen


def test_xfcc_from_h2_clients_is_sanitized_and_set_too(backend, certs):
    with TlsProxy(
        backend.port, permissive=True, forward_client_cert="sanitize_set", client_cert_details=("uri",)
    ) as px:
        forged = ["-H", f"x-forwarded-client-cert: {FORGED}"]
        url = f"http://127.0.0.1:{px.port}/xfcc-h2-plain"
        args = ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "5", *forged, url]
        plain = subprocess.run(args, capture_output=True, text=True, check=False)
        assert "hello" in plain.stdout, plain
        mtls = curl(px.port, certs, "amf", "--http2", *forged)
        assert mtls.stdout.endswith(" 200"), mtls
        assert _xfcc_seen(backend, "/xfcc-h2-plain") is None
        assert _xfcc_seen(backend, "/curl").startswith(f"By={GW};Hash=") and f"URI={AMF}" in _xfcc_seen(
            backend, "/curl"
        )
