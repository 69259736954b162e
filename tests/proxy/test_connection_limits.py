"""Issue 11 finding 7b and the overload manager, on a real PlaneProxy with real sockets:

- one client address opening many idle connections cannot make another address's requests fail (per-source
  share), and connections that never send a byte are closed (sooner under pressure);
- a worker over its memory soft limit sheds with 503 + `connection: close` + `x-planemesh-overloaded: memory`
  and serves again once its memory falls; past the hard limit it resets the connection buffering most.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator

import pytest

from planemesh.agent.proxy.limits import PRESSURE_FRACTION
from planemesh.agent.proxy.overload import HARD_FRACTION, MIB, SOFT_FRACTION
from planemesh.model.planes import SLA
from tests.proxy.proxy_harness import Backend, ProxyThread
from tests.support.waiting import eventually as wait_until

ATTACKER = "127.0.0.2"  # every 127/8 address is the loopback's: a second client address without a netns


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    with Backend() as be:
        yield be


def get(port: int, path: str = "/", source: str = "127.0.0.1") -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def open_idle(port: int, n: int, source: str) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        socks.append(sock)
    return socks


def closed_by_proxy(sock: socket.socket) -> bool:
    """The proxy closed it: EOF (after a 503, if it answered), or a reset."""
    sock.settimeout(0.05)
    try:
        while data := sock.recv(65536):
            if not data:
                break
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_one_source_cannot_take_the_plane_budget(backend: Backend) -> None:
    sla = SLA(max_connections=40, max_connections_per_source=10, idle_connection_timeout_s=60)
    with ProxyThread([("127.0.0.1", backend.port)], sla=sla) as px:
        idle = open_idle(px.port, 60, ATTACKER)
        try:
            assert wait_until(lambda: px.proxy.stats.downstream_total >= 60, 5)
            # The attacker holds its share (10); the other 50 were answered 503 and closed.
            refused = [s for s in idle if closed_by_proxy(s)]
            assert len(refused) == 50 and px.proxy.stats.source_refused == 50
            assert px.proxy.share.by_source == {ATTACKER: 10}
            # Another client on the same plane gets every request through.
            assert [get(px.port, f"/ok{i}")[0] for i in range(30)] == [200] * 30
        finally:
            for sock in idle:
                sock.close()


def test_never_used_connections_are_closed_and_sooner_under_pressure(backend: Backend) -> None:
    sla = SLA(max_connections=40, max_connections_per_source=10, idle_connection_timeout_s=1.5)
    with ProxyThread([("127.0.0.1", backend.port)], sla=sla) as px:
        quiet = open_idle(px.port, 5, ATTACKER)
        try:
            time.sleep(0.6)
            assert not any(closed_by_proxy(s) for s in quiet)
            assert wait_until(lambda: all(closed_by_proxy(s) for s in quiet), 5)  # after ~1.5 s, not 300 s
        finally:
            for sock in quiet:
                sock.close()
    # Four addresses fill 40 of 40: above 3/4 of the budget every idle connection gets the short timeout
    # (1 s), although idle_connection_timeout_s says 60 s, until the plane is out of pressure (the pressure is
    # judged once per tick, so connections opened a little later may keep their 60 s once enough have gone);
    # then the plane serves others again.
    sla = SLA(max_connections=40, max_connections_per_source=10, idle_connection_timeout_s=60)
    with ProxyThread([("127.0.0.1", backend.port)], sla=sla) as px:
        flood = [s for i in range(2, 6) for s in open_idle(px.port, 10, f"127.0.0.{i}")]
        try:
            assert wait_until(lambda: px.proxy.stats.downstream_active >= 40, 5)
            started = time.monotonic()
            out_of_pressure = int(40 * PRESSURE_FRACTION)
            assert wait_until(lambda: sum(closed_by_proxy(s) for s in flood) >= 40 - out_of_pressure, 5)
            assert time.monotonic() - started < 4
            assert px.proxy.stats.idle_closed >= 40 - out_of_pressure
            assert [get(px.port, f"/after{i}")[0] for i in range(10)] == [200] * 10
        finally:
            for sock in flood:
                sock.close()


def _touch(size: int) -> bytearray:
    ballast = bytearray(size)
    ballast[::4096] = b"\x01" * len(range(0, size, 4096))  # every page resident
    return ballast


def test_memory_soft_limit_sheds_with_503_and_recovers(backend: Backend) -> None:
    """The real memory source (RSS growth since the proxy was made): 96 MiB of ballast in this process puts the
    proxy between its soft and hard thresholds."""
    ballast_size = 96 * MIB
    cap_mb = int(ballast_size / ((SOFT_FRACTION + HARD_FRACTION) / 2) / MIB)
    with ProxyThread([("127.0.0.1", backend.port)], sla=SLA(memory_max_mb=cap_mb)) as px:
        status, headers = get(px.port, "/before")
        assert status == 200 and headers.get("connection") != "close"
        kept = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)  # a keep-alive client
        kept.request("GET", "/kept")
        assert kept.getresponse().read() == b"hello /kept\n"
        ballast = _touch(ballast_size)
        try:
            assert wait_until(lambda: px.proxy.stats.overload_level == 1, 3), px.proxy.stats.memory_bytes
            status, headers = get(px.port, "/during")  # a new connection: shed at accept
            assert (status, headers["x-planemesh-overloaded"], headers["connection"]) == (503, "memory", "close")
            kept.request("GET", "/kept-during")  # a request on an old connection: shed too, and closed
            resp = kept.getresponse()
            assert (resp.status, resp.getheader("x-planemesh-overloaded"), resp.getheader("connection")) == (
                503,
                "memory",
                "close",
            )
            resp.read()
            assert px.proxy.stats.shed_connections >= 1 and px.proxy.stats.shed_requests >= 1
        finally:
            del ballast
            kept.close()
        assert wait_until(lambda: px.proxy.stats.overload_level == 0, 3), px.proxy.stats.memory_bytes
        status, headers = get(px.port, "/after")
        assert status == 200 and headers.get("connection") != "close"


def test_hard_limit_resets_the_connection_buffering_most(backend: Backend) -> None:
    """Past the hard threshold the client that stopped reading a large response is reset; a quiet client on the
    same worker is not. Memory comes from a fake source here: the level is what the test sets."""
    memory = {"rss": 10 * MIB}
    sla = SLA(memory_max_mb=100)
    with ProxyThread(
        [("127.0.0.1", backend.port)], sla=sla, memory_source=lambda: memory["rss"], overload_interval_s=0.05
    ) as px:
        hog = socket.create_connection(("127.0.0.1", px.port), timeout=10)
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.sendall(b"GET /big/33554432 HTTP/1.1\r\nhost: x\r\n\r\n")  # 32 MiB, never read
        quiet = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)
        quiet.request("GET", "/q1")
        assert quiet.getresponse().read() == b"hello /q1\n"

        def biggest() -> int:  # on the proxy's loop: the connections belong to it
            return max((c.buffered_bytes() for c in px.proxy.connections), default=0)

        # Back-pressure keeps even this buffer small (the upstream is paused at the transport's high-water mark),
        # but it is the biggest: the one reset.
        assert wait_until(lambda: px.call(biggest) > 16 * 1024, 5)
        memory["rss"] = 99 * MIB  # hard: 19 MiB over the soft threshold
        assert wait_until(lambda: px.proxy.stats.overload_resets >= 1, 3)
        memory["rss"] = 10 * MIB
        assert wait_until(lambda: px.proxy.stats.overload_level == 0, 3)
        received, reset = 0, False
        hog.settimeout(5)
        try:
            while data := hog.recv(1 << 20):
                received += len(data)
        except ConnectionResetError:
            reset = True
        hog.close()
        assert reset and received < 32 * MIB
        quiet.request("GET", "/q2")  # the quiet client's keep-alive connection survived
        assert quiet.getresponse().read() == b"hello /q2\n"
        quiet.close()
        assert px.proxy.stats.overload_resets == 1
