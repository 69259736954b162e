"""HBONE run by the agent itself: two node namespaces each running `planemesh agent` (not the standalone HBONE
process) with an `hbone:` section in its static configuration, a pod behind each.

Pod A's connection to pod B crosses the link only as TLS to 15008 (the link capture of hbone_lab) and arrives
in plaintext; the per-peer counters are on both agents' admin API (`/stats?format=json` and Prometheus text);
an RBAC refusal is counted by reason on both sides; SIGHUP with a changed section restarts the HBONE node
with it (the refused port then tunnels); a killed HBONE node is restarted by the agent and tunnels
again; a hot upgrade (a successor agent taking over) ends with the successor's HBONE node tunnelling;
stopping the agent stops its HBONE node and detaches its capture (the pod's traffic then crosses the
link in plaintext: the kernel's own routing, as before HBONE).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from planemesh.agent.admin_client import AdminClient
from planemesh.agent.identity.ca import new_root, utcnow
from planemesh.agent.identity.ca_files import write_root_ca
from planemesh.labs import netns as ns_tools
from tests.netns.agent_lab import eventually
from tests.netns.hbone_lab import (
    AGENT_PLANES,
    CIDR_A,
    ECHO_PORT,
    NODE_A_LINK,
    POD_B,
    PORT,
    LinkCapture,
    hbone_lab,
    node_a_settings,
    node_b_settings,
    pod_exchange,
)

pytestmark = [pytest.mark.netns, pytest.mark.bpf]
MARKER = b"AGENT-HBONE-MARKER-" + os.urandom(8).hex().encode()


def deny_echo_port() -> list:
    return [{"rules": {"action": "DENY", "policies": {"deny-echo": {
        "permissions": [{"destination_port": ECHO_PORT}], "principals": [{"any": True}]}}}}]  # fmt: skip


def recv_until_eof(sock: socket.socket) -> bytes:
    got = b""
    while data := sock.recv(1 << 16):
        got += data
    return got


def hbone_rows(admin: AdminClient) -> dict:
    status, body = admin.get_json("/stats?format=json")
    assert status == 200, body
    return {(r["peer"], r["direction"]): r for r in body["hbone"]} | {"node": body["hbone_node"][0]}


@pytest.fixture
def lab(run_prefix: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    with hbone_lab(run_prefix, tmp_path) as lab:
        lab.start_server()
        root = new_root("cluster.local", now=utcnow())
        lab.ca_a = lab.write_ca("ca-a", root.intermediate("node-a", now=utcnow()))  # type: ignore[attr-defined]
        lab.ca_b = lab.write_ca("ca-b", root.intermediate("node-b", now=utcnow()))  # type: ignore[attr-defined]
        yield lab


def test_agents_run_hbone_from_their_config_with_counters_restart_and_cleanup(lab) -> None:  # type: ignore[no-untyped-def]
    hbone_b = node_b_settings(lab.ca_b, rbac=deny_echo_port())
    hbone_b["peers"] = [{"name": "node-a", "address": NODE_A_LINK, "cidrs": [CIDR_A]}]  # names node A in counters
    agent_b = lab.start_agent("b", {"planes": AGENT_PLANES, "hbone": hbone_b})
    agent_a = lab.start_agent("a", {"planes": AGENT_PLANES, "hbone": node_a_settings(lab.ca_a)})
    admin_a, admin_b = AdminClient(f"unix://{lab.admin_path('a')}"), AdminClient(f"unix://{lab.admin_path('b')}")

    cap = LinkCapture(lab.node_a, "hbla")
    payload = MARKER * 1000
    answers = [pod_exchange(lab, payload) for _ in range(3)]
    refused = pod_exchange(lab, MARKER, port=ECHO_PORT)  # node B's RBAC denies the echo port
    segments = cap.stop()
    assert answers == [b"B saw %d bytes from 10.81.2.1: %s" % (len(payload), payload[:64])] * 3
    assert refused == b""
    assert segments and all(15008 in (s, d) for s, d, _ in segments), {(s, d) for s, d, _ in segments}
    assert not any(b"AGENT-HBONE-MARKER" in frame for frame in cap.frames)
    assert any(p[:1] == b"\x17" for _, _, p in segments)  # TLS application data

    out = eventually(lambda: (r := hbone_rows(admin_a)).get(("node-b", "outbound"), {}).get("streams") == 3 and r, 10)
    assert out, hbone_rows(admin_a)
    row = out[("node-b", "outbound")]
    assert row["connections"] == 1 and row["refused"] == {"status_403": 1}
    assert row["bytes_sent"] == 3 * len(payload) and row["bytes_received"] == 3 * len(answers[0])
    assert out["node"]["up"] == 1 and out["node"]["restarts"] == 0 and out["node"]["captured"] == 4
    inb = eventually(lambda: (r := hbone_rows(admin_b)).get(("node-a", "inbound"), {}).get("streams") == 3 and r, 10)
    assert inb, hbone_rows(admin_b)
    assert inb[("node-a", "inbound")]["refused"] == {"rbac_denied": 1}
    assert inb[("node-a", "inbound")]["bytes_received"] == 3 * len(payload)
    text = admin_a.get("/stats").body.decode()
    assert 'planemesh_hbone_streams_total{direction="outbound",peer="node-b"} 3.0' in text, text[-2000:]
    assert 'planemesh_hbone_refused_total{direction="outbound",peer="node-b",reason="status_403"} 1.0' in text
    assert "planemesh_hbone_up 1.0" in text
    prom_b = admin_b.get("/stats").body.decode()
    assert 'planemesh_hbone_refused_total{direction="inbound",peer="node-a",reason="rbac_denied"} 1.0' in prom_b

    # SIGHUP: node B's section without the RBAC restarts its HBONE node with it (not a crash); the echo port tunnels
    # at once on the new node while the old one still drains a tunnel left open, which then completes
    pid_b = inb["node"]["pid"]
    held = ns_tools.call_in(lab.pod_a, socket.create_connection, (POD_B, PORT), 15)
    held.sendall(MARKER)
    eventually(lambda: hbone_rows(admin_b).get(("node-a", "inbound"), {}).get("streams") == 4, 10)
    hbone_b["rbac"] = []
    (lab.workdir / "agent-b.yaml").write_text(yaml.safe_dump({"planes": AGENT_PLANES, "hbone": hbone_b}))
    agent_b.send_signal(signal.SIGHUP)
    node_b = eventually(lambda: (n := hbone_rows(admin_b)["node"])["up"] == 1 and n["pid"] not in (0, pid_b) and n, 30)
    assert node_b and node_b["restarts"] == 0, hbone_rows(admin_b)
    assert eventually(lambda: pod_exchange(lab, MARKER, port=ECHO_PORT) == MARKER, 15)
    assert Path(f"/proc/{pid_b}").exists()  # the old node still drains the held tunnel (it did not delay the new)
    held.sendall(MARKER)
    held.shutdown(socket.SHUT_WR)
    assert recv_until_eof(held) == b"B saw %d bytes from 10.81.2.1: %s" % (2 * len(MARKER), (MARKER * 2)[:64])
    held.close()
    assert eventually(lambda: not Path(f"/proc/{pid_b}").exists(), 15)

    # the agent restarts a crashed HBONE node, which tunnels again
    pid = out["node"]["pid"]
    os.kill(pid, signal.SIGKILL)
    again = eventually(lambda: (n := hbone_rows(admin_a)["node"])["up"] == 1 and n["pid"] not in (0, pid) and n, 30)
    assert again and again["restarts"] == 1, hbone_rows(admin_a)
    assert pod_exchange(lab, MARKER) == b"B saw %d bytes from 10.81.2.1: %s" % (len(MARKER), MARKER)

    # hot upgrade: a successor takes over; the predecessor stops its HBONE node, the successor starts its own
    child = again["pid"]
    successor = lab.start_agent("a", {"planes": AGENT_PLANES, "hbone": node_a_settings(lab.ca_a)})
    assert agent_a.wait(timeout=60) == 0
    assert not Path(f"/proc/{child}").exists()
    new = eventually(lambda: (n := hbone_rows(admin_a)["node"])["up"] == 1 and n["pid"] not in (0, child) and n, 60)
    assert new and new["restarts"] == 0, hbone_rows(admin_a)  # started once, after the predecessor's was gone
    cap = LinkCapture(lab.node_a, "hbla")
    assert pod_exchange(lab, MARKER) == b"B saw %d bytes from 10.81.2.1: %s" % (len(MARKER), MARKER)
    assert cap.stop() and not any(MARKER in frame for frame in cap.frames)

    # stopping the agent stops its HBONE node and detaches the capture: plaintext across the link again
    child = new["pid"]
    assert ns_tools.stop(successor) == 0
    assert not Path(f"/proc/{child}").exists()
    cap = LinkCapture(lab.node_a, "hbla")
    assert pod_exchange(lab, MARKER, port=PORT).startswith(b"B saw")
    assert MARKER in b"".join(p for _, _, p in cap.stop())


def test_agents_get_hbone_certificates_by_create_certificate(lab) -> None:  # type: ignore[no-untyped-def]
    """Bootstraps with `ca:` and `hbone:` sections without their own CA: the HBONE node asks `planemesh
    xds-server --ca-api csr` (istiod's CreateCertificate) for the node's and each workload's certificate,
    with keys made in memory, and tunnels with them."""
    root = new_root("cluster.local", now=utcnow())
    ca_dir = lab.workdir / "root"
    write_root_ca(ca_dir, root)
    (lab.workdir / "resources").mkdir()
    (lab.workdir / "token").write_text("lab-node-token\n")
    (lab.workdir / "ca-tokens").write_text("lab-node-token *\n")  # node-trusted: may ask for its workloads' ids
    sock = lab.workdir / "xds.sock"
    log = lab.workdir / "xds-server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "planemesh.agent.cli", "xds-server", "--resources", str(lab.workdir / "resources"),
             "--listen", f"unix://{sock}", "--ca", str(ca_dir), "--ca-api", "csr",
             "--ca-tokens", str(lab.workdir / "ca-tokens"), "--bearer-token-file", str(lab.workdir / "token")],
            stdout=out, stderr=out)  # fmt: skip
    try:
        assert eventually(sock.exists, timeout=15), log.read_text()

        def bootstrap(name: str, hbone: dict) -> dict:
            del hbone["ca"]  # certificates from the bootstrap's `ca:` instead
            meta = {"NAMESPACE": "planemesh", "SERVICE_ACCOUNT": f"node-{name}"}
            return {
                "node": {"id": f"node-{name}", "metadata": meta},
                "server": {"address": f"unix://{sock}", "token_file": str(lab.workdir / "token")},
                "ca": {"ttl_s": 3600},
                "timing": {"backoff_base_s": 0.1, "backoff_max_s": 0.5},
                "planes": AGENT_PLANES, "hbone": hbone,
            }  # fmt: skip

        lab.start_agent("b", bootstrap("b", node_b_settings(lab.ca_b)), bootstrap=True)
        lab.start_agent("a", bootstrap("a", node_a_settings(lab.ca_a)), bootstrap=True)
        cap = LinkCapture(lab.node_a, "hbla")
        assert pod_exchange(lab, MARKER) == b"B saw %d bytes from 10.81.2.1: %s" % (len(MARKER), MARKER)
        segments = cap.stop()
        assert segments and all(15008 in (s, d) for s, d, _ in segments)
        assert not any(MARKER in frame for frame in cap.frames)
        signed = log.read_text()
        for who in ("ran/sa/amf", "planemesh/sa/node-a", "planemesh/sa/node-b"):  # the source pod's, both nodes'
            assert f"CreateCertificate: signed spiffe://cluster.local/ns/{who}" in signed, signed[-3000:]
        row = eventually(lambda: hbone_rows(AdminClient(f"unix://{lab.admin_path('a')}")).get(("node-b", "outbound")))
        assert row and row["streams"] == 1, row
        runtime = [p for p in Path("/run/planemesh").glob(f"hbone-{lab.prefix}-*") if p.is_file()]
        assert runtime and not any(b"PRIVATE KEY" in p.read_bytes() for p in runtime)  # keys stay in memory
    finally:
        server.kill()
        server.wait()
