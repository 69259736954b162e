"""A plane SLA's mTLS mode on the sniffing listener and on tcp_proxy chains, over real loopback sockets with real
TLS clients (Python's ssl, curl): plane `ran` has its own CA, certificate and trust domain. strict: plaintext to
a sniffed (undeclared) port or to a tcp_proxy chain is refused and counted before anything is sniffed or
relayed; an mTLS client of the plane's trust domain is terminated, then sniffed (HTTP to the L7 proxy, anything
else relayed decrypted) or relayed to the chain's upstream, with network RBAC deciding on its SPIFFE ID; a client
of another CA or trust domain is refused. permissive: both served. disable: TLS chains are not terminated."""

from __future__ import annotations

import socket
import ssl
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from planemesh.agent.identity.ca import key_pem, new_root
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.model.config import Cluster, ClusterKind, Endpoint, Listener, ListenerProtocol, WeightedCluster
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import SLA
from planemesh.model.tls_config import TrustSecret
from tests.proxy.proxy_harness import PLANE, Backend
from tests.proxy.test_plane_mtls import MEDIA_CA, NOW, RAN_CA, RAN_GW, clients, ctx, secrets_of  # noqa: F401 (fixture)
from tests.proxy.test_sniff_mtls import ISTIO_ALPN, call, h2_get
from tests.proxy.test_sniff_passthrough import SniffProxy
from tests.proxy.test_tcp_rbac import network_rbac
from tests.proxy.test_tcp_tls import Upstream
from tests.proxy.test_tls_termination import TLS

STRICT = SLA(mtls="strict", mtls_cert="ran-cert", mtls_trust="ran-roots", mtls_trust_domain="ran.operator")
PERMISSIVE = replace(STRICT, mtls="permissive")
SMF = "spiffe://ran.operator/ns/ran/sa/smf"
PORT = 15433  # the tcp_proxy chains' port (the sniffer's `target` plays the original destination)
REQUEST = b"GET /sniffed HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"


@pytest.fixture(scope="module")
def certs(clients: Path) -> Path:  # noqa: F811 (test_plane_mtls's: amf of ran's CA, upf of media's)
    smf = RAN_CA.issue(parse_spiffe_id(SMF), now=NOW)
    (clients / "smf.pem").write_bytes(smf.cert_chain_pem())
    (clients / "smf.key").write_bytes(key_pem(smf.key))
    forged = new_root("ran.operator", now=NOW).issue(parse_spiffe_id("spiffe://ran.operator/ns/ran/sa/amf"), now=NOW)
    (clients / "forged.pem").write_bytes(forged.cert_chain_pem())  # ran's trust domain in the SAN, another CA
    (clients / "forged.key").write_bytes(key_pem(forged.key))
    return clients


def plane(sla: SLA, listeners=(), clusters=None) -> SniffProxy:
    """Plane `ran`: its certificate, and roots that trust media's CA too (so that media's client verifies and
    only the trust domain refuses it: `san_refused`)."""
    secrets = secrets_of(RAN_CA, RAN_GW, "ran-cert", "ran-roots")
    secrets["ran-roots"] = TrustSecret(RAN_CA.root_pem() + MEDIA_CA.root_pem())
    return SniffProxy(listeners, clusters, secrets=secrets, sla=sla)


def amf(certs: Path, who: str = "amf") -> ssl.SSLContext:
    return ctx(certs, who, "amf")  # every client trusts ran's roots (amf-root.pem): the server is ran's


def tcp_chain(upstream: Upstream, **kw) -> tuple[tuple[Listener, ...], dict[str, Cluster]]:
    lsn = Listener("db", PLANE, PORT, ListenerProtocol.TCP, tcp_clusters=(WeightedCluster("db", 1),), **kw)
    return (lsn,), {"db": Cluster("db", ClusterKind.STATIC, endpoints=(Endpoint("127.0.0.1", upstream.addr[1]),))}


def test_strict_plane_sniffed_port_requires_mtls_before_sniffing(certs: Path) -> None:
    with Backend() as backend, Upstream() as app, plane(STRICT) as px:
        px.target = ("127.0.0.1", backend.port)  # an undeclared port: sniffed
        assert call(px, None, REQUEST) in (b"", b"<refused>")  # plaintext HTTP: nothing sniffed
        assert call(px, None, b"\x00binary") in (b"", b"<refused>")  # plaintext anything else: nothing relayed
        assert backend.seen == []
        assert call(px, amf(certs), REQUEST).startswith(b"HTTP/1.1 200")  # terminated, then HTTP to the L7 proxy
        over_h2 = amf(certs)
        over_h2.set_alpn_protocols(["h2"])
        assert h2_get(px, over_h2) == 200  # h2 inside the plane's mTLS
        port = px.port
        got = subprocess.run(
            ["curl", "-sS", "-k", "--max-time", "5", "--http1.1", "--cert", certs / "amf.pem",
             "--key", certs / "amf.key", f"https://127.0.0.1:{port}/curl", "-o", "/dev/null", "-w", "%{http_code}"],
            capture_output=True, text=True, check=False)  # fmt: skip
        assert got.stdout == "200", got
        for who in ("upf", "forged"):  # media's (trusted roots, other trust domain), another CA with ran's domain
            assert call(px, amf(certs, who), REQUEST) in (b"", b"<refused>"), who
        assert [p for _m, p, _h in backend.seen] == ["/sniffed", "/h2", "/curl"]
        px.target = app.addr  # not HTTP inside: relayed decrypted to the original destination
        assert call(px, amf(certs), b"ping") == b"echo:ping" and app.seen == [b"ping"]
    tls, sniff = px.proxy.tls_stats, px.proxy.sniff_stats
    assert tls.plaintext_refused == 2 and tls.handshakes == 5  # 4 served + upf's (refused by its SAN)
    assert tls.peer_cert_refused == 1 and tls.san_refused == 1
    assert sniff.inner_kinds["http1"] == 2 and sniff.inner_kinds["h2"] == 1 and sniff.inner_kinds["opaque"] == 1


def test_strict_plane_terminates_a_clients_own_tls_on_a_sniffed_istio_port(certs: Path) -> None:
    """istiod's mTLS twin on an auto-protocol port only takes istio's ALPN; on a strict plane other ClientHellos
    get the plane's mTLS instead of passing through unauthenticated."""
    plain = Listener("inbound-auto", PLANE, PORT, ListenerProtocol.HTTP, route_config="rc", sniff=True,
                     transport_protocol="raw_buffer")  # fmt: skip
    twin = replace(plain, name="inbound-auto-mtls", tls=replace(TLS, cert="ran-cert", trust="ran-roots", san=()),
                   transport_protocol="tls", application_protocols=ISTIO_ALPN)  # fmt: skip
    with Backend() as backend:
        clusters = {"backend": Cluster("backend", ClusterKind.STATIC, endpoints=(Endpoint("127.0.0.1", backend.port),))}
        with plane(STRICT, (plain, twin), clusters) as px:
            px.target = ("127.0.0.1", PORT)
            assert call(px, amf(certs), REQUEST).startswith(b"HTTP/1.1 200")  # no istio ALPN: the plane's context
            istio = amf(certs)
            istio.set_alpn_protocols(["istio-http/1.1"])
            assert call(px, istio, REQUEST).startswith(b"HTTP/1.1 200")  # istio's ALPN: the xDS chain's context
            assert call(px, None, REQUEST) in (b"", b"<refused>")
            assert call(px, amf(certs, "upf"), REQUEST) in (b"", b"<refused>")  # the plane's trust domain
    assert px.proxy.tls_stats.plaintext_refused == 1 and px.proxy.tls_stats.san_refused == 1
    assert len(backend.seen) == 2


def test_permissive_plane_sniffed_port_serves_mtls_and_plaintext(certs: Path) -> None:
    with Backend() as backend, plane(PERMISSIVE) as px:
        px.target = ("127.0.0.1", backend.port)
        assert call(px, amf(certs), REQUEST).startswith(b"HTTP/1.1 200")  # terminated, sniffed inside
        assert call(px, None, REQUEST).startswith(b"HTTP/1.1 200")  # plaintext as before
        assert call(px, amf(certs, "upf"), REQUEST) in (b"", b"<refused>")  # TLS: the plane's trust domain only
        assert call(px, amf(certs, "forged"), REQUEST) in (b"", b"<refused>")  # and its CA
    tls = px.proxy.tls_stats
    assert tls.handshakes == 2 and tls.plaintext_accepted == 1 and tls.san_refused == 1 and tls.peer_cert_refused == 1
    assert px.proxy.sniff_stats.inner_kinds["http1"] == 1 and len(backend.seen) == 2


def test_permissive_plane_keeps_a_clients_own_tls_next_to_istios_mtls_chain(certs: Path) -> None:
    """Permissive demands nothing: on istiod's auto-protocol port a ClientHello without istio's ALPN still passes
    through to the application, as the xDS chains say; one offering it is terminated."""
    plain = Listener("inbound-auto", PLANE, 0, ListenerProtocol.HTTP, route_config="rc", sniff=True,
                     transport_protocol="raw_buffer")  # fmt: skip
    twin = replace(plain, name="inbound-auto-mtls", tls=replace(TLS, cert="ran-cert", trust="ran-roots", san=()),
                   transport_protocol="tls", application_protocols=ISTIO_ALPN)  # fmt: skip
    with Upstream() as app:
        port = app.addr[1]
        with plane(PERMISSIVE, (replace(plain, port=port), replace(twin, port=port))) as px:
            px.target = app.addr
            call(px, amf(certs), b"ping")  # its own TLS: the application is no TLS server, the handshake fails there
            istio = amf(certs)
            istio.set_alpn_protocols(["istio-peer-exchange"])
            assert call(px, istio, b"ping") == b"echo:ping"  # terminated, relayed decrypted
    assert app.seen[0][:1] == b"\x16" and app.seen[1] == b"ping"
    assert px.proxy.tls_stats.handshakes == 1


def test_disable_plane_passes_tls_through_a_sniffed_mtls_chain(certs: Path) -> None:
    twin = Listener("inbound-auto-mtls", PLANE, PORT, ListenerProtocol.HTTP, route_config="rc", sniff=True,
                    tls=replace(TLS, cert="ran-cert", trust="ran-roots", san=()), transport_protocol="tls")  # fmt: skip
    with Upstream() as app, plane(SLA(mtls="disable"), (replace(twin, port=app.addr[1]),)) as px:
        px.target = app.addr
        call(px, amf(certs), b"ping")  # the application is no TLS server: the client's handshake fails there
    assert app.seen and app.seen[0][:1] == b"\x16"  # the ClientHello itself reached the original destination
    assert px.proxy.tls_stats.handshakes == 0 and px.proxy.sniff_stats.kinds["tls"] == 1


def test_strict_plane_tcp_proxy_chain_terminates_mtls_and_rbac_sees_the_spiffe_id(certs: Path) -> None:
    amf_only = [{"authenticated": {"principal_name": {"exact": "spiffe://ran.operator/ns/ran/sa/amf"}}}]
    rules = {
        "action": "ALLOW",
        "policies": {"amf-only": {"permissions": [{"destination_port": PORT}], "principals": amf_only}},
    }
    with Upstream() as upstream:
        listeners, clusters = tcp_chain(upstream, network_rbac=network_rbac(rules))
        with plane(STRICT, listeners, clusters) as px:
            px.target = ("127.0.0.1", PORT)
            assert call(px, None, b"ping") in (b"", b"<refused>")  # plaintext: no chain takes it
            assert call(px, amf(certs), b"ping") == b"echo:ping"  # terminated, relayed in plaintext
            assert call(px, amf(certs, "smf"), b"ping") in (b"", b"<refused>")  # verified, but RBAC says no
            for who in ("upf", "forged"):
                assert call(px, amf(certs, who), b"ping") in (b"", b"<refused>"), who
    assert upstream.seen == [b"ping"]
    tls = px.proxy.tls_stats
    assert tls.plaintext_refused == 1 and tls.rbac_denied == 1 and tls.peer_cert_refused == 1
    assert tls.san_refused == 1
    assert px.proxy.sniff_stats.routed == {"db~mtls": {"(none)": 1}}


def test_permissive_plane_tcp_proxy_chain_serves_both(certs: Path) -> None:
    with Upstream() as upstream:
        listeners, clusters = tcp_chain(upstream)
        with plane(PERMISSIVE, listeners, clusters) as px:
            px.target = ("127.0.0.1", PORT)
            assert call(px, amf(certs), b"ping") == b"echo:ping"
            assert call(px, None, b"pong") == b"echo:pong"
    assert upstream.seen == [b"ping", b"pong"]  # both in plaintext upstream
    assert px.proxy.tls_stats.handshakes == 1
    assert px.proxy.sniff_stats.routed == {"db~mtls": {"(none)": 1}, "db": {"(none)": 1}}


@pytest.mark.parametrize("sla", [PERMISSIVE, STRICT])
def test_a_destination_no_chain_takes_passes_on_permissive_and_is_refused_on_strict(certs: Path, sla: SLA) -> None:
    """A chain for another destination of the same port (istiod's per-service chains) and a connection to an
    address none of them holds: permissive passes it to its original destination as before; strict refuses it."""
    with Upstream() as upstream:
        listeners, clusters = tcp_chain(upstream)
        scoped = replace(listeners[0], port=upstream.addr[1], prefixes=(IPNetwork("198.18.1.20/32"),))
        with plane(sla, (scoped,), clusters) as px:
            px.target = upstream.addr  # 127.0.0.1: not the chain's destination
            got = call(px, None, b"pong")
    if sla is PERMISSIVE:
        assert got == b"echo:pong" and upstream.seen == [b"pong"]
    else:
        assert got in (b"", b"<refused>") and upstream.seen == [] and px.proxy.tls_stats.plaintext_refused == 1


def test_disable_plane_relays_a_tls_chain_without_terminating_it(certs: Path) -> None:
    with Upstream() as upstream:
        listeners, clusters = tcp_chain(upstream, tls=replace(TLS, cert="ran-cert", trust="ran-roots"))
        with plane(SLA(mtls="disable"), listeners, clusters) as px:
            px.target = ("127.0.0.1", PORT)
            call(px, amf(certs), b"ping")  # the upstream is no TLS server
            assert call(px, None, b"pong") == b"echo:pong"  # xDS said TLS only; disabled: relayed as it is
    assert upstream.seen[0][:1] == b"\x16" and upstream.seen[1] == b"pong"
    assert px.proxy.tls_stats.handshakes == 0 and px.proxy.tls_stats.plaintext_refused == 0


def test_a_strict_refusal_leaves_the_listener_serving(certs: Path) -> None:
    """Plaintext refused many times in a row (and a client gone at once) never stops the sniffing listener."""
    with Backend() as backend, plane(STRICT) as px:
        px.target = ("127.0.0.1", backend.port)
        for _ in range(20):
            assert call(px, None, REQUEST) in (b"", b"<refused>")
        with socket.create_connection(("127.0.0.1", px.port), timeout=5):
            pass  # closed before a byte
        assert call(px, None, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") in (b"", b"<refused>")  # h2 prior knowledge
        cut = bytes.fromhex("160301020001")  # a ClientHello cut short, then silence: not TLS once the sniff times out
        assert call(px, None, cut) in (b"", b"<refused>")
        assert call(px, amf(certs), REQUEST).startswith(b"HTTP/1.1 200")
        assert [p for _m, p, _h in backend.seen] == ["/sniffed"]
    assert px.proxy.tls_stats.plaintext_refused >= 23 and px.proxy.tls_stats.handshakes == 1
