"""Peer identity in Istio's standard metrics, through the real proxy: mTLS clients of an istiod-named inbound
cluster are counted under their SPIFFE ID (source_principal) and ours (destination_principal) with
connection_security_policy mutual_tls, plaintext ones under unknown/none; relayed TCP connections of a
terminating tcp_proxy chain give istio_tcp_* with the same identities. Scraped as Prometheus text."""

from __future__ import annotations

import subprocess
import time
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

from planemesh.agent.proxy.server import PlaneProxy
from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.agent.stats_report import StatsRegistry
from planemesh.model.config import Cluster, ClusterKind, Endpoint, Route, RouteAction
from tests.proxy.proxy_harness import PLANE, Backend, ServingProxy, make_snapshot
from tests.proxy.test_tcp_tls import Upstream, chains, tls_call
from tests.proxy.test_tcp_tls import serve as serve_tcp
from tests.proxy.test_tls_termination import AMF, GW, ROOT, TLS, certs, client_ctx, get, secrets  # noqa: F401
from tests.unit.test_ops_metrics import _scrape

INBOUND = "inbound|9080|http|reviews.ran.svc.cluster.local"


def scrape(proxy: PlaneProxy) -> dict[tuple[str, tuple], float]:
    """The worker's `istio` rows through the agent's stats registry and Prometheus exposition."""
    registry = StatsRegistry()
    rows = proxy.istio.report(PLANE)
    registry.register("proxy", lambda: {"istio": rows})
    return _scrape(registry)


def sample(samples: dict, name: str, **labels: str) -> float:
    found = [v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()]
    assert len(found) == 1, (name, labels, [k for k in samples if k[0] == name])
    return found[0]


def test_http_requests_carry_the_peers_spiffe_ids(certs: Path) -> None:  # noqa: F811
    with Backend() as backend:
        sock = make_listener_socket(0, transparent=False, host="127.0.0.1")
        cluster = Cluster(INBOUND, ClusterKind.STATIC, endpoints=(Endpoint("127.0.0.1", backend.port),))
        base = make_snapshot(sock.getsockname()[1], [], routes=(Route(action=RouteAction(cluster=INBOUND)),),
                             clusters={INBOUND: cluster})  # fmt: skip
        [lsn] = base.listeners
        mtls = replace(lsn, name="mtls", tls=replace(TLS, san=()), transport_protocol="tls")
        plain = replace(lsn, name="plain", transport_protocol="raw_buffer")
        server = ROOT.issue(GW, now=ROOT.cert.not_valid_before_utc)
        snap = replace(base, listeners=(mtls, plain), secrets=MappingProxyType(secrets(server)))
        with ServingProxy(PlaneProxy(snap, PLANE), sock) as px:
            assert get(px.port, client_ctx(certs), "/a").startswith(b"HTTP/1.1 200")
            assert get(px.port, client_ctx(certs), "/b").startswith(b"HTTP/1.1 200")
            h2 = subprocess.run(
                ["curl", "-sS", "-k", "--http2", "--cert", certs / "amf.pem", "--key", certs / "amf.key",
                 f"https://127.0.0.1:{px.port}/c", "-o", "/dev/null", "-w", "%{http_code}"],
                capture_output=True, text=True, check=False)  # fmt: skip
            assert h2.stdout == "200", h2
            assert get(px.port, None, "/plain").startswith(b"HTTP/1.1 200")
            samples = scrape(px.proxy)
    mutual = sample(samples, "istio_requests_total", source_principal=str(AMF), destination_principal=str(GW),
                    connection_security_policy="mutual_tls", reporter="destination", response_code="2xx")  # fmt: skip
    assert mutual == 3  # two HTTP/1.1 requests and one h2 stream
    plaintext = sample(samples, "istio_requests_total", source_principal="unknown", connection_security_policy="none")
    assert plaintext == 1


def test_tcp_connections_carry_the_peers_spiffe_ids(certs: Path) -> None:  # noqa: F811
    inbound_db = "inbound|5432||db.ran.svc.cluster.local"
    with Upstream() as upstream:
        listeners, clusters = chains(upstream.addr[1])
        listeners = tuple(
            replace(lsn, tcp_clusters=(replace(lsn.tcp_clusters[0], name=inbound_db),)) for lsn in listeners
        )
        clusters = {inbound_db: replace(clusters["db"], name=inbound_db)}
        with serve_tcp(upstream, listeners=listeners, clusters=clusters) as px:
            assert tls_call(px, client_ctx(certs)) == b"echo:ping"
            assert tls_call(px, client_ctx(certs)) == b"echo:ping"
            deadline = time.monotonic() + 5  # the proxy sees the last close a moment after the client
            while sum(r["tcp_closed"] for r in px.proxy.istio.report(PLANE)) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            samples = scrape(px.proxy)
    labels = {
        "source_principal": str(AMF),
        "destination_principal": str(AMF),
        "request_protocol": "tcp",
        "connection_security_policy": "mutual_tls",
    }  # fmt: skip  (serve() gives the proxy amf's certificate)
    assert sample(samples, "istio_tcp_connections_opened_total", **labels) == 2
    assert sample(samples, "istio_tcp_connections_closed_total", **labels) == 2
    assert sample(samples, "istio_tcp_received_bytes_total", **labels) == 8  # "ping" twice, from the client
    assert sample(samples, "istio_tcp_sent_bytes_total", **labels) == 18  # "echo:ping" twice, to the client
