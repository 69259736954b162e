"""TlsRoutes.decide: the chain for an original destination (most specific prefix), kept per (address, port)
for the snapshot and bounded; the decision is the same whether computed or kept."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from planemesh.agent.proxy import tls as tls_mod
from planemesh.agent.proxy.tls import TlsRoutes
from planemesh.model.ip import IPNetwork
from tests.proxy.proxy_harness import PLANE, make_snapshot
from tests.proxy.test_tls_termination import GW, NOW, ROOT, TLS, secrets


def _routes() -> TlsRoutes:
    base = make_snapshot(8443, [("127.0.0.1", 9)])
    [plain] = base.listeners
    wide = replace(plain, name="wide", prefixes=(IPNetwork("10.0.0.0/8"),), tls=TLS)
    narrow = replace(plain, name="narrow", prefixes=(IPNetwork("10.1.0.0/16"),), tls=replace(TLS, alpn=("h2",)))
    snap = replace(base, listeners=(wide, narrow), secrets=MappingProxyType(secrets(ROOT.issue(GW, now=NOW))))
    return TlsRoutes(snap, PLANE, {})


def test_most_specific_chain_and_kept_decisions(monkeypatch) -> None:
    routes = _routes()
    assert routes.decide("10.1.2.3", 8443).listener.name == "narrow"
    assert routes.decide("10.9.2.3", 8443).listener.name == "wide"
    assert routes.decide("192.0.2.1", 8443) is None  # no chain for this destination
    assert routes.decide("10.1.2.3", 80) is None  # not a TLS port
    first = routes.decide("10.1.2.3", 8443)
    assert routes.decide("10.1.2.3", 8443) is first  # kept: no second address parse
    assert first.context is not routes.decide("10.9.2.3", 8443).context  # each chain its own SSL context
    monkeypatch.setattr(tls_mod, "DECISIONS_KEPT", 3)
    for i in range(10):
        assert routes.decide(f"10.1.0.{i}", 8443).listener.name == "narrow"
    assert len(routes._decided) <= 3
