"""Incremental route updates: a one-route change in a large table is translated, sent to the worker and compiled
as one route, not as the whole table (xds/translate_routes.py RouteMemo, agent/worker_channel.py Snapshot*coder,
agent/proxy/routing.py Reuse). Each step is checked by its counters and by object identity, and the routing
answers stay right after the change."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest
from envoy.config.route.v3 import route_pb2

from planemesh.agent.proxy.routing import PlaneRouter
from planemesh.agent.proxy.routing_table import RoutingTable
from planemesh.agent.worker_channel import SnapshotDecoder, SnapshotEncoder, encode
from planemesh.model.config import ConfigError, ListenerProtocol, Route, RouteConfig
from planemesh.model.static_config import load_default_config
from planemesh.xds.translate_routes import RouteMemo, translate_route_config

VHOSTS, PER_VHOST = 50, 20  # 1,000 routes


def route_config(bump: dict[int, int] | None = None, *, vhosts: int = VHOSTS, dup_domain: bool = False):
    """`vhosts` virtual hosts of PER_VHOST prefix routes; `bump` changes route i's prefix (generation)."""
    bump = bump or {}
    rc = route_pb2.RouteConfiguration(name="rc")
    for v in range(vhosts):
        vh = rc.virtual_hosts.add(name=f"vh{v}", domains=[f"s{v}.example"])
        if dup_domain and v == vhosts - 1:
            vh.domains.append("s0.example")
        for k in range(PER_VHOST):
            i = v * PER_VHOST + k
            r = vh.routes.add()
            r.match.prefix = f"/r{i}/g{bump.get(i, 0)}/"
            r.route.cluster = f"c{i % 7}"
    return rc


def routes_of(rc: RouteConfig) -> list[Route]:
    return [r for vh in rc.virtual_hosts for r in vh.routes]


def test_one_route_change_translates_one_route_and_keeps_the_others_identical() -> None:
    memo = RouteMemo()
    first = translate_route_config(route_config(), "rc", memo)
    assert (memo.vhost_misses, memo.route_misses) == (VHOSTS, VHOSTS * PER_VHOST)
    second = translate_route_config(route_config({123: 1}), "rc", memo)
    assert memo.vhost_misses - VHOSTS == 1  # only the virtual host holding route 123
    assert memo.route_misses - VHOSTS * PER_VHOST == 1
    old, new = routes_of(first), routes_of(second)
    assert [i for i in range(len(old)) if old[i] is not new[i]] == [123]
    assert new[123].match.prefix == "/r123/g1/"
    # Same result as a translation without memo (nothing stale, nothing lost).
    assert second == translate_route_config(route_config({123: 1}), "rc")
    # A later change elsewhere: the routes of virtual hosts reused last time are still known.
    translate_route_config(route_config({123: 1, 987: 2}), "rc", memo)
    assert memo.route_misses - VHOSTS * PER_VHOST == 2


def test_a_bad_update_is_refused_with_a_memo_and_does_not_poison_it() -> None:
    memo = RouteMemo()
    translate_route_config(route_config(), "rc", memo)
    with pytest.raises(ConfigError, match=r"s0\.example"):
        translate_route_config(route_config(dup_domain=True), "rc", memo)  # every vhost but one is a hit
    misses = memo.route_misses
    translate_route_config(route_config(), "rc", memo)
    assert memo.route_misses == misses  # the good table is still memoised


def snapshot_with(rc: RouteConfig):
    """The default configuration with its first HTTP listener on route config `rc`."""
    snap = load_default_config()
    lsn = next(lsn for lsn in snap.listeners if lsn.protocol is ListenerProtocol.HTTP)
    lsn = dataclasses.replace(lsn, route_config=rc.name)
    listeners = tuple(lsn if x.name == lsn.name else x for x in snap.listeners)
    routes = MappingProxyType({**snap.routes, rc.name: rc})
    return dataclasses.replace(snap, listeners=listeners, routes=routes), lsn


def test_router_reuses_the_compiled_routes_of_unchanged_config_objects() -> None:
    memo = RouteMemo()
    snap1, lsn = snapshot_with(translate_route_config(route_config(), "rc", memo))
    t1 = RoutingTable(snap1, lsn.plane)
    assert t1.router.reuse.routes_compiled >= VHOSTS * PER_VHOST
    snap2, _ = snapshot_with(translate_route_config(route_config({5: 1}), "rc", memo))
    t2 = RoutingTable(snap2, lsn.plane, previous=t1)
    reuse = t2.router.reuse
    assert reuse.routes_compiled == 1 and reuse.vhosts_compiled == 1
    assert reuse.vhosts_reused >= VHOSTS - 1  # taken over whole, routes and index
    assert reuse.routes_reused == PER_VHOST - 1  # the changed virtual host's other routes
    crc = next(c for c in t2.router._all if c.name == lsn.route_config)
    assert t2.router.route_request(crc, "s0.example", b"/r5/g1/x", dict).route.match.prefix == "/r5/g1/"
    assert t2.router.route_request(crc, "s0.example", b"/r5/g0/x", dict).route is None  # the old path is gone
    assert t2.router.route_request(crc, "s49.example", b"/r999/g0/", dict).route.action.cluster == "c5"
    # Without a previous table everything is compiled, as before.
    assert PlaneRouter(snap2, lsn.plane).reuse.routes_reused == 0


def test_channel_sends_a_one_route_change_as_a_change_and_the_worker_gets_its_own_objects_back() -> None:
    memo = RouteMemo()
    enc, dec = SnapshotEncoder(), SnapshotDecoder()
    snap1, _ = snapshot_with(translate_route_config(route_config(), "rc", memo))
    full = enc.encode({"op": "snapshot", "snapshot": snap1, "id": 1})
    got1 = dec.decode(full[4:])["snapshot"]
    assert got1 == snap1
    # Other messages in between use no table and disturb nothing.
    assert dec.decode(enc.encode({"op": "stats", "id": 2})[4:]) == {"op": "stats", "id": 2}
    snap2, lsn = snapshot_with(translate_route_config(route_config({5: 1}), "rc", memo))
    delta = enc.encode({"op": "snapshot", "snapshot": snap2, "id": 3})
    got2 = dec.decode(delta[4:])["snapshot"]
    assert got2 == snap2
    assert len(delta) * 10 < len(full), (len(delta), len(full))
    old, new = routes_of(got1.routes[lsn.route_config]), routes_of(got2.routes[lsn.route_config])
    assert [i for i in range(len(old)) if old[i] is not new[i]] == [5]  # the worker's own objects, reused
    assert len(encode({"op": "snapshot", "snapshot": snap2})) > 10 * len(delta)  # the plain encoding: all of it
    # A route removed then brought back is sent in full again (the tables dropped it), still decoded right.
    snap3, _ = snapshot_with(translate_route_config(route_config(vhosts=VHOSTS - 1), "rc", memo))
    assert dec.decode(enc.encode({"op": "snapshot", "snapshot": snap3})[4:])["snapshot"] == snap3
    snap4, _ = snapshot_with(translate_route_config(route_config({5: 1}), "rc", memo))
    assert dec.decode(enc.encode({"op": "snapshot", "snapshot": snap4})[4:])["snapshot"] == snap4


def test_a_decoder_out_of_step_fails_loudly() -> None:
    snap, _ = snapshot_with(translate_route_config(route_config(), "rc", RouteMemo()))
    enc = SnapshotEncoder()
    enc.encode({"op": "snapshot", "snapshot": snap})
    with pytest.raises(Exception, match="not in the table"):
        SnapshotDecoder().decode(enc.encode({"op": "snapshot", "snapshot": snap})[4:])


def test_workers_sent_the_same_snapshots_share_one_encoding_and_a_new_worker_gets_all_of_it() -> None:
    memo = RouteMemo()
    a, b = SnapshotEncoder(), SnapshotEncoder()  # two planes' workers
    snap1, _ = snapshot_with(translate_route_config(route_config(), "rc", memo))
    snap2, _ = snapshot_with(translate_route_config(route_config({5: 1}), "rc", memo))
    full_a = a.encode({"op": "snapshot", "snapshot": snap1, "id": 1})
    full_b = b.encode({"op": "snapshot", "snapshot": snap1, "id": 7})
    assert full_a != full_b and full_a[-1000:] == full_b[-1000:]  # own ids, one snapshot encoding
    delta_a = a.encode({"op": "snapshot", "snapshot": snap2, "id": 2})
    delta_b = b.encode({"op": "snapshot", "snapshot": snap2, "id": 8})
    assert delta_a[-200:] == delta_b[-200:] and len(delta_a) * 10 < len(full_a)
    fresh = SnapshotEncoder()  # a restarted worker: its table is empty, it gets the whole snapshot
    whole = fresh.encode({"op": "snapshot", "snapshot": snap2, "id": 1})
    assert len(whole) > 10 * len(delta_a)
    dec = SnapshotDecoder()
    assert dec.decode(whole[4:]) == {"op": "snapshot", "id": 1, "snapshot": snap2}
