"""A strict plane's mTLS governs the chains of listeners that are not OUTBOUND (Envoy's traffic_direction; Istio's
STRICT PeerAuthentication is about inbound traffic): a local pod's own egress through istiod's outbound listeners
(a tcp_proxy chain such as kube-dns :53's, an outbound HTTP listener) keeps working in plaintext and a pod's own
TLS passes through, while the INBOUND chains and undeclared sniffed ports of the same plane require the plane's
mTLS. Real loopback sockets and TLS clients. Before, the plane refused the pod's plaintext egress."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from planemesh.model.config import Cluster, ClusterKind, Endpoint, Listener, ListenerProtocol, TrafficDirection
from tests.proxy.proxy_harness import PLANE, Backend
from tests.proxy.test_plane_mtls import RAN_CA, RAN_GW, clients, get, plane_proxy, refused, secrets_of  # noqa: F401
from tests.proxy.test_plane_mtls_sniff_tcp import PORT, REQUEST, STRICT, amf, call, certs, plane, tcp_chain  # noqa: F401
from tests.proxy.test_tcp_tls import Upstream

OUT, IN = TrafficDirection.OUTBOUND, TrafficDirection.INBOUND


def test_strict_plane_outbound_tcp_chain_keeps_plaintext_inbound_chain_requires_mtls(certs: Path) -> None:  # noqa: F811
    with Upstream() as upstream:
        (db,), clusters = tcp_chain(upstream)
        dns = replace(db, name="outbound_53", direction=OUT)  # a pod's egress to its cluster
        inbound = replace(db, name="inbound_db", port=PORT + 1, direction=IN)
        with plane(STRICT, (dns, inbound), clusters) as px:
            px.target = ("127.0.0.1", PORT)
            assert call(px, None, b"dns") == b"echo:dns"  # plaintext egress: relayed to the chain's cluster
            px.target = ("127.0.0.1", PORT + 1)
            assert call(px, None, b"ping") in (b"", b"<refused>")  # inbound: the plane's mTLS only
            assert call(px, amf(certs), b"ping") == b"echo:ping"
    assert upstream.seen == [b"dns", b"ping"]
    tls = px.proxy.tls_stats
    assert tls.plaintext_refused == 1 and tls.handshakes == 1
    assert px.proxy.sniff_stats.routed == {"outbound_53": {"(none)": 1}, "inbound_db~mtls": {"(none)": 1}}


def test_strict_plane_outbound_sniffed_http_listener_serves_plaintext_and_passes_a_pods_own_tls(certs: Path) -> None:  # noqa: F811
    with Backend() as backend, Upstream() as app:
        clusters = {"backend": Cluster("backend", ClusterKind.STATIC, endpoints=(Endpoint("127.0.0.1", backend.port),))}
        out = Listener("0.0.0.0_8080", PLANE, backend.port, ListenerProtocol.HTTP, route_config="rc", sniff=True,
                       direction=OUT)  # fmt: skip
        tls_out = replace(out, name="0.0.0.0_443", port=app.addr[1])
        with plane(STRICT, (out, tls_out), clusters) as px:
            px.target = ("127.0.0.1", backend.port)
            assert call(px, None, REQUEST).startswith(b"HTTP/1.1 200")  # the pod's plaintext HTTP egress
            px.target = app.addr
            call(px, amf(certs), b"ping")  # the pod's own TLS: untouched (the app is no TLS server: it fails there)
            px.target = ("127.0.0.1", PORT + 2)  # an undeclared sniffed port of the same plane: mTLS only
            assert call(px, None, REQUEST) in (b"", b"<refused>")
    assert [p for _m, p, _h in backend.seen] == ["/sniffed"]
    assert app.seen and app.seen[0][:1] == b"\x16"  # the ClientHello reached the original destination
    assert px.proxy.tls_stats.handshakes == 0 and px.proxy.tls_stats.plaintext_refused == 1


def test_strict_plane_declared_outbound_http_port_serves_plaintext(clients: Path) -> None:  # noqa: F811
    """A declared HTTP port (no sniffing): OUTBOUND keeps plaintext, INBOUND (and unspecified) require mTLS."""
    secrets = secrets_of(RAN_CA, RAN_GW, "ran-cert", "ran-roots")
    with Backend() as backend:
        with plane_proxy("ran", STRICT, backend.port, secrets, direction=OUT) as out:
            assert get(out.port, None, "/egress").startswith(b"HTTP/1.1 200")
        with plane_proxy("ran", STRICT, backend.port, secrets, direction=IN) as inbound:
            assert refused(inbound.port, None)
    assert out.proxy.tls_stats.plaintext_refused == 0 and inbound.proxy.tls_stats.plaintext_refused == 1
    assert [p for _m, p, _h in backend.seen] == ["/egress"]
