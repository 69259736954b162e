"""Whole-snapshot checks shared by every config source (static YAML, xDS).

Each failure is a ConfigError naming the field; a snapshot that fails is never applied.
"""

from __future__ import annotations

from planemesh.agent.config import ConfigError, ListenerProtocol, Snapshot
from planemesh.netplanes.model import MAX_PLANES, ROUTED


def validate_snapshot(snap: Snapshot) -> None:
    names: dict[str, int] = {}
    ids: dict[int, str] = {}
    ports: dict[int, str] = {}
    patterns: dict[str, str] = {}
    for i, plane in enumerate(snap.planes):
        where = f"planes[{i}]"
        if not plane.name or not plane.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}.name", f"{plane.name!r} is not a plane name (letters, digits, - and _)")
        if plane.name in names:
            raise ConfigError(f"{where}.name", f"plane {plane.name!r} is defined twice")
        names[plane.name] = i
        if not 1 <= plane.plane_id < MAX_PLANES:
            raise ConfigError(f"{where}.id", f"plane id {plane.plane_id} is outside 1..{MAX_PLANES - 1}")
        if plane.plane_id in ids:
            raise ConfigError(f"{where}.id", f"plane id {plane.plane_id} is used by plane {ids[plane.plane_id]!r}")
        ids[plane.plane_id] = plane.name
        for key in ("proxy_port", "sniff_port"):
            port = getattr(plane, key)
            if not 1 <= port <= 65535:
                raise ConfigError(f"{where}.{key}", f"{port} is not a TCP port")
            if port in ports:
                raise ConfigError(f"{where}.{key}", f"port {port} is already the listener of {ports[port]}")
            ports[port] = f"plane {plane.name!r}"
        if not plane.interfaces:
            raise ConfigError(f"{where}.interfaces", "a plane needs at least one interface (name or pattern)")
        for j, pattern in enumerate(plane.interfaces):
            if pattern == ROUTED:  # shared by design: the routes decide which plane a link carries
                continue
            if pattern in patterns:
                raise ConfigError(
                    f"{where}.interfaces[{j}]",
                    f"interface {pattern!r} is already claimed by plane {patterns[pattern]!r}",
                )
            patterns[pattern] = plane.name
        sla = plane.sla
        for key in ("connect_timeout_s", "request_timeout_s", "idle_timeout_s"):
            if getattr(sla, key) <= 0:
                raise ConfigError(f"{where}.sla.{key}", "must be > 0")
        if sla.workers < 1:
            raise ConfigError(f"{where}.sla.workers", "must be >= 1")
        if not 1 <= sla.cpu_weight <= 10000:
            raise ConfigError(f"{where}.sla.cpu_weight", "must be 1..10000 (cgroup cpu.weight)")
        if not 0 <= sla.priority <= 7:
            raise ConfigError(f"{where}.sla.priority", "must be 0..7")
    # CIDRs of different planes must not overlap: an address must belong to exactly one plane.
    owned = [(plane.name, i, j, net) for i, plane in enumerate(snap.planes) for j, net in enumerate(plane.cidrs)]
    for b, (pb, ib, jb, nb) in enumerate(owned):  # name the later CIDR: the one that introduced the clash
        for pa, _ia, _ja, na in owned[:b]:
            if pa != pb and na.version == nb.version and (na.first <= nb.last and nb.first <= na.last):
                raise ConfigError(f"planes[{ib}].cidrs[{jb}]", f"{nb} overlaps {na} of plane {pa!r}")
    declared: dict[tuple[str, int, str, str], str] = {}
    for i, lsn in enumerate(snap.listeners):
        where = f"listeners[{i}]"
        if lsn.plane not in names:
            raise ConfigError(f"{where}.plane", f"unknown plane {lsn.plane!r} (known: {', '.join(names) or 'none'})")
        if not 1 <= lsn.port <= 65535:
            raise ConfigError(f"{where}.port", f"{lsn.port} is not a TCP port")
        for prefix in lsn.prefixes or (None,):
            for server_name in lsn.server_names or ("",):  # chains may share a port and differ by TLS SNI
                key = (lsn.plane, lsn.port, str(prefix), server_name)
                if key in declared:
                    raise ConfigError(
                        f"{where}", f"plane {lsn.plane!r} port {lsn.port} is already declared by {declared[key]!r}"
                    )
                declared[key] = lsn.name
        if (
            lsn.protocol is ListenerProtocol.HTTP
            and lsn.route_config is not None
            and lsn.route_config not in snap.routes
        ):
            raise ConfigError(f"{where}.route_config", f"unknown route configuration {lsn.route_config!r}")
    for rc_name, rc in snap.routes.items():
        for vi, vh in enumerate(rc.virtual_hosts):
            for ri, route in enumerate(vh.routes):
                act = route.action
                if act is None:
                    continue
                for cname in ([act.cluster] if act.cluster else []) + [w.name for w in act.weighted]:
                    if cname not in snap.clusters:
                        raise ConfigError(
                            f"routes[{rc_name}].virtual_hosts[{vi}].routes[{ri}]", f"unknown cluster {cname!r}"
                        )
