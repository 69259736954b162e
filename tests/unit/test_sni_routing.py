"""SNI routing of passthrough connections: Envoy's filter_chain_match semantics (port, most specific prefix,
exact then longest wildcard server name, no backtracking), and how xDS and the data-path policy carry it."""

from __future__ import annotations

import pytest

from planemesh.agent.proxy.sni_routing import SniRoutes, candidate_names, server_name_error
from planemesh.ebpf.abi import Action
from planemesh.ebpf.policy import PolicyRule, needs_sniff_listener, policy_from_snapshot
from planemesh.model.config import ConfigError, Listener, ListenerProtocol, Snapshot, WeightedCluster
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import UndeclaredPorts
from planemesh.model.static_config import load_default_config
from planemesh.xds.translate import translate
from tests.unit.test_xds_translate import PASS, static_cluster, tcp_listener, to_resources

PLANES = load_default_config().planes  # oam 198.18.1.0/24, media 198.18.2.0/24 (+ v6)


def chain(
    name: str,
    *names: str,
    port: int = 443,
    prefixes: tuple[str, ...] = (),
    cluster: str | None = None,
    protocol: ListenerProtocol = ListenerProtocol.TCP,
) -> Listener:
    return Listener(
        name=name, plane="oam", port=port, protocol=protocol,
        prefixes=tuple(IPNetwork(p) for p in prefixes), server_names=names,
        tcp_clusters=(WeightedCluster(cluster or f"{name}-cluster", 1),),
    )  # fmt: skip


CHAINS = SniRoutes(
    [
        chain("exact", "api.example.com", "www.example.com"),
        chain("wild", "*.example.com"),
        chain("deeper", "*.eu.example.com"),
        chain("tld", "*.org"),
        chain("fallback"),  # no server_names: any SNI, or none
        chain("db-exact", "db.internal", port=5432),
        chain("subnet", "*.example.com", prefixes=("198.18.1.128/25",)),
        chain("subnet-v6", "v6.example.com", prefixes=("fd00:18:1::/64",)),
        chain("web", protocol=ListenerProtocol.HTTP, port=80),  # an HTTP chain is never a passthrough chain
    ]
)

SELECT = [
    # (description, port, destination, SNI, expected chain name or None: the original destination)
    ("exact name", 443, "198.18.1.20", "api.example.com", "exact"),
    ("exact name, another of the same chain", 443, "198.18.1.20", "www.example.com", "exact"),
    ("SNI compared case-insensitively", 443, "198.18.1.20", "API.Example.COM", "exact"),
    ("wildcard, one label", 443, "198.18.1.20", "shop.example.com", "wild"),
    ("wildcard, several labels", 443, "198.18.1.20", "a.b.example.com", "wild"),
    ("longest wildcard suffix wins", 443, "198.18.1.20", "paris.eu.example.com", "deeper"),
    ("*.eu.example.com does not take eu.example.com", 443, "198.18.1.20", "eu.example.com", "wild"),
    ("a wildcard never matches the bare domain", 443, "198.18.1.20", "example.com", "fallback"),
    ("shortest wildcard", 443, "198.18.1.20", "planemesh.org", "tld"),
    ("unknown SNI: the chain without server_names", 443, "198.18.1.20", "other.test", "fallback"),
    ("no SNI (not TLS): only chains without server_names", 443, "198.18.1.20", None, "fallback"),
    ("empty SNI is no SNI", 443, "198.18.1.20", "", "fallback"),
    ("no chain on the port: original destination", 8443, "198.18.1.20", "api.example.com", None),
    ("port decides first", 5432, "198.18.1.20", "db.internal", "db-exact"),
    ("port without a catch-all: unknown SNI is unrouted", 5432, "198.18.1.20", "other.internal", None),
    ("more specific prefix wins over an exact name elsewhere", 443, "198.18.1.200", "x.example.com", "subnet"),
    # Envoy does not backtrack: the /25 matched, it has no chain for this SNI, so nothing matches.
    ("no backtracking to less specific prefixes", 443, "198.18.1.200", "planemesh.org", None),
    ("v4-mapped destination is the v4 address", 443, "::ffff:198.18.1.200", "a.example.com", "subnet"),
    ("IPv6 prefix", 443, "fd00:18:1::20", "v6.example.com", "subnet-v6"),
    ("IPv6 prefix, other name: no backtracking", 443, "fd00:18:1::20", "api.example.com", None),
    ("IPv6 outside the prefix: the any-address chains", 443, "fd00:18:9::1", "api.example.com", "exact"),
    ("an HTTP chain's port is not a passthrough port", 80, "198.18.1.20", None, None),
]


@pytest.mark.parametrize(("port", "dst", "sni", "expected"), [c[1:] for c in SELECT], ids=[c[0] for c in SELECT])
def test_select(port: int, dst: str, sni: str | None, expected: str | None) -> None:
    found = CHAINS.select(port, dst, sni)
    assert (found.name if found else None) == expected


def test_declares_only_tcp_proxy_ports() -> None:
    assert CHAINS.declares(443) and CHAINS.declares(5432)
    assert not CHAINS.declares(80) and not CHAINS.declares(8443)


def test_chain_actions_are_stable_per_snapshot() -> None:
    """One RouteAction per chain: the balancer keys weighted-cluster state by it."""
    routes = SniRoutes([
        chain("one", "a.test"),
        Listener("split", "oam", 443, ListenerProtocol.TCP, server_names=("b.test",),
                 tcp_clusters=(WeightedCluster("blue", 9), WeightedCluster("green", 1))),
        Listener("orig", "oam", 443, ListenerProtocol.TCP),
    ])  # fmt: skip
    one = routes.select(443, "198.18.1.1", "a.test")
    assert one is not None and one.action is not None and one.action.cluster == "one-cluster"
    assert one.action is routes.select(443, "198.18.1.2", "a.test").action  # type: ignore[union-attr]
    split = routes.select(443, "198.18.1.1", "b.test")
    assert split is not None and split.action is not None
    assert [(w.name, w.weight) for w in split.action.weighted] == [("blue", 9), ("green", 1)]
    orig = routes.select(443, "198.18.1.1", None)
    assert orig is not None and orig.action is None  # a chain without a cluster: the original destination


def test_candidate_names() -> None:
    assert list(candidate_names("a.b.example.com")) == ["a.b.example.com", "*.b.example.com", "*.example.com", "*.com"]
    assert list(candidate_names("localhost")) == ["localhost"]


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("api.example.com", True),
        ("*.example.com", True),
        ("*.com", True),
        ("", False),
        ("*", False),
        ("*.", False),
        ("api.*.com", False),
        ("*example.com", False),
        ("**.example.com", False),
        ("a..b", False),
        ("bad name", False),
        ("x" * 254, False),
    ],
)
def test_server_name_validation(name: str, ok: bool) -> None:
    assert (server_name_error(name) is None) == ok


# ---- xDS: filter_chain_match.server_names + tcp_proxy clusters ------------------------------------


def sni_listener(**extra) -> dict:
    doc = tcp_listener(name="tls", address="0.0.0.0", port=443, cluster="pass")
    base = doc["filter_chains"][0]
    doc["filter_chains"] = [
        {**base, "name": "to-web", "filter_chain_match": {"server_names": ["Web.Example.com", "*.web.test"]},
         "filters": [{**base["filters"][0], "typed_config": {**base["filters"][0]["typed_config"], "cluster": "web"}}]},
        {**base, "name": "split", "filter_chain_match": {"server_names": ["split.test"]},
         "filters": [{**base["filters"][0], "typed_config": {
             "@type": base["filters"][0]["typed_config"]["@type"], "stat_prefix": "s",
             "weighted_clusters": {"clusters": [{"name": "web", "weight": 3}, {"name": "pass", "weight": 1}]}}}]},
        {**base, "name": "rest"},
    ]  # fmt: skip
    doc["metadata"] = {"filter_metadata": {"planemesh": {"plane": "oam"}}}
    doc.update(extra)
    return doc


def test_xds_chains_become_sni_routed_listeners() -> None:
    snap = translate(to_resources([sni_listener(), PASS, static_cluster()]), PLANES)
    by_name = {lsn.name: lsn for lsn in snap.listeners}
    assert by_name["to-web"].server_names == ("web.example.com", "*.web.test")
    assert by_name["to-web"].tcp_clusters == (WeightedCluster("web", 1),)
    assert by_name["split"].tcp_clusters == (WeightedCluster("web", 3), WeightedCluster("pass", 1))
    assert by_name["rest"].server_names == () and by_name["rest"].tcp_clusters == (WeightedCluster("pass", 1),)
    routes = SniRoutes(snap.listeners_of("oam"))
    assert routes.select(443, "198.18.1.5", "a.web.test").name == "to-web"  # type: ignore[union-attr]
    assert routes.select(443, "198.18.1.5", None).name == "rest"  # type: ignore[union-attr]


def test_xds_bad_server_name_names_the_field() -> None:
    doc = sni_listener()
    doc["filter_chains"][1]["filter_chain_match"]["server_names"] = ["ok.test", "api.*.test"]
    with pytest.raises(ConfigError) as err:
        translate(to_resources([doc, PASS, static_cluster()]), PLANES)
    assert "listener[tls].filter_chains[1].filter_chain_match.server_names[1]" in str(err.value)


def test_same_server_name_twice_on_a_port_is_refused() -> None:
    doc = sni_listener()
    doc["filter_chains"][1]["filter_chain_match"]["server_names"] = ["web.example.com"]
    with pytest.raises(ConfigError) as err:
        translate(to_resources([doc, PASS, static_cluster()]), PLANES)
    assert "already declared by 'to-web'" in str(err.value)


# ---- data path: SNI-routed ports are sniffed, and the plane gets its sniff listener ------------------------


def test_policy_sniffs_sni_routed_ports_only() -> None:
    snap = translate(
        to_resources([sni_listener(), tcp_listener(address="198.18.1.9", port=5432), PASS, static_cluster()]), PLANES
    )
    rules = policy_from_snapshot(snap).rules
    oam = snap.plane("oam").plane_id
    assert rules[PolicyRule(oam, 443)] is Action.SNIFF  # the chain without server_names shares the key
    assert rules[PolicyRule(oam, 5432)] is Action.BYPASS
    assert snap.plane("oam").undeclared is UndeclaredPorts.BYPASS
    assert needs_sniff_listener(snap, snap.plane("oam"))
    assert not needs_sniff_listener(snap, snap.plane("media"))
    plain = Snapshot(version="t", planes=snap.planes)
    assert not needs_sniff_listener(plain, plain.plane("oam"))
