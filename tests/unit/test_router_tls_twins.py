"""A permissive port's twins (a TLS-terminating listener and a plaintext one for one destination): the L7
router gives a terminated connection the TLS twin's route config and a plaintext one the other's, whatever
their order (agent/proxy/routing.py PlaneRouter.route_config). Before, the first twin served both."""

from __future__ import annotations

import dataclasses

import pytest

from planemesh.agent.proxy.routing import PlaneRouter
from planemesh.model.config import Listener, ListenerProtocol
from planemesh.model.ip import IPNetwork
from planemesh.model.tls_config import TlsContext
from tests.unit.test_proxy_routing import _snapshot

TLS = TlsContext(cert="default", trust="ROOTCA", require_client_cert=True)
NARROW = (IPNetwork("198.18.1.128/25"),)


def _router(tls_first: bool) -> PlaneRouter:
    snap = _snapshot()
    mtls = Listener("m", "oam", 8443, ListenerProtocol.HTTP, route_config="b", tls=TLS, transport_protocol="tls")
    plain = Listener("p", "oam", 8443, ListenerProtocol.HTTP, route_config="a", transport_protocol="raw_buffer")
    other = Listener("n", "oam", 8443, ListenerProtocol.HTTP, route_config="a", prefixes=NARROW)
    twins = (mtls, other, plain) if tls_first else (plain, other, mtls)
    return PlaneRouter(dataclasses.replace(snap, listeners=snap.listeners + twins), "oam")


@pytest.mark.parametrize("tls_first", [True, False])
def test_each_twin_serves_its_own_transport(tls_first: bool) -> None:
    router = _router(tls_first)
    assert router.route_config("198.18.1.5", 8443, tls=True).name == "b"
    assert router.route_config("198.18.1.5", 8443, tls=False).name == "a"
    assert router.route_config("198.18.1.5", 8443).name == "a"  # plaintext unless told
    # the prefix match comes first: the narrower plaintext listener serves its destinations even over TLS
    assert router.route_config("198.18.1.200", 8443, tls=True).name == "a"
