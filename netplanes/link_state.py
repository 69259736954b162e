"""The node's links as the agent knows them, kept from rtnetlink messages (netplanes/rtnl.py); sans-IO.

Fed a dump once and the multicast events after it, `LinkTable` answers `links()` (what netplanes.discovery
classifies) without asking the kernel again: a snapshot does not re-read netlink. Every message carries the whole
state of its object, so events queued before a dump and applied after it still converge on what is true now.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass

from planemesh.netplanes.rtnl import RT_TABLE_MAIN, Addr, Link, Message, Route

_HOST_LEN = {socket.AF_INET: 32, socket.AF_INET6: 128}


@dataclass(frozen=True, slots=True)
class LinkFacts:
    ifindex: int
    ifname: str
    up: bool
    addresses: tuple[str, ...]
    routed: tuple[str, ...] = ()  # destinations of host routes (/32, /128) through this link: pods behind it


class LinkTable:
    def __init__(self) -> None:
        self._links: dict[int, Link] = {}
        self._addrs: dict[int, dict[str, None]] = {}  # ifindex -> global addresses (dict: kernel order kept)
        self._routed: dict[int, dict[str, None]] = {}  # ifindex -> host-route destinations in the main table

    def clear(self) -> None:
        self._links.clear()
        self._addrs.clear()
        self._routed.clear()

    def feed(self, messages: Iterable[Message]) -> bool:
        """Apply messages; True if anything the agent looks at changed."""
        changed = False
        for msg in messages:
            if isinstance(msg, Link):
                changed |= self._link(msg)
            elif isinstance(msg, Addr):
                changed |= self._addr(msg)
            elif isinstance(msg, Route):
                changed |= self._route(msg)
        return changed

    def _link(self, msg: Link) -> bool:
        if msg.gone:
            self._addrs.pop(msg.ifindex, None)
            self._routed.pop(msg.ifindex, None)
            return self._links.pop(msg.ifindex, None) is not None
        before = self._links.get(msg.ifindex)
        self._links[msg.ifindex] = msg
        return before != msg

    def _addr(self, msg: Addr) -> bool:
        if msg.scope != 0:  # global only; link-local addresses are not plane addresses
            return False
        return _set(self._addrs, msg.ifindex, msg.address, msg.gone)

    def _route(self, msg: Route) -> bool:
        host = msg.dst_len == _HOST_LEN.get(msg.family) and msg.dst is not None and msg.oif is not None
        if not host or msg.table != RT_TABLE_MAIN:
            return False
        assert msg.oif is not None and msg.dst is not None
        return _set(self._routed, msg.oif, msg.dst, msg.gone)

    def lookup(self, ifname: str) -> int | None:
        # list(): one step under the GIL, as the event loop may feed the table meanwhile (control thread reads)
        return next((i for i, link in list(self._links.items()) if link.ifname == ifname), None)

    def links(self) -> list[LinkFacts]:
        """Every link but lo, by ifindex, with its global addresses and the host routes through it."""
        return [
            LinkFacts(i, link.ifname, link.up, tuple(self._addrs.get(i, ())), tuple(self._routed.get(i, ())))
            for i, link in sorted(self._links.items())
            if link.ifname != "lo"
        ]


def _set(table: dict[int, dict[str, None]], ifindex: int, value: str, gone: bool) -> bool:
    values = table.setdefault(ifindex, {})
    if gone:
        return values.pop(value, 0) is None
    if value in values:
        return False
    values[value] = None
    return True


__all__ = ["LinkFacts", "LinkTable"]
