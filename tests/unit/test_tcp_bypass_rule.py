"""Which single-cluster tcp_proxy chains the kernel may bypass (ebpf/policy.py keeps_destination,
xds/translate_tcp.py): only those whose cluster would pick the connection's original destination anyway.
Everything else (istio's VirtualService `tcp:` route to another service, a DestinationRule subset, a cluster
elsewhere) is relayed by the plane's proxy (SNIFF). Before, every single-cluster chain was a BYPASS and its
cluster was ignored."""

from __future__ import annotations

import pytest

from planemesh.ebpf.abi import Action
from planemesh.ebpf.policy import PolicyRule, keeps_destination, policy_from_snapshot
from tests.unit.test_xds_istio_translate import listener, run, tcp
from tests.unit.test_xds_translate import T, static_cluster

VIP, PORT = "10.96.5.5", 9400  # a service VIP: on no plane, the listener does not bind (istiod's VIP_PORT)
DB = f"outbound|{PORT}||db.default.svc.cluster.local"
VS_META = {"filter_metadata": {"istio": {"config": "/apis/networking.istio.io/v1alpha3/namespaces/default/"
                                                   "virtual-service/db-route"}}}  # fmt: skip


def _eds(name: str) -> dict:
    return {"@type": T + "envoy.config.cluster.v3.Cluster", "name": name, "type": "EDS",
            "eds_cluster_config": {"eds_config": {"ads": {}}}}  # fmt: skip


def _cla(name: str, *addresses: str, port: int = PORT) -> dict:
    eps = [{"endpoint": {"address": {"socket_address": {"address": a, "port_value": port}}}} for a in addresses]
    return {"@type": T + "envoy.config.endpoint.v3.ClusterLoadAssignment", "cluster_name": name,
            "endpoints": [{"lb_endpoints": eps}]}  # fmt: skip


def _vip_listener(cluster: str, **chain_fields) -> dict:
    chain = {"filters": [tcp(cluster)], **chain_fields}
    return listener([chain], name=f"{VIP}_{PORT}", address=VIP, port=PORT, bind_to_port=False)


def _prefix_listener(cluster: str, prefix: str, length: int = 32) -> dict:
    match = {"prefix_ranges": [{"address_prefix": prefix, "prefix_len": length}]}
    return listener([{"filter_chain_match": match, "filters": [tcp(cluster)]}], name=f"0.0.0.0_{PORT}", port=PORT)


OTHER = f"outbound|{PORT}||other.default.svc.cluster.local"
SUBSET = f"outbound|{PORT}|v2|db.default.svc.cluster.local"
OTHER_PORT = "outbound|7000||db.default.svc.cluster.local"
CASES = {
    # istiod's own chain of the service: no VirtualService applies -> the service address is the cluster's choice
    "own service": ([_vip_listener(DB), _eds(DB), _cla(DB, "198.18.1.20")], VIP, Action.BYPASS),
    # VirtualService tcp route to another host: chain metadata istio.config, another cluster
    "vs to another service": (
        [_vip_listener(OTHER, metadata=VS_META), _eds(OTHER), _cla(OTHER, "198.18.1.30")],
        VIP,
        Action.SNIFF,
    ),
    # a VirtualService naming the service itself: the chain is the VirtualService's (kept conservative)
    "vs to the same service": (
        [_vip_listener(DB, metadata=VS_META), _eds(DB), _cla(DB, "198.18.1.20")],
        VIP,
        Action.SNIFF,
    ),
    "destination rule subset": ([_vip_listener(SUBSET), _eds(SUBSET), _cla(SUBSET, "198.18.1.21")], VIP, Action.SNIFF),
    "another port of the service": (
        [_vip_listener(OTHER_PORT), _eds(OTHER_PORT), _cla(OTHER_PORT, "198.18.1.20", port=7000)],
        VIP,
        Action.SNIFF,
    ),
    # a chain with its own destination subnets on a VIP listener (VirtualService destinationSubnets)
    "own-looking chain with its own prefixes": (
        [
            listener(
                [
                    {
                        "filter_chain_match": {"prefix_ranges": [{"address_prefix": VIP, "prefix_len": 32}]},
                        "filters": [tcp(DB)],
                    }
                ],
                name=f"{VIP}_{PORT}",
                address=VIP,
                port=PORT,
                bind_to_port=False,
            ),
            _eds(DB),
            _cla(DB, "198.18.1.20"),
        ],
        VIP,
        Action.SNIFF,
    ),
    "passthrough cluster": ([_vip_listener("pass")], VIP, Action.BYPASS),  # ORIGINAL_DST
    # no istio naming: a cluster whose (healthy) endpoints hold the chain's one destination at its port
    "endpoints hold the destination": (
        [_prefix_listener("web", "198.18.1.20"), static_cluster("web", "198.18.1.20", PORT)],
        "198.18.1.20",
        Action.BYPASS,
    ),
    "endpoint elsewhere": (
        [_prefix_listener("web", "198.18.1.20"), static_cluster("web", "198.18.1.21", PORT)],
        "198.18.1.20",
        Action.SNIFF,
    ),
    "endpoint on another port": (
        [_prefix_listener("web", "198.18.1.20"), static_cluster("web", "198.18.1.20", 80)],
        "198.18.1.20",
        Action.SNIFF,
    ),
    "a prefix, not one destination": (
        [_prefix_listener("web", "198.18.1.0", 24), static_cluster("web", "198.18.1.20", PORT)],
        "198.18.1.0/24",
        Action.SNIFF,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bypass_only_where_the_cluster_picks_the_original_destination(case: str) -> None:
    docs, dst, action = CASES[case]
    snap, _notes = run(docs)
    prefix = dst if "/" in dst else f"{dst}/32"
    rules = policy_from_snapshot(snap).rules
    assert rules[PolicyRule(1, PORT, prefix)] is action, {k: v for k, v in rules.items() if k.port == PORT}


def test_own_service_is_istiods_chain_not_a_name_alone() -> None:
    """The listener's own cluster on a wildcard listener (no VIP: no one service) is not the own-service case."""
    snap, _ = run([listener([{"filters": [tcp(DB)]}], name=f"0.0.0.0_{PORT}", port=PORT), _eds(DB),
                   _cla(DB, "198.18.1.20")])  # fmt: skip
    (lsn, *_) = [lsn for lsn in snap.listeners if lsn.port == PORT]
    assert not lsn.own_service and keeps_destination(lsn, snap.clusters) is None
    assert policy_from_snapshot(snap).rules[PolicyRule(1, PORT)] is Action.SNIFF
    vip, _ = run([_vip_listener(DB), _eds(DB), _cla(DB, "198.18.1.20")])
    assert all(lsn.own_service for lsn in vip.listeners if lsn.port == PORT)
