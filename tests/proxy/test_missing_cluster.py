"""A route or tcp_proxy naming a cluster that does not exist (an xDS update removed it, or it has not
arrived): Envoy accepts the configuration and answers at request time, 503 with response flag NC for HTTP,
a closed connection for TCP. Never forwarded anywhere else (not to the original destination)."""

from __future__ import annotations

import socket

import grpc
import pytest

from planemesh.model.config import Listener, ListenerProtocol, Route, RouteAction, WeightedCluster
from tests.proxy.proxy_harness import Backend, ProxyThread, log_line_for
from tests.proxy.test_proxy_resilience import get as _get
from tests.proxy.test_sniff_passthrough import PLANE, SniffProxy, TcpServer, recv_all


@pytest.fixture(scope="module")
def backend():
    with Backend() as be:
        yield be


def test_route_to_a_missing_cluster_is_503_nc(backend) -> None:
    routes = (Route(action=RouteAction(cluster="ghost")),)
    with ProxyThread([("127.0.0.1", backend.port)], routes=routes) as px:
        assert _get(px.port, "/gone") == (503, b"")
        assert '" 503 NC ' in log_line_for(px, "/gone ")
        assert px.proxy.stats.upstream_total == 0  # nothing was forwarded


def test_weighted_route_with_a_missing_cluster_is_503_nc_for_its_share(backend) -> None:
    weighted = (WeightedCluster("backend", 1), WeightedCluster("ghost", 1))
    routes = (Route(action=RouteAction(weighted=weighted)),)
    with ProxyThread([("127.0.0.1", backend.port)], routes=routes) as px:
        statuses = sorted(_get(px.port, f"/w{i}")[0] for i in range(4))
        assert statuses == [200, 200, 503, 503]  # the smooth sequence alternates: half each
        assert '" 503 NC ' in log_line_for(px, '" 503 ')


def test_http2_route_to_a_missing_cluster_is_503_nc_as_a_grpc_status(backend) -> None:
    """h2c downstream (agent/proxy/h2.py): gRPC gets UNAVAILABLE (HTTP 503), logged with NC."""
    routes = (Route(action=RouteAction(cluster="ghost")),)
    with (
        ProxyThread([("127.0.0.1", backend.port)], routes=routes) as px,
        grpc.insecure_channel(f"127.0.0.1:{px.port}") as ch,
    ):
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/t.Svc/Unary")(b"x", timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert '" 503 NC ' in log_line_for(px, '" 503 ')


def _echo(conn: socket.socket) -> None:
    conn.sendall(b"original:" + conn.recv(100))


def test_tcp_proxy_to_a_missing_cluster_closes_the_connection() -> None:
    with TcpServer(_echo) as original:
        port = original.addr[1]
        chain = Listener("to-ghost", PLANE, port, ListenerProtocol.TCP, tcp_clusters=(WeightedCluster("ghost", 1),))
        with SniffProxy((chain,)) as sniffer:
            sniffer.target = original.addr
            with sniffer.connect() as s:
                s.sendall(b"\x01\x02binary")
                with pytest.raises(ConnectionResetError):
                    recv_all(s)
        assert sniffer.proxy.sniff_stats.no_upstream == 1 and sniffer.proxy.sniff_stats.passthrough_total == 0
