"""The proxy's upstream binding: source address and SO_MARK both follow the destination's plane."""

from __future__ import annotations

from planemesh.agent.proxy.server import PlaneProxy
from planemesh.ebpf.abi import PM_MARK_OWN
from planemesh.model.config import Snapshot
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import Plane

OAM = Plane("oam", 1, ("*-oam",), (IPNetwork("198.18.1.0/24"), IPNetwork("fd00:18:1::/64")), forward_to=("sig",))
SIG = Plane("sig", 2, ("*-sig",), (IPNetwork("198.18.2.0/24"),), proxy_port=15011, sniff_port=15012)
NODE = {"198.18.1": "198.18.1.1", "fd00:18:1": "fd00:18:1::1", "198.18.2": "198.18.2.1"}


def source_of(ip: str) -> str | None:
    return next((addr for prefix, addr in NODE.items() if ip.startswith(prefix)), None)


def proxy(mark: int) -> PlaneProxy:
    snap = Snapshot(version="t", planes=(OAM, SIG))
    return PlaneProxy(snap, "oam", upstream_mark=mark, source_address=source_of)


def test_same_plane_keeps_the_worker_plane_mark() -> None:
    assert proxy(PM_MARK_OWN | 1).upstream_binding("198.18.1.20") == ("198.18.1.1", PM_MARK_OWN | 1)
    assert proxy(PM_MARK_OWN | 1).upstream_binding("fd00:18:1::20") == ("fd00:18:1::1", PM_MARK_OWN | 1)


def test_another_plane_gets_that_plane_s_address_and_mark() -> None:
    assert proxy(PM_MARK_OWN | 1).upstream_binding("198.18.2.20") == ("198.18.2.1", PM_MARK_OWN | 2)
    assert proxy(PM_MARK_OWN | 1).upstream_binding("::ffff:198.18.2.20")[1] == PM_MARK_OWN | 2


def test_no_plane_no_mark_or_a_name_keep_what_they_had() -> None:
    assert proxy(PM_MARK_OWN | 1).upstream_binding("203.0.113.5") == (None, PM_MARK_OWN | 1)
    assert proxy(0).upstream_binding("198.18.2.20") == ("198.18.2.1", 0)  # unmarked (tests, no data path)
    assert proxy(PM_MARK_OWN | 1).upstream_binding("backend.example")[1] == PM_MARK_OWN | 1
