"""netplanes/link_monitor.py against the real kernel, in a private namespace: the agent's own rtnetlink reader sees
links, global addresses and host routes as pyroute2 reports them, follows hotplug from events alone (a link
added, addressed, routed to, taken down, deleted) and calls back once per burst; a re-dump (what a lost event
triggers) finds the same."""

from __future__ import annotations

import asyncio
import socket
import subprocess

import pytest
from pyroute2 import IPRoute

from planemesh.labs.netns import call_in
from planemesh.netplanes.link_monitor import LinkMonitor, read_links
from planemesh.netplanes.link_state import LinkFacts

pytestmark = pytest.mark.netns


def _pyroute2_view() -> list[LinkFacts]:
    """The same facts read with pyroute2 (what netplanes/discovery.py read before it had its own reader)."""
    with IPRoute() as ipr:
        addrs: dict[int, list[str]] = {}
        for msg in ipr.get_addr():
            if msg["scope"] == 0:
                addrs.setdefault(msg["index"], []).append(msg.get("IFA_ADDRESS"))
        routed: dict[int, list[str]] = {}
        for family, host_len in ((socket.AF_INET, 32), (socket.AF_INET6, 128)):
            for route in ipr.get_routes(family=family, table=254):
                if route["dst_len"] == host_len and route.get("RTA_OIF") and route.get("RTA_DST"):
                    routed.setdefault(route.get("RTA_OIF"), []).append(route.get("RTA_DST"))
        return [
            LinkFacts(
                link["index"], link.get("ifname"), bool(link["flags"] & 1),
                tuple(addrs.get(link["index"], ())), tuple(routed.get(link["index"], ())),
            )
            for link in sorted(ipr.get_links(), key=lambda m: m["index"])
            if link.get("ifname") != "lo"
        ]


async def _until(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "the monitor did not see the change"
        await asyncio.sleep(0.02)


def ip(*args: str) -> None:
    """`ip` in this thread's namespace (pyroute2's IPRoute cannot run inside a running event loop)."""
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


async def _scenario(ns: str) -> dict[str, object]:
    fired: list[int] = []
    monitor = LinkMonitor(lambda: fired.append(1))
    monitor.start()
    try:
        ip("link", "add", "pm-mon0", "type", "veth", "peer", "name", "pm-mon1")  # no dummy module on this kernel
        ip("link", "set", "pm-mon0", "up")
        ip("addr", "add", "198.18.9.1/24", "dev", "pm-mon0")
        ip("addr", "add", "fd00:9::1/64", "dev", "pm-mon0", "nodad")
        ip("route", "add", "10.9.0.5/32", "dev", "pm-mon0")
        ip("route", "add", "10.9.0.0/16", "dev", "pm-mon0")  # not a host route: not a pod behind the link
        await _until(lambda: monitor.lookup("pm-mon0") is not None)
        index = monitor.lookup("pm-mon0")
        expected = LinkFacts(index, "pm-mon0", True, ("198.18.9.1", "fd00:9::1"), ("10.9.0.5",))
        await _until(lambda: [f for f in monitor.links() if f.ifindex == index] == [expected])
        await asyncio.sleep(0.1)
        same_as_pyroute2 = sorted(monitor.links(), key=lambda f: f.ifindex) == call_in(ns, _pyroute2_view)
        same_as_dump = monitor.links() == read_links()
        bursts = len(fired)
        monitor.table.clear()  # as after lost events: a re-dump brings it all back
        resynced = monitor._resync() and monitor.links() == read_links()
        ip("link", "set", "pm-mon0", "down")
        await _until(lambda: any(f.ifindex == index and not f.up for f in monitor.links()))
        ip("link", "del", "pm-mon0")  # its peer goes with it
        await _until(lambda: all(f.ifname not in ("pm-mon0", "pm-mon1") for f in monitor.links()))
        await asyncio.sleep(0.1)
        return {
            "same_as_pyroute2": same_as_pyroute2, "same_as_dump": same_as_dump, "bursts": bursts,
            "resynced": resynced, "fired_after": len(fired), "lookup": monitor.lookup("pm-mon0"),
        }  # fmt: skip
    finally:
        monitor.close()


def test_the_monitor_follows_links_addresses_and_host_routes_from_events(netns_worker) -> None:
    got = netns_worker.call(lambda: asyncio.run(_scenario(netns_worker.name)), timeout=30)
    assert got["same_as_pyroute2"] and got["same_as_dump"] and got["resynced"], got
    assert 1 <= got["bursts"] <= 3, got  # the add burst coalesced (debounce), not one callback per message
    assert got["fired_after"] > got["bursts"]  # down and delete were reported too
    assert got["lookup"] is None
