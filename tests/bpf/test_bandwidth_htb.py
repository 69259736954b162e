"""Per-plane bandwidth for real: two planes share one egress link of a lab node, HTB classes picked by
pm_egress.c from the plane mark the ingress program set on *bypassed* TCP.

Topology (default lab + a sink namespace this test builds):

    client pod --oam veth-->  node  --uplink veth--> sink (198.18.1.200 and 198.18.2.200)
               --media veth->       (HTB 504d: on uplink: oam 40 Mbit/s, media 10 Mbit/s)

Two concurrent bulk transfers (one per plane, both bypassed in the kernel) are measured at the sink; then
oam's rate is changed while the transfers run (one `change` of one class, connections survive); removing
the shaper restores the interface's default qdisc.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute, netns

from planemesh.ebpf import abi
from planemesh.ebpf.abi import Action
from planemesh.ebpf.egress_netlink import class_stats, observe
from planemesh.ebpf.egress_shaper import EgressShaper
from planemesh.ebpf.loader import Datapath
from planemesh.labs.netns import call_in
from planemesh.model.planes import SLA, Plane
from planemesh.netplanes.htb_plan import OpKind, egress_plan

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

PORT = 5001
SINK = {1: "198.18.1.200", 2: "198.18.2.200"}  # one sink address per plane, both behind the uplink
LINK_MBIT = 1000
TOLERANCE = 0.15
CHUNK = b"x" * 65536


def _planes(oam_mbit: float, media_mbit: float) -> list[Plane]:
    return [
        Plane("oam", 1, ("client-oam",), (), sla=SLA(bandwidth_mbit=oam_mbit, priority=1)),
        Plane("media", 2, ("client-media",), (), sla=SLA(bandwidth_mbit=media_mbit, priority=4)),
    ]


def _ifindex(name: str) -> int:
    with IPRoute() as ipr:
        return ipr.link_lookup(ifname=name)[0]


def _wire_sink(sink_ns: str) -> int:
    """In the node netns: a veth 'uplink' to the sink namespace, routes to the sink's addresses."""
    with IPRoute() as node, IPRoute(netns=sink_ns) as sink:
        node.link("add", ifname="uplink", kind="veth", peer={"ifname": "up0", "net_ns_fd": sink_ns})
        up = node.link_lookup(ifname="uplink")[0]
        node.link("set", index=up, state="up")
        for lo in sink.link_lookup(ifname="lo"):
            sink.link("set", index=lo, state="up")
        up0 = sink.link_lookup(ifname="up0")[0]
        sink.link("set", index=up0, state="up")
        for plane_id, addr in SINK.items():
            sink.addr("add", index=up0, address=addr, prefixlen=32)
            node.route("add", dst=f"{addr}/32", oif=up, scope=253)
            # Back to the pods via the node's plane gateway (198.18.P.1 answers ARP on any interface).
            sink.route("add", dst=f"198.18.{plane_id}.0/24", gateway=f"198.18.{plane_id}.1", oif=up0, flags=4)
        return up


def _class_stats(ifindex: int) -> dict:
    with IPRoute() as ipr:
        return class_stats(ipr, ifindex)


def _observe(ifindex: int):  # type: ignore[no-untyped-def]
    with IPRoute() as ipr:
        return observe(ipr, ifindex)


class Receiver:
    """Accepts on the sink's port and counts the bytes each destination address receives."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(0.2)
        self.received: dict[str, int] = {addr: 0 for addr in SINK.values()}
        self.peers: dict[str, str] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            local = conn.getsockname()[0]
            self.peers[local] = peer[0]
            thread = threading.Thread(target=self._drain, args=(conn, local), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _drain(self, conn: socket.socket, local: str) -> None:
        conn.settimeout(0.5)
        with conn:
            while not self.stop.is_set():
                try:
                    data = conn.recv(1 << 18)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                with self.lock:
                    self.received[local] += len(data)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.received)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for thread in self.threads:
            thread.join(timeout=5)


def _listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", PORT))
    sock.listen(16)
    return sock


def _sender(sock: socket.socket, addr: str, stop: threading.Event, errors: list[BaseException]) -> None:
    try:
        sock.settimeout(5)
        sock.connect((addr, PORT))
        while not stop.is_set():
            sock.sendall(CHUNK)
    except BaseException as exc:  # reported by the test, never swallowed
        if not stop.is_set():
            errors.append(exc)
    finally:
        sock.close()


def _rates(rx: Receiver, seconds: float) -> dict[int, float]:
    """Mbit/s per plane at the sink over `seconds`."""
    before, t0 = rx.snapshot(), time.monotonic()
    time.sleep(seconds)
    after, t1 = rx.snapshot(), time.monotonic()
    return {p: (after[a] - before[a]) * 8 / (t1 - t0) / 1e6 for p, a in SINK.items()}


def _within(measured: float, target: float) -> bool:
    return abs(measured - target) <= TOLERANCE * target


@pytest.fixture
def sink_ns(run_prefix: str) -> Iterator[str]:
    name = f"{run_prefix}-bwsink"
    netns.create(name)
    try:
        yield name
    finally:
        with contextlib.suppress(OSError):
            netns.remove(name)


def test_two_planes_share_an_uplink_at_their_class_rates(lab, sink_ns: str) -> None:
    node, client = lab.node_ns, lab.pod_ns("client")
    uplink = call_in(node, _wire_sink, sink_ns)
    ingress = {1: call_in(node, _ifindex, "client-oam"), 2: call_in(node, _ifindex, "client-media")}

    dp = Datapath(mark_planes=True)
    shaper = EgressShaper()
    rx = Receiver(call_in(sink_ns, _listener))
    stop, errors, senders = threading.Event(), [], []
    try:
        for plane_id, ifindex in ingress.items():
            dp.set_plane(plane_id, 15001, 15002, Action.BYPASS)  # every port bypassed in the kernel
            dp.set_interface(ifindex, plane_id)
            call_in(node, dp.attach, ifindex)
        ops = call_in(node, shaper.apply, uplink, egress_plan(_planes(40, 10), LINK_MBIT))
        assert ops[0].kind is OpKind.QDISC and {o.kind for o in ops[1:]} == {OpKind.ADD}

        for addr in SINK.values():
            sock = call_in(client, socket.socket, socket.AF_INET, socket.SOCK_STREAM)
            thread = threading.Thread(target=_sender, args=(sock, addr, stop, errors), daemon=True)
            senders.append(thread)
            thread.start()
        time.sleep(1.0)  # slow start and the first bursts settle
        first = _rates(rx, 2.0)
        print(f"\nHTB 40/10 Mbit/s, concurrent bypassed TCP: oam {first[1]:.1f}, media {first[2]:.1f} Mbit/s")

        # A rate change while traffic flows: one class is changed, nothing is torn down.
        ops = call_in(node, shaper.apply, uplink, egress_plan(_planes(20, 10), LINK_MBIT))
        assert [(o.kind, o.cls.plane_id if o.cls else None) for o in ops] == [(OpKind.CHANGE, 1)]
        time.sleep(0.5)
        second = _rates(rx, 2.0)
        print(f"HTB 20/10 Mbit/s after a live change: oam {second[1]:.1f}, media {second[2]:.1f} Mbit/s")
        stats = call_in(node, _class_stats, uplink)
        print("class bytes:", {f"{k:#x}": v.bytes for k, v in stats.items()}, "ingress:", dp.counters())
        assert not errors, errors
        assert all(t.is_alive() for t in senders), "a transfer died during the class change"

        assert _within(first[1], 40) and _within(first[2], 10), first
        assert _within(second[1], 20) and _within(second[2], 10), second
        # Bypassed, not proxied: the sink saw the client's own addresses, the program counted BYPASS.
        assert rx.peers == {SINK[1]: lab.pod_addr("client", "oam"), SINK[2]: lab.pod_addr("client", "media")}
        counters = dp.counters()
        assert counters[(1, Action.BYPASS)][0] > 100 and counters[(2, Action.BYPASS)][0] > 100
        # The classifier put each plane's bytes in its own class; the default class got next to nothing.
        assert stats[abi.plane_classid(1)].bytes > 10 * stats[abi.htb_classid(abi.PM_HTB_DEFAULT_MINOR)].bytes
        assert stats[abi.plane_classid(2)].bytes > 1_000_000
    finally:
        stop.set()
        for thread in senders:
            thread.join(timeout=5)
        rx.close()
        call_in(node, shaper.close)
        call_in(node, dp.close)
    after = call_in(node, _observe, uplink)
    assert not after.ours and after.root_kind in ("noqueue", None)
