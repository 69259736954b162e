"""The foundation, end to end in a real lab: HTTP proxied per plane, TCP bypassed in the kernel, v4 and v6."""

from __future__ import annotations

import hashlib
import os
import socket
import time

import pytest

from planemesh.labs.netns import call_in
from planemesh.labs.servers import pattern_bytes
from planemesh.labs.traffic import http_requests, tcp_echo
from tests.netns.agent_lab import AgentLab, eventually, running_agent

pytestmark = pytest.mark.netns
PLANES_FAMILIES = [(plane, version) for plane in ("oam", "media") for version in (4, 6)]


@pytest.fixture(scope="module")
def env(run_prefix: str):
    with running_agent(f"{run_prefix}e") as lab:
        yield lab


def settled_planes(env: AgentLab) -> dict:
    """Plane views once the workers' periodic stats have caught up with earlier traffic."""
    previous = env.planes()
    for _ in range(20):
        time.sleep(0.6)
        current = env.planes()
        if current == previous:
            return current
        previous = current
    return previous


@pytest.mark.parametrize(("plane", "version"), PLANES_FAMILIES)
def test_http_on_declared_port_is_proxied(env: AgentLab, plane: str, version: int) -> None:
    r = http_requests(env.client_ns, env.server(plane, version), 80, ["/a?x=1", "/b"], headers={"user-agent": "e2e"})
    assert r.status == [200, 200]
    seen = r.seen(0)
    request_id = seen["headers"]["x-request-id"]
    assert len(request_id) == 36
    # The upstream leg leaves from the node's own address on the destination's plane...
    assert seen["peer"] == env.lab.node_addr(plane, version)
    # ...and the client's real address travels in x-forwarded-for.
    assert seen["headers"]["x-forwarded-for"] == env.client(plane, version)
    assert seen["path"] == "/a?x=1"
    line = eventually(lambda: next((ln for ln in env.access_log().splitlines() if request_id in ln), None))
    assert line and '"GET /a?x=1 HTTP/1.1" 200' in line and line.endswith(plane)


def test_client_request_id_is_kept(env: AgentLab) -> None:
    r = http_requests(env.client_ns, env.server("oam", 6), 80, ["/"], headers={"x-request-id": "keep-me-42"})
    assert r.seen(0)["headers"]["x-request-id"] == "keep-me-42"


def test_large_chunked_body_over_one_keepalive_connection(env: AgentLab) -> None:
    size = 5 * 1024 * 1024 + 7
    before = settled_planes(env)["media"]["counters"]["connections"]
    r = http_requests(env.client_ns, env.server("media", 4), 80, [f"/big?size={size}", "/x", "/big?size=3", "/y"])
    assert r.status == [200] * 4
    assert hashlib.sha256(r.bodies[0]).digest() == hashlib.sha256(pattern_bytes(size)).digest()
    assert r.bodies[2] == pattern_bytes(3)
    assert r.headers[0].get("transfer-encoding") == "chunked"
    # Four requests, one downstream connection: keep-alive held across a 5 MB streamed body.
    after = eventually(lambda: (c := env.planes()["media"]["counters"]["connections"]) > before and c)
    assert after - before == 1


def test_request_body_streams_upstream_unchanged(env: AgentLab) -> None:
    body = os.urandom(3 * 1024 * 1024)
    r = http_requests(env.client_ns, env.server("oam", 4), 80, ["/sha256"], method="POST", body=body)
    assert r.status == [200]
    assert r.seen(0)["sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize(("plane", "version"), PLANES_FAMILIES)
@pytest.mark.parametrize("port", [9000, 9001], ids=["declared-tcp", "undeclared"])
def test_tcp_bypasses_the_proxy(env: AgentLab, plane: str, version: int, port: int) -> None:
    before = settled_planes(env)[plane]["counters"]
    result = tcp_echo(env.client_ns, env.server(plane, version), port, size=2 * 1024 * 1024)
    assert result.echoed_ok, "bytes must round-trip unchanged"
    assert result.peer_seen_by_server == env.client(plane, version), "the server sees the client's own address"
    after = eventually(
        lambda: (c := env.planes()[plane]["counters"])["bpf_packets"].get("bypass", 0)
        > before["bpf_packets"].get("bypass", 0)
        and c
    )
    assert after, "the BPF program counted the bypassed packets"
    time.sleep(0.6)  # one more stats period: a proxied connection would show up by now
    after = env.planes()[plane]["counters"]
    assert after["connections"] == before["connections"], "the proxy never accepted the connection"
    assert after["bpf_packets"].get("listener", 0) == before["bpf_packets"].get("listener", 0)


def _raw_exchange(address: str, payload: bytes) -> tuple[bytes, bool]:
    with socket.create_connection((address, 80), timeout=5) as conn:
        conn.sendall(payload)
        data = b""
        closed = False
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                closed = True
                break
            data += chunk
            if b"\r\n\r\n" in data and len(data) > 200:
                break
    return data, closed


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x01\x02 garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    ],
    ids=["garbage", "cl-and-te", "two-cl", "bad-header"],
)
def test_malformed_http_gets_400_and_close_while_others_are_served(env: AgentLab, payload: bytes) -> None:
    data, closed = call_in(env.client_ns, _raw_exchange, env.server("oam", 4), payload)
    assert data.startswith(b"HTTP/1.1 400"), data[:100]
    assert closed
    ok = http_requests(env.client_ns, env.server("oam", 4), 80, ["/after-garbage"])
    assert ok.status == [200]
