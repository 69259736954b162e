"""Network RBAC (envoy.filters.network.rbac) on tcp_proxy chains over real loopback sockets: the rules come
from the xDS proto through translation, the sniffing listener takes the chain's connections, an allowed one
is relayed byte for byte, a denied one is reset before the upstream sees it, counted and logged."""

from __future__ import annotations

import logging
import socket

import pytest
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2
from google.protobuf import any_pb2, json_format

from planemesh.agent.proxy.circuit import CONNECTIONS
from planemesh.model.config import Cluster, ClusterKind, Endpoint, Listener, ListenerProtocol, WeightedCluster
from planemesh.model.ip import IPNetwork
from planemesh.xds.translate_rbac import translate_network_rbac
from tests.proxy.proxy_harness import PLANE
from tests.proxy.test_sniff_passthrough import SniffProxy, TcpServer, recv_all
from tests.support.waiting import wait_for


def network_rbac(rules: dict) -> tuple:
    msg = json_format.ParseDict({"stat_prefix": "tcp", "rules": rules}, rbac_pb2.RBAC())
    packed = any_pb2.Any()
    packed.Pack(msg)
    rbac = translate_network_rbac(packed, "filters[0]")
    assert rbac is not None
    return (rbac,)


def _echo(conn: socket.socket) -> None:
    conn.sendall(b"echo:" + conn.recv(100))


def _call(sniffer: SniffProxy) -> bytes:
    with sniffer.connect() as s:
        s.sendall(b"ping")
        try:
            return recv_all(s)
        except ConnectionResetError:
            return b"<reset>"


def _chain(port: int, rules: dict) -> Listener:
    return Listener("db", PLANE, port, ListenerProtocol.TCP, tcp_clusters=(WeightedCluster("db", 1),),
                    network_rbac=network_rbac(rules))  # fmt: skip


@pytest.mark.parametrize(
    ("rules", "allowed"),
    [
        ({"action": "ALLOW", "policies": {"lo": {"permissions": [{"any": True}],
          "principals": [{"source_ip": {"address_prefix": "127.0.0.0", "prefix_len": 8}}]}}}, True),
        ({"action": "ALLOW", "policies": {"other-net": {"permissions": [{"any": True}],
          "principals": [{"remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}]}}}, False),
        ({"action": "DENY", "policies": {"no-db-port": {"permissions": [{"destination_port": 0}],
          "principals": [{"any": True}]}}}, False),  # destination_port filled in below
        ({"action": "ALLOW", "policies": {"plane": {"permissions": [{"any": True}],
          "principals": [{"filter_state": {"key": "planemesh.plane", "string_match": {"exact": PLANE}}}]}}}, True),
        ({"action": "ALLOW", "policies": {"other-plane": {"permissions": [{"any": True}],
          "principals": [{"filter_state": {"key": "planemesh.plane", "string_match": {"exact": "ran"}}}]}}}, False),
        ({"action": "ALLOW", "policies": {"mtls-only": {"permissions": [{"any": True}],
          "principals": [{"authenticated": {"principal_name": {"exact": "spiffe://cluster.local/ns/a/sa/b"}}}]}}},
         False),  # a plaintext connection has no identity
    ],
)  # fmt: skip
def test_network_rbac_allows_or_resets(rules: dict, allowed: bool, caplog) -> None:
    with TcpServer(_echo) as upstream:
        port = 15432
        policy = next(iter(rules["policies"].values()))
        if "destination_port" in policy["permissions"][0]:
            policy["permissions"][0]["destination_port"] = port
        clusters = {"db": Cluster("db", ClusterKind.STATIC, endpoints=(Endpoint("127.0.0.1", upstream.addr[1]),))}
        with SniffProxy((_chain(port, rules),), clusters) as sniffer, caplog.at_level(logging.INFO):
            sniffer.target = ("127.0.0.1", port)  # the original destination the chain declares
            got = _call(sniffer)
            assert _call(sniffer) == got  # every connection is checked, the worker keeps serving
        assert not upstream.errors
    stats = sniffer.proxy
    if allowed:
        assert got == b"echo:ping" and stats.tls_stats.rbac_denied == 0
        assert stats.sniff_stats.passthrough_total == 2
    else:
        assert got in (b"", b"<reset>") and stats.tls_stats.rbac_denied == 2
        assert stats.sniff_stats.passthrough_total == 0  # the upstream never saw the connection
        name = next(iter(rules["policies"]))
        why = f"deny policy {name}" if rules["action"] == "DENY" else "no ALLOW policy matched"
        assert f"tcp 127.0.0.1:{port} from 127.0.0.1 (plaintext) on chain db: denied, {why}" in caplog.text


def test_guarded_port_refuses_what_no_chain_takes() -> None:
    """Only an SNI chain with RBAC on the port: a connection without that SNI matches no chain and is refused
    instead of reaching its original destination unauthorized (Envoy closes it too)."""
    rules = {"action": "ALLOW", "policies": {"all": {"permissions": [{"any": True}], "principals": [{"any": True}]}}}
    with TcpServer(_echo) as original:
        port = original.addr[1]
        chain = Listener("sni", PLANE, port, ListenerProtocol.TCP, server_names=("db.test",),
                         network_rbac=network_rbac(rules))  # fmt: skip
        with SniffProxy((chain,)) as sniffer:
            sniffer.target = original.addr
            assert _call(sniffer) in (b"", b"<reset>")
        assert sniffer.proxy.sniff_stats.no_upstream == 1 and sniffer.proxy.sniff_stats.passthrough_total == 0


def test_network_rbac_sees_a_same_node_client_pods_identity() -> None:
    """The server's tcp_proxy chain allows principal sa/client only (AuthorizationPolicy for TCP). The node's pod
    table (Listener.workload_principal: pod a at 127.0.0.2, pod d at 127.0.0.4) gives a plaintext same-node
    client its SPIFFE ID, as its sidecar's mTLS would have: a is relayed, d and an address that is no local pod
    (127.0.0.5) are reset. Before, a same-node client had no identity for network RBAC: all three were reset."""
    allow_a = {"action": "ALLOW", "policies": {"ns[default]-policy[tcp-a]-rule[0]": {"permissions": [{"any": True}],
               "principals": [{"authenticated": {"principal_name": {"exact": SA_A}}}]}}}  # fmt: skip
    pods = tuple(Listener(f"0.0.0.0_9999~{name}.default", PLANE, 9999, ListenerProtocol.TCP,
                          sources=(IPNetwork(f"{addr}/32"),), workload_principal=f"{SA_PREFIX}{name}")
                 for name, addr in (("client", "127.0.0.2"), ("other", "127.0.0.4")))  # fmt: skip
    with TcpServer(_echo) as upstream:
        port = 15433
        clusters = {"db": Cluster("db", ClusterKind.STATIC, endpoints=(Endpoint("127.0.0.1", upstream.addr[1]),))}
        with SniffProxy((_chain(port, allow_a), *pods), clusters) as sniffer:
            sniffer.target = ("127.0.0.1", port)
            got = {src: _call_from(sniffer, src) for src in ("127.0.0.2", "127.0.0.4", "127.0.0.5")}
        assert not upstream.errors
    assert got == {"127.0.0.2": b"echo:ping", "127.0.0.4": b"<reset>", "127.0.0.5": b"<reset>"}, got
    assert sniffer.proxy.tls_stats.rbac_denied == 2


SA_PREFIX = "spiffe://cluster.local/ns/default/sa/"
SA_A = SA_PREFIX + "client"


def _call_from(sniffer: SniffProxy, source: str) -> bytes:
    with socket.create_connection(("127.0.0.1", sniffer.port), timeout=5, source_address=(source, 0)) as s:
        s.sendall(b"ping")
        try:
            return recv_all(s)
        except ConnectionResetError:
            return b"<reset>"


def test_a_same_node_pods_relayed_chain_meets_the_server_pods_network_rbac() -> None:
    """Pods a (sa client) and d (sa other) have their own chain of port 15434: tcp_proxy to cluster db, whose
    endpoint is pod b (127.0.0.1). b's inbound chain at its address and port denies sa client (network RBAC).
    With sidecars a's relay would reach b's sidecar, which refuses it; d's passes. Before, only the client's
    chain applied: both were relayed to b."""
    deny_a = {"action": "DENY", "policies": {"ns[default]-policy[no-a]-rule[0]": {"permissions": [{"any": True}],
              "principals": [{"authenticated": {"principal_name": {"exact": SA_A}}}]}}}  # fmt: skip
    with TcpServer(_echo) as upstream:
        port = 15434
        own = tuple(Listener(f"0.0.0.0_{port}~{name}.default", PLANE, port, ListenerProtocol.TCP,
                             tcp_clusters=(WeightedCluster("db", 1),), sources=(IPNetwork(f"{addr}/32"),),
                             workload_principal=f"{SA_PREFIX}{name}")
                    for name, addr in (("client", "127.0.0.2"), ("other", "127.0.0.4")))  # fmt: skip
        server = Listener("virtualInbound~b.default", PLANE, upstream.addr[1], ListenerProtocol.TCP,
                          prefixes=(IPNetwork("127.0.0.1/32"),), network_rbac=network_rbac(deny_a),
                          workload_principal=f"{SA_PREFIX}server")  # fmt: skip
        clusters = {"db": Cluster("db", ClusterKind.STATIC, endpoints=(Endpoint("127.0.0.1", upstream.addr[1]),))}
        with SniffProxy((*own, server), clusters) as sniffer:
            sniffer.target = ("127.0.0.9", port)  # the address the clients dialled (a service VIP)
            got = {src: _call_from(sniffer, src) for src in ("127.0.0.2", "127.0.0.4")}
            breaker = sniffer.proxy.table.balancer.breaker(clusters["db"])  # both connections' units given back
            wait_for(lambda: breaker.counts[CONNECTIONS] == 0, 5.0, "db's connection units back")
        assert not upstream.errors
    assert got == {"127.0.0.2": b"<reset>", "127.0.0.4": b"echo:ping"}, got
    assert sniffer.proxy.tls_stats.rbac_denied == 1
