"""The agent's view of its namespace's links, kept current from rtnetlink events on a raw socket (no pyroute2).

`LinkMonitor` subscribes to link, address and route events, then dumps links, addresses and routes once
(netplanes/rtnl.py parses both, netplanes/link_state.py keeps the result); after that every change arrives as an
event and `on_change()` is called on the event loop (bursts coalesced). `links()` answers from memory: a snapshot
or an interface sync reads no netlink. A lost event (ENOBUFS) re-dumps everything. `read_links()`: one dump, for
callers without a monitor. The sockets belong to the network namespace of the thread that creates them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Callable

from planemesh.netplanes import rtnl
from planemesh.netplanes.link_state import LinkFacts, LinkTable

log = logging.getLogger("planemesh.netplanes")

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_ROUTE = 0x400
# Routes too: `@routed` planes follow the host routes to pod addresses.
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
DUMPS = (rtnl.RTM_GETLINK, rtnl.RTM_GETADDR, rtnl.RTM_GETROUTE)
RECV_BYTES = 1 << 16
_seq = itertools.count(1)


def _netlink_socket(groups: int = 0, blocking: bool = True) -> socket.socket:
    flags = 0 if blocking else socket.SOCK_NONBLOCK
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC | flags, socket.NETLINK_ROUTE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((0, groups))
    return sock


def dump(table: LinkTable, timeout_s: float = 5.0) -> None:
    """Fill `table` with what the kernel holds now: links, then addresses, then routes."""
    with _netlink_socket() as sock:
        sock.settimeout(timeout_s)
        for kind in DUMPS:
            seq = next(_seq)
            sock.send(rtnl.dump_request(kind, seq))
            while True:
                messages = rtnl.parse(sock.recv(RECV_BYTES))
                table.feed(messages)
                done = next((m for m in messages if isinstance(m, rtnl.Done) and m.seq == seq), None)
                if done is not None:
                    if done.error:
                        raise OSError(-done.error, f"rtnetlink dump {kind} refused")
                    break


def read_links() -> list[LinkFacts]:
    """The namespace's links now (one dump)."""
    table = LinkTable()
    dump(table)
    return table.links()


class LinkMonitor:
    """Links of this namespace, kept from events; calls `on_change()` on the event loop after a change."""

    def __init__(self, on_change: Callable[[], None], debounce_s: float = 0.02) -> None:
        self._on_change = on_change
        self._debounce_s = debounce_s
        self.table = LinkTable()
        self._sock = _netlink_socket(GROUPS, blocking=False)  # subscribed before the dump: nothing falls between
        try:
            dump(self.table)
        except BaseException:
            self._sock.close()
            raise
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: asyncio.TimerHandle | None = None
        self.resyncs = 0  # full re-dumps after lost events

    def links(self) -> list[LinkFacts]:
        return self.table.links()

    def lookup(self, ifname: str) -> int | None:
        return self.table.lookup(ifname)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        changed = False
        while True:
            try:
                data = self._sock.recv(RECV_BYTES)
            except BlockingIOError:
                break
            except OSError as exc:  # ENOBUFS: events were lost; what is true now is one dump away
                log.info("netlink events lost (%s): reading links again", exc)
                changed |= self._resync()
                continue
            if not data:
                break
            changed |= self.table.feed(rtnl.parse(data))
        if changed and self._pending is None and self._loop is not None:
            self._pending = self._loop.call_later(self._debounce_s, self._fire)

    def _resync(self) -> bool:
        before = self.table.links()
        self.table.clear()
        self.resyncs += 1
        try:
            dump(self.table)
        except OSError as exc:
            log.warning("netlink dump failed: %s", exc)
        return self.table.links() != before

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


__all__ = ["LinkMonitor", "dump", "read_links"]
