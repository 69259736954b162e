"""HBONE nodes fed by istio's WDS over ADS (the two-node lab of hbone_lab, `planemesh xds-server` on a unix
socket serving `istio.workload.Address` and `istio.security.Authorization` resources from a directory).

Neither node's settings list a workload or a pod CIDR: pod A's identity, pod B's route (a /32 to node B) and
pod B as node B's local pod all come from WDS. Pod A's connection is tunnelled; an Authorization DENY for pod
A's identity pushed over ADS refuses the next tunnel on node B (403); a bad resource is NACKed naming it, and the
last good table stays (still denied); removing the policy lets tunnels through again, and removing pod B's
workload stops the capture (the connection takes the plain route): all in the same node processes.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from pathlib import Path

import pytest
import yaml

from planemesh.agent.identity.ca import new_root, utcnow
from tests.netns.agent_lab import eventually
from tests.netns.hbone_lab import (
    NODE_B_LINK,
    POD_A,
    POD_B,
    hbone_lab,
    node_a_settings,
    node_b_settings,
    pod_exchange,
)
from tests.netns.test_agent_xds import start_server

pytestmark = [pytest.mark.netns, pytest.mark.bpf]
MARKER = b"WDS-MARKER-" + os.urandom(8).hex().encode()
TUNNELLED = b"B saw %d bytes from 10.81.2.1: " % len(MARKER)  # pod B's peer is node B: it came over HBONE
ROUTED = b"B saw %d bytes from 10.81.1.2: " % len(MARKER)  # pod A's own address: the plain route
ADDRESS = "type.googleapis.com/istio.workload.Address"
AUTHZ = "type.googleapis.com/istio.security.Authorization"


def workload(uid: str, ip: str, node: str, sa: str) -> dict:
    raw = base64.b64encode(ipaddress.ip_address(ip).packed).decode()
    return {"@type": ADDRESS, "workload": {"uid": uid, "namespace": "ran", "serviceAccount": sa, "node": node,
                                           "addresses": [raw], "tunnelProtocol": "HBONE"}}  # fmt: skip


def deny_amf(**match: list) -> dict:
    return {"@type": AUTHZ, "name": "deny-amf", "namespace": "ran", "action": "DENY", "rules": [{"clauses": [
        {"matches": [{"principals": [{"exact": "cluster.local/ns/ran/sa/amf"}], **match}]}]}]}  # fmt: skip


def write(res: Path, items: list[dict]) -> None:
    tmp = res / ".wds.tmp"
    tmp.write_text(yaml.safe_dump(items))
    tmp.rename(res / "wds.yaml")  # atomic: the server never reads half a file


def test_wds_feeds_identities_routes_and_policies_without_restart(run_prefix: str, tmp_path: Path) -> None:
    res = tmp_path / "resources"
    res.mkdir()
    pod_a, pod_b = workload("c1/pod-a", POD_A, "node-a", "amf"), workload("c1/pod-b", POD_B, "node-b", "smf")
    write(res, [pod_a, pod_b])
    sock = tmp_path / "xds.sock"
    server = start_server(res, sock)
    try:
        with hbone_lab(run_prefix, tmp_path) as lab:
            lab.start_server()
            root = new_root("cluster.local", now=utcnow())
            ca_a = lab.write_ca("ca-a", root.intermediate("node-a", now=utcnow()))
            ca_b = lab.write_ca("ca-b", root.intermediate("node-b", now=utcnow()))
            wds = {"address": f"unix://{sock}"}
            a = {**node_a_settings(ca_a), "workloads": {}, "wds": {**wds, "node": "node-a"}}
            a["peers"] = [{"name": "node-b", "address": NODE_B_LINK}]  # no CIDR: pod B's /32 comes from WDS
            b = {**node_b_settings(ca_b), "workloads": {}, "wds": {**wds, "node": "node-b"}}
            node_a, node_b = lab.start_node("a", a), lab.start_node("b", b)

            assert pod_exchange(lab, MARKER).startswith(TUNNELLED)
            assert eventually(lambda: lab.stats("b").get("tunnels_in") == 1), lab.stats("b")

            write(res, [pod_a, pod_b, deny_amf()])  # pushed over ADS: node B refuses pod A's identity
            assert eventually(lambda: pod_exchange(lab, MARKER) == b"", timeout=15)
            assert eventually(lambda: lab.stats("b").get("refused_in", {}).get("rbac_denied", 0) >= 1), lab.stats("b")

            bad = {**deny_amf(sourceIps=[{"address": "ClEBAg==", "length": 32}]), "name": "bad"}
            write(res, [pod_a, pod_b, deny_amf(), bad])
            nack = "Authorization 'ran/bad': rules[0].clauses[0].matches[0].source_ips: not supported"
            assert eventually(lambda: any(nack in x for x in node_b.output_lines), timeout=15), node_b.output_lines[-5:]
            assert pod_exchange(lab, MARKER) == b""  # the last good table: still denied
            assert eventually(lambda: lab.stats("b").get("wds_nacks", 0) >= 1), lab.stats("b")

            write(res, [pod_a, pod_b])
            assert eventually(lambda: pod_exchange(lab, MARKER).startswith(TUNNELLED), timeout=15)

            write(res, [pod_a])  # pod B gone from WDS: node A's capture rule for it goes
            assert eventually(lambda: pod_exchange(lab, MARKER).startswith(ROUTED), timeout=15)
            assert node_a.poll() is None and node_b.poll() is None  # the same processes throughout
            out = "\n".join(node_a.output_lines)
            assert "HBONE table from WDS: 1 local workloads, 0 peer routes, 0 policies" in out, out[-2000:]
    finally:
        server.terminate()
        server.wait(10)
