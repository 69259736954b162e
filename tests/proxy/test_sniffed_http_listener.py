"""An HTTP listener with sniff=True (istiod's HTTP chain + tcp_proxy fallback on one destination, i.e. an
auto-protocol port) over real loopback sockets: HTTP is proxied with that listener's routes, other bytes pass
through to the original destination byte-exact."""

from __future__ import annotations

import os

from planemesh.model.config import Listener, ListenerProtocol
from tests.proxy.proxy_harness import PLANE, Backend
from tests.proxy.test_sniff_passthrough import SniffProxy, TcpServer, recv_all


def _echo(conn) -> None:
    conn.sendall(recv_all(conn))


def _auto(port: int) -> Listener:
    # route config "rc" of the harness sends everything to cluster "backend", which has no endpoints here
    return Listener("auto", PLANE, port, ListenerProtocol.HTTP, route_config="rc", sniff=True)


def test_http_uses_the_sniffed_listeners_routes() -> None:
    with Backend() as backend, SniffProxy((_auto(backend.port),)) as sniffer:
        sniffer.target = ("127.0.0.1", backend.port)
        with sniffer.connect() as s:
            s.sendall(b"GET /auto HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
            reply = recv_all(s)
        # the listener's route (cluster "backend", no endpoints) answered, not the original destination
        assert reply.startswith(b"HTTP/1.1 503") and not backend.seen
    assert sniffer.proxy.sniff_stats.kinds["http1"] == 1


def test_other_bytes_pass_through_to_the_original_destination() -> None:
    payload = os.urandom(1 << 20)
    with TcpServer(_echo) as server, SniffProxy((_auto(server.addr[1]),)) as sniffer:
        sniffer.target = server.addr
        with sniffer.connect() as s:
            s.sendall(payload)
            s.shutdown(1)
            assert recv_all(s) == payload
        assert not server.errors
    assert sniffer.proxy.sniff_stats.passthrough_total == 1
