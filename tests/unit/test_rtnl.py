"""netplanes/rtnl.py (the agent's own rtnetlink reader) and netplanes/link_state.py (the links kept from it):
messages built as the kernel lays them out, the parse of each kind, malformed input, and the table's answers."""

from __future__ import annotations

import socket
import struct

import pytest

from planemesh.netplanes import rtnl
from planemesh.netplanes.link_state import LinkFacts, LinkTable


def attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def nlmsg(msg_type: int, body: bytes, seq: int = 0) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(body), msg_type, 0, seq, 0) + body
    return raw + b"\0" * (-len(raw) % 4)


def link(index: int, name: str, up: bool = True, msg_type: int = rtnl.RTM_NEWLINK) -> bytes:
    body = struct.pack("=BxHiII", 0, 1, index, 1 if up else 0, 0) + attr(rtnl.IFLA_IFNAME, name.encode() + b"\0")
    return nlmsg(msg_type, body)


def addr(index: int, address: str, scope: int = 0, msg_type: int = rtnl.RTM_NEWADDR) -> bytes:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    body = struct.pack("=BBBBi", family, 24, 0, scope, index)
    body += attr(rtnl.IFA_ADDRESS, socket.inet_pton(family, address))
    return nlmsg(msg_type, body)


def route(dst: str, dst_len: int, oif: int, table: int = 254, msg_type: int = rtnl.RTM_NEWROUTE) -> bytes:
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    body = struct.pack("=BBBBBBBBI", family, dst_len, 0, 0, min(table, 252), 4, 0, 1, 0)
    body += attr(rtnl.RTA_TABLE, struct.pack("=I", table)) + attr(rtnl.RTA_DST, socket.inet_pton(family, dst))
    body += attr(rtnl.RTA_OIF, struct.pack("=I", oif))
    return nlmsg(msg_type, body)


def test_each_kind_is_parsed_from_one_datagram_in_order() -> None:
    data = link(3, "client-oam") + addr(3, "198.18.1.1") + addr(3, "fd00:1::1") + route("10.1.0.5", 32, 3)
    data += nlmsg(rtnl.NLMSG_DONE, struct.pack("=i", 0), seq=7)
    assert rtnl.parse(data) == [
        rtnl.Link(3, "client-oam", True),
        rtnl.Addr(3, "198.18.1.1", 0),
        rtnl.Addr(3, "fd00:1::1", 0),
        rtnl.Route(socket.AF_INET, 254, "10.1.0.5", 32, 3),
        rtnl.Done(7),
    ]


def test_deletions_errors_and_other_message_types() -> None:
    data = link(4, "x", msg_type=rtnl.RTM_DELLINK) + addr(4, "10.0.0.1", msg_type=rtnl.RTM_DELADDR)
    data += nlmsg(rtnl.NLMSG_ERROR, struct.pack("=i", -1) + b"\0" * 16, seq=9)
    data += nlmsg(30, b"\0" * 12)  # RTM_NEWNEIGH: not ours, skipped
    data += route("10.0.0.0", 8, 4, msg_type=rtnl.RTM_DELROUTE)
    got = rtnl.parse(data)
    assert got[0] == rtnl.Link(4, "x", True, gone=True)
    assert got[1] == rtnl.Addr(4, "10.0.0.1", 0, gone=True)
    assert got[2] == rtnl.Done(9, -1)
    assert got[3] == rtnl.Route(socket.AF_INET, 254, "10.0.0.0", 8, 4, gone=True)
    assert len(got) == 4


@pytest.mark.parametrize("cut", [1, 15, 17, 20, 30])
def test_a_truncated_datagram_ends_the_parse_without_raising(cut: int) -> None:
    whole = link(3, "a") + link(5, "b")
    got = rtnl.parse(whole[: len(link(3, "a")) + cut])
    assert got == [rtnl.Link(3, "a", True)]


def test_bad_lengths_and_short_bodies_are_skipped() -> None:
    assert rtnl.parse(struct.pack("=IHHII", 3, rtnl.RTM_NEWLINK, 0, 0, 0)) == []  # length below the header
    assert rtnl.parse(nlmsg(rtnl.RTM_NEWLINK, b"\0" * 4)) == []  # body shorter than ifinfomsg
    bad_attr = struct.pack("=BxHiII", 0, 1, 2, 1, 0) + struct.pack("=HH", 200, rtnl.IFLA_IFNAME) + b"ab"
    assert rtnl.parse(nlmsg(rtnl.RTM_NEWLINK, bad_attr)) == [rtnl.Link(2, "", True)]
    odd_family = struct.pack("=BBBBi", 99, 0, 0, 0, 2) + attr(rtnl.IFA_ADDRESS, b"\1\2\3")
    assert rtnl.parse(nlmsg(rtnl.RTM_NEWADDR, odd_family)) == []
    assert rtnl.parse(b"") == [] and rtnl.parse(b"\xff" * 7) == []


def test_dump_requests_are_what_the_kernel_expects() -> None:
    req = rtnl.dump_request(rtnl.RTM_GETADDR, 5)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", req)
    assert (length, kind, flags, seq, pid) == (len(req), rtnl.RTM_GETADDR, 0x301, 5, 0)
    assert len(rtnl.dump_request(rtnl.RTM_GETLINK, 1)) == 16 + 16  # ifinfomsg
    with pytest.raises(ValueError):
        rtnl.dump_request(rtnl.RTM_NEWLINK, 1)


def test_the_table_keeps_global_addresses_and_main_table_host_routes() -> None:
    table = LinkTable()
    assert table.feed(rtnl.parse(link(1, "lo") + link(3, "pod-oam") + link(4, "up-media", up=False)))
    table.feed(rtnl.parse(addr(3, "198.18.1.1") + addr(3, "fe80::1", scope=253) + addr(4, "fd00:2::1")))
    table.feed(rtnl.parse(route("10.1.0.5", 32, 3) + route("10.2.0.0", 16, 3) + route("10.1.0.6", 32, 3, table=100)))
    table.feed(rtnl.parse(route("fd00:9::5", 128, 4)))
    assert table.links() == [
        LinkFacts(3, "pod-oam", True, ("198.18.1.1",), ("10.1.0.5",)),
        LinkFacts(4, "up-media", False, ("fd00:2::1",), ("fd00:9::5",)),
    ]
    assert table.lookup("up-media") == 4 and table.lookup("nope") is None


def test_changes_are_reported_only_when_something_changed() -> None:
    table = LinkTable()
    assert table.feed(rtnl.parse(link(3, "a") + addr(3, "10.0.0.1")))
    assert not table.feed(rtnl.parse(link(3, "a") + addr(3, "10.0.0.1")))  # the same again
    assert not table.feed(rtnl.parse(addr(3, "fe80::2", scope=253)))  # link-local: not looked at
    assert table.feed(rtnl.parse(link(3, "a", up=False)))
    assert table.feed(rtnl.parse(addr(3, "10.0.0.1", msg_type=rtnl.RTM_DELADDR)))
    assert not table.feed(rtnl.parse(addr(3, "10.0.0.1", msg_type=rtnl.RTM_DELADDR)))
    assert table.feed(rtnl.parse(link(3, "a", msg_type=rtnl.RTM_DELLINK)))
    assert table.links() == []


def test_events_queued_before_a_dump_converge_on_the_state_after_it() -> None:
    """The monitor subscribes, then dumps, then applies the events that queued meanwhile."""
    dumped = LinkTable()
    dumped.feed(rtnl.parse(link(3, "a") + addr(3, "10.0.0.2")))  # the state at dump time
    queued = addr(3, "10.0.0.1") + addr(3, "10.0.0.1", msg_type=rtnl.RTM_DELADDR) + addr(3, "10.0.0.2")
    dumped.feed(rtnl.parse(queued))
    assert dumped.links() == [LinkFacts(3, "a", True, ("10.0.0.2",))]
