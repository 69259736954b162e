"""Which interfaces of this namespace belong to which plane, and what changed since last time.

`classify` and `diff` are pure; `scan` classifies the links it is given (the agent's LinkMonitor keeps them from
netlink events, netplanes/link_monitor.py) or reads them once; no pyroute2 here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from planemesh.model.planes import ROUTED, Plane, plane_of_interface
from planemesh.netplanes.link_monitor import read_links
from planemesh.netplanes.link_state import LinkFacts

log = logging.getLogger("planemesh.netplanes")


@dataclass(frozen=True, slots=True)
class PlaneInterface:
    ifindex: int
    ifname: str
    plane: str
    addresses: tuple[str, ...]  # global-scope addresses, v4 and v6
    up: bool


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


_reported: set[tuple[str, tuple[str, ...]]] = set()  # ambiguous interfaces already logged (once each)


def scan(planes: Iterable[Plane], links: Iterable[LinkFacts] | None = None) -> dict[int, PlaneInterface]:
    """Plane interfaces among `links` (None: read them now), ambiguous ones logged once."""
    planes = tuple(planes)
    links = read_links() if links is None else list(links)
    for link in links:
        names = tuple(claimants(planes, link.ifname))
        if len(names) > 1 and (link.ifname, names) not in _reported:
            _reported.add((link.ifname, names))
            log.warning("interface %s is claimed by planes %s: left alone (fix the patterns)", link.ifname, names)
    return classify(links, planes)


__all__ = [
    "InterfaceDiff", "LinkFacts", "PlaneInterface", "claimants", "classify", "diff", "plane_source_addresses", "scan",
]  # fmt: skip
