"""Which interfaces of this namespace belong to which plane, and what changed since last time.

`classify` and `diff` are pure; `scan` reads links and addresses through one pyroute2 IPRoute;
`NetlinkWatch` turns link/address events into a callback (debounced) so hotplug is seen at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pyroute2 import IPRoute

from planemesh.model.planes import ROUTED, Plane, plane_of_interface
from planemesh.netplanes.netlink import ipr_or_new

log = logging.getLogger("planemesh.netplanes")

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_ROUTE = 0x400


@dataclass(frozen=True, slots=True)
class PlaneInterface:
    ifindex: int
    ifname: str
    plane: str
    addresses: tuple[str, ...]  # global-scope addresses, v4 and v6
    up: bool


@dataclass(frozen=True, slots=True)
class LinkFacts:
    ifindex: int
    ifname: str
    up: bool
    addresses: tuple[str, ...]
    routed: tuple[str, ...] = ()  # destinations of host routes (/32, /128) through this link: pods behind it


def _plane_by_routes(planes: tuple[Plane, ...], link: LinkFacts) -> Plane | None:
    """`@routed` planes claim any link that carries a host route to one of their addresses: how routed pod
    networking (Calico-style, Knitter, Multus with routed veths) looks from the host, whatever the veth's name."""
    for plane in planes:
        if ROUTED in plane.interfaces and any(plane.contains(dst) for dst in link.routed):
            return plane
    return None


def claimants(planes: Iterable[Plane], ifname: str) -> list[str]:
    """Names of the planes whose patterns match `ifname` (more than one: the interface is ambiguous)."""
    return [plane.name for plane in planes if plane.claims_interface(ifname)]


def classify(links: Iterable[LinkFacts], planes: Iterable[Plane]) -> dict[int, PlaneInterface]:
    """Plane interfaces by ifindex. A link whose name two planes' patterns match (`*-oam` and `client-*`
    both match `client-oam`; validation refuses the cases it can decide) belongs to neither: guessing
    would put a plane's traffic under another plane's policy. `scan` logs it."""
    planes = tuple(planes)
    found: dict[int, PlaneInterface] = {}
    for link in links:
        if len(claimants(planes, link.ifname)) > 1:
            continue
        plane = plane_of_interface(planes, link.ifname) or _plane_by_routes(planes, link)
        if plane is not None:
            found[link.ifindex] = PlaneInterface(link.ifindex, link.ifname, plane.name, link.addresses, link.up)
    return found


@dataclass(frozen=True, slots=True)
class InterfaceDiff:
    added: tuple[PlaneInterface, ...]
    removed: tuple[PlaneInterface, ...]
    changed: tuple[PlaneInterface, ...]  # same ifindex, new plane/name/addresses/state

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def diff(old: dict[int, PlaneInterface], new: dict[int, PlaneInterface]) -> InterfaceDiff:
    return InterfaceDiff(
        added=tuple(new[i] for i in sorted(new.keys() - old.keys())),
        removed=tuple(old[i] for i in sorted(old.keys() - new.keys())),
        changed=tuple(new[i] for i in sorted(new.keys() & old.keys()) if new[i] != old[i]),
    )


def plane_source_addresses(interfaces: Iterable[PlaneInterface], planes: Iterable[Plane]) -> dict[str, dict[int, str]]:
    """For each plane, this node's own address per IP version inside the plane's CIDRs (to bind upstreams)."""
    by_name = {p.name: p for p in planes}
    out: dict[str, dict[int, str]] = {}
    for iface in sorted(interfaces, key=lambda i: i.ifindex):
        plane = by_name.get(iface.plane)
        if plane is None:
            continue
        for addr in iface.addresses:
            version = 6 if ":" in addr else 4
            if plane.contains(addr):
                out.setdefault(plane.name, {}).setdefault(version, addr)
    return out


def read_links(ipr: IPRoute) -> list[LinkFacts]:
    addrs: dict[int, list[str]] = {}
    for msg in ipr.get_addr():
        if msg["scope"] == 0:  # global only; link-local addresses are not plane addresses
            addrs.setdefault(msg["index"], []).append(msg.get("IFA_ADDRESS"))
    routed: dict[int, list[str]] = {}
    for family, host_len in ((socket.AF_INET, 32), (socket.AF_INET6, 128)):
        for route in ipr.get_routes(family=family, table=254):
            oif = route.get("RTA_OIF")
            if route["dst_len"] == host_len and oif is not None and route.get("RTA_DST"):
                routed.setdefault(oif, []).append(route.get("RTA_DST"))
    links = []
    for link in ipr.get_links():
        name = link.get("ifname")
        if name == "lo":
            continue
        up = bool(link["flags"] & 1)
        idx = link["index"]
        links.append(LinkFacts(idx, name, up, tuple(addrs.get(idx, ())), tuple(routed.get(idx, ()))))
    return links


_reported: set[tuple[str, tuple[str, ...]]] = set()  # ambiguous interfaces already logged (once each)


def scan(planes: Iterable[Plane], ipr: IPRoute | None = None) -> dict[int, PlaneInterface]:
    planes = tuple(planes)
    with ipr_or_new(ipr) as nl:
        links = read_links(nl)
    for link in links:
        names = tuple(claimants(planes, link.ifname))
        if len(names) > 1 and (link.ifname, names) not in _reported:
            _reported.add((link.ifname, names))
            log.warning("interface %s is claimed by planes %s: left alone (fix the patterns)", link.ifname, names)
    return classify(links, planes)


class NetlinkWatch:
    """Calls `on_change()` on the event loop after link/address events, coalescing bursts.

    A raw NETLINK_ROUTE multicast socket read with `loop.add_reader`: no thread, no pyroute2 event
    machinery. Events only say *that* something changed; the callback re-scans what is true now.
    The socket belongs to the network namespace of the thread that creates it.
    """

    def __init__(self, on_change: Callable[[], None], debounce_s: float = 0.02) -> None:
        self._on_change = on_change
        self._debounce_s = debounce_s
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        # Routes too: `@routed` planes follow the host routes to pod addresses.
        groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
        self._sock.bind((0, groups))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                if not self._sock.recv(65536):
                    break
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: events were lost; a re-scan is exactly the right answer
                break
        if self._pending is None and self._loop is not None:
            self._pending = self._loop.call_later(self._debounce_s, self._fire)

    def _fire(self) -> None:
        self._pending = None
        self._on_change()

    def close(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock.fileno())
        if self._pending is not None:
            self._pending.cancel()
        self._sock.close()
