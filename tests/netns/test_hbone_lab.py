"""HBONE between two node namespaces, each with its own HBONE node process, a pod behind each.

Pod A's plaintext connection to pod B is captured by node A's TC program, crosses the inter-node link only as
TLS to port 15008 (an AF_PACKET capture on the link never sees the payload marker, and every TCP segment there
has 15008 on one side), and arrives at pod B in plaintext, byte for byte. An RBAC DENY for pod A's SPIFFE ID on
node B refuses it; a node A whose CA is not node B's root is refused at the handshake. A port that is not
tunnelled crosses the link in plaintext (the control: the capture would have seen a marker).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from planemesh.agent.identity.ca import new_root, utcnow
from tests.netns.agent_lab import eventually
from tests.netns.hbone_lab import (
    BYPASS_PORT,
    ID_A,
    NODE_A_LINK,
    POD_B6,
    LinkCapture,
    hbone_lab,
    node_a_settings,
    node_b_settings,
    pod_exchange,
)

pytestmark = [pytest.mark.netns, pytest.mark.bpf]
MARKER = b"PLAINTEXT-MARKER-" + os.urandom(8).hex().encode()


def deny_amf() -> list:
    return [{"rules": {"action": "DENY", "policies": {"deny-amf": {
        "permissions": [{"any": True}],
        "principals": [{"authenticated": {"principal_name": {"exact": ID_A}}}]}}}}]  # fmt: skip


@pytest.fixture
def lab(run_prefix: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    with hbone_lab(run_prefix, tmp_path) as lab:
        lab.start_server()
        root = new_root("cluster.local", now=utcnow())
        lab.ca_a = lab.write_ca("ca-a", root.intermediate("node-a", now=utcnow()))  # type: ignore[attr-defined]
        lab.ca_b = lab.write_ca("ca-b", root.intermediate("node-b", now=utcnow()))  # type: ignore[attr-defined]
        yield lab


def test_pod_traffic_crosses_the_link_only_as_tls_to_15008_and_arrives_in_plaintext(lab) -> None:  # type: ignore[no-untyped-def]
    lab.start_node("b", node_b_settings(lab.ca_b))
    lab.start_node("a", node_a_settings(lab.ca_a))
    cap = LinkCapture(lab.node_a, "hbla")
    payload = MARKER * 2000  # ~50 KB, many DATA frames
    answers = [pod_exchange(lab, payload) for _ in range(5)]
    segments = cap.stop()
    # pod B saw every byte, in plaintext, from node B (the tunnel's end), not from pod A
    assert answers == [b"B saw %d bytes from 10.81.2.1: %s" % (len(payload), payload[:64])] * 5
    tcp_on_link = [(s, d) for s, d, _ in segments]
    assert tcp_on_link, "the capture saw nothing on the link"
    assert all(15008 in pair for pair in tcp_on_link), {p for p in tcp_on_link if 15008 not in p}
    wire = b"".join(p for _, _, p in segments)
    assert len(wire) > 5 * len(payload)  # the bytes did cross the link ...
    assert MARKER not in wire and b"PLAINTEXT-MARKER" not in wire  # ... encrypted
    assert not any(b"PLAINTEXT-MARKER" in frame for frame in cap.frames)  # nor in any frame of any protocol
    assert any(p[:1] == b"\x17" for _, _, p in segments)  # TLS application-data records
    assert eventually(lambda: lab.stats("a").get("tunnels_out") == 5), lab.stats("a")
    assert lab.stats("a")["connections_out"] == 1  # one pooled connection carried the five tunnels
    assert eventually(lambda: lab.stats("b").get("tunnels_in") == 5), lab.stats("b")
    assert lab.stats("b")["connections_in"] == 1

    # control: the same exchange on a port that is not tunnelled crosses the link in plaintext
    cap = LinkCapture(lab.node_a, "hbla")
    assert pod_exchange(lab, MARKER, port=BYPASS_PORT).startswith(b"B saw")
    assert MARKER in b"".join(p for _, _, p in cap.stop())


def test_ipv6_pods_over_the_same_tunnel(lab) -> None:  # type: ignore[no-untyped-def]
    lab.start_node("b", node_b_settings(lab.ca_b))
    lab.start_node("a", node_a_settings(lab.ca_a))
    cap = LinkCapture(lab.node_a, "hbla")
    assert pod_exchange(lab, MARKER, dst=POD_B6) == b"B saw %d bytes from fd81:2::1: %s" % (len(MARKER), MARKER)
    segments = cap.stop()
    assert segments and all(15008 in (s, d) for s, d, _ in segments)
    assert not any(MARKER in frame for frame in cap.frames)
    assert eventually(lambda: lab.stats("b").get("tunnels_in") == 1), lab.stats("b")


def test_rbac_deny_for_the_source_identity_refuses_the_tunnel(lab) -> None:  # type: ignore[no-untyped-def]
    lab.start_node("b", node_b_settings(lab.ca_b, rbac=deny_amf()))
    lab.start_node("a", node_a_settings(lab.ca_a))
    assert pod_exchange(lab, MARKER) == b""  # closed, nothing from pod B
    assert eventually(lambda: lab.stats("b").get("refused_in") == {"rbac_denied": 1}), lab.stats("b")
    assert lab.stats("b")["tunnels_in"] == 0
    assert eventually(lambda: lab.stats("a").get("refused_out") == {"status_403": 1}), lab.stats("a")


def test_a_node_from_another_ca_is_refused(lab) -> None:  # type: ignore[no-untyped-def]
    foreign = new_root("cluster.local", now=utcnow()).intermediate("node-a", now=utcnow())
    lab.start_node("b", node_b_settings(lab.ca_b))
    lab.start_node("a", node_a_settings(lab.write_ca("ca-foreign", foreign), peer_identity=None))
    assert pod_exchange(lab, MARKER) == b""
    assert eventually(lambda: lab.stats("a").get("refused_out") == {"connect_failed": 1}), lab.stats("a")
    assert lab.stats("b")["connections_in"] == 0 and lab.stats("b")["tunnels_in"] == 0
    assert NODE_A_LINK
