"""Which tcp_proxy chain a connection takes by transport and ALPN (agent/proxy/sni_routing.py): Istio's
inbound port has an mTLS chain (transport tls, ALPN istio-peer-exchange/istio, TLS terminated), a chain for
applications doing their own TLS (transport tls, no ALPN, passed through) and a plaintext chain (raw_buffer)."""

from __future__ import annotations

import pytest

from planemesh.agent.proxy.sni_routing import SniRoutes
from planemesh.model.config import Listener, ListenerProtocol
from planemesh.model.tls_config import TlsContext

pytestmark = pytest.mark.unit
TCP = ListenerProtocol.TCP
ROUTES = SniRoutes([
    Listener("mtls", "pod", 9090, TCP, tls=TlsContext(cert="default"), transport_protocol="tls",
             application_protocols=("istio-peer-exchange", "istio")),
    Listener("app-tls", "pod", 9090, TCP, transport_protocol="tls"),
    Listener("plain", "pod", 9090, TCP, transport_protocol="raw_buffer"),
    Listener("strict", "pod", 9091, TCP, tls=TlsContext(cert="default")),
])  # fmt: skip


@pytest.mark.parametrize(
    ("port", "tls", "alpn", "chain"),
    [
        (9090, True, ("istio-peer-exchange", "istio"), "mtls"),  # a sidecar or planemesh peer
        (9090, True, ("h2", "http/1.1"), "app-tls"),  # the application's own TLS: passed through untouched
        (9090, True, (), "app-tls"),
        (9090, False, (), "plain"),
        (9091, True, (), "strict"),
        (9091, False, (), None),  # plaintext on a TLS-only port: no chain (refused by the sniffing listener)
    ],
)
def test_transport_and_alpn_pick_the_chain(port, tls, alpn, chain) -> None:
    got = ROUTES.select(port, "10.0.0.1", None, tls, alpn)
    assert (got.name if got else None) == chain
    assert ROUTES.guarded(9091) and ROUTES.terminates_tls(9090) and not ROUTES.guarded(1)
