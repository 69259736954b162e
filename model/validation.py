"""Whole-snapshot checks shared by every config source (static YAML, xDS).

Each failure is a ConfigError naming the field; a snapshot that fails is never applied.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from pathlib import Path

from planemesh.model.config import ConfigError, ListenerProtocol, Snapshot
from planemesh.model.ip import IPNetwork
from planemesh.model.plane_limits import check_cpus, parse_cpu_list
from planemesh.model.planes import LOCAL_DELIVERY_TABLE, MAX_PLANES, MAX_TABLE, RESERVED_TABLES, ROUTED, SLA, Plane
from planemesh.model.tls_config import plane_mtls_error

_GLOB = frozenset("*?[")
_V4_MAPPED = IPNetwork("::ffff:0:0/96")
ONLINE_CPUS = Path("/sys/devices/system/cpu/online")


def online_cpus() -> frozenset[int] | None:
    """The node's online CPUs (None when sysfs cannot be read: then only a cpu list's syntax is checked)."""
    try:
        return parse_cpu_list(ONLINE_CPUS.read_text())
    except (OSError, ValueError):
        return None


def check_cpus_field(spec: str, path: str) -> None:
    """An SLA `cpus` value: a cpu list of online CPUs, else a ConfigError naming `path`."""
    try:
        check_cpus(spec, online_cpus())
    except ValueError as exc:
        raise ConfigError(path, f"{spec!r}: {exc}") from None


def _check_table(plane: Plane, where: str, tables: dict[int, str]) -> None:
    table = plane.table
    if table is None:
        return
    if not 1 <= table <= MAX_TABLE or table in RESERVED_TABLES:
        raise ConfigError(f"{where}.table", f"{table} is not a private routing table (1..{MAX_TABLE}, not 253-255)")
    if table == LOCAL_DELIVERY_TABLE:
        raise ConfigError(f"{where}.table", f"{table} is planemesh's local-delivery table")
    if table in tables:
        raise ConfigError(f"{where}.table", f"table {table} is already the table of plane {tables[table]!r}")
    tables[table] = plane.name


def _check_interface_claims(planes: tuple[Plane, ...]) -> None:
    """An interface name one plane lists literally must not match another plane's pattern (the same
    link would belong to two planes). Names the later of the two entries."""
    entries = [(i, j, plane.name, p) for i, plane in enumerate(planes) for j, p in enumerate(plane.interfaces)]
    for b, (ib, jb, plane_b, pat_b) in enumerate(entries):
        if pat_b == ROUTED:
            continue
        for _ia, _ja, plane_a, pat_a in entries[:b]:
            if plane_a == plane_b or pat_a == ROUTED:
                continue
            literal_b, literal_a = not _GLOB & set(pat_b), not _GLOB & set(pat_a)
            if (literal_b and fnmatch.fnmatchcase(pat_b, pat_a)) or (literal_a and fnmatch.fnmatchcase(pat_a, pat_b)):
                raise ConfigError(
                    f"planes[{ib}].interfaces[{jb}]",
                    f"{pat_b!r} and {pat_a!r} of plane {plane_a!r} claim the same interface",
                )


def validate_snapshot(snap: Snapshot, *, references: bool = True) -> None:
    """Raise the first ConfigError. `references=False` (xDS): a route may name a cluster that does not
    exist (answered 503 NC at request time, as Envoy does); the translator resolves listener -> route."""
    names: dict[str, int] = {}
    ids: dict[int, str] = {}
    ports: dict[int, str] = {}
    patterns: dict[str, str] = {}
    tables: dict[int, str] = {}
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
        for j, net in enumerate(plane.cidrs):
            if net.version == 6 and net in _V4_MAPPED:
                raise ConfigError(f"{where}.cidrs[{j}]", f"{net} is IPv4-mapped: write the IPv4 CIDR")
        _check_table(plane, where, tables)
        _check_sla(plane.sla, f"{where}.sla")
    _check_interface_claims(snap.planes)
    for i, plane in enumerate(snap.planes):
        for j, target in enumerate(plane.forward_to):
            if target not in names:
                raise ConfigError(
                    f"planes[{i}].forward_to[{j}]", f"unknown plane {target!r} (known: {', '.join(names)})"
                )
            if target == plane.name:
                raise ConfigError(f"planes[{i}].forward_to[{j}]", "a plane always reaches its own addresses")
    # CIDRs of different planes must not overlap: an address must belong to exactly one plane.
    owned = [(plane.name, i, j, net) for i, plane in enumerate(snap.planes) for j, net in enumerate(plane.cidrs)]
    for b, (pb, ib, jb, nb) in enumerate(owned):  # name the later CIDR: the one that introduced the clash
        for pa, _ia, _ja, na in owned[:b]:
            if pa != pb and na.version == nb.version and (na.first <= nb.last and nb.first <= na.last):
                raise ConfigError(f"planes[{ib}].cidrs[{jb}]", f"{nb} overlaps {na} of plane {pa!r}")
    _check_listeners(snap, names, references)
    if references:
        _check_route_references(snap)


def _check_sla(sla: SLA, where: str) -> None:
    for key in ("connect_timeout_s", "request_timeout_s", "idle_timeout_s"):
        if getattr(sla, key) <= 0:
            raise ConfigError(f"{where}.{key}", "must be > 0")
    if sla.workers < 1:
        raise ConfigError(f"{where}.workers", "must be >= 1")
    if sla.memory_max_mb < 1:
        raise ConfigError(f"{where}.memory_max_mb", "must be >= 1 (MiB per worker process)")
    if sla.max_connections_per_source is not None and sla.max_connections_per_source < 1:
        raise ConfigError(f"{where}.max_connections_per_source", "must be >= 1 (or absent: a quarter)")
    if not 1 <= sla.cpu_weight <= 10000:
        raise ConfigError(f"{where}.cpu_weight", "must be 1..10000 (cgroup cpu.weight)")
    if sla.cpus is not None:
        check_cpus_field(sla.cpus, f"{where}.cpus")
    if not 0 <= sla.priority <= 7:
        raise ConfigError(f"{where}.priority", "must be 0..7")
    if (why := plane_mtls_error(sla)) is not None:
        raise ConfigError(f"{where}.{why[0]}", why[1])


def _check_listeners(snap: Snapshot, names: Mapping[str, int], references: bool) -> None:
    declared: dict[tuple[str, int, str, str, str], str] = {}  # (plane, port, prefix, sni|transport|alpn, sources)
    for i, lsn in enumerate(snap.listeners):
        where = f"listeners[{i}]"
        if lsn.plane not in names:
            raise ConfigError(f"{where}.plane", f"unknown plane {lsn.plane!r} (known: {', '.join(names) or 'none'})")
        if not 1 <= lsn.port <= 65535:
            raise ConfigError(f"{where}.port", f"{lsn.port} is not a TCP port")
        for prefix in lsn.prefixes or (None,):
            for server_name in lsn.server_names or ("",):  # chains may share a port and differ by TLS SNI
                # permissive ports: transport_protocol; Istio's inbound mTLS vs app-TLS chains: ALPN;
                # one workload's outbound listener per source
                match = f"{server_name}|{lsn.transport_protocol}|{','.join(lsn.application_protocols)}"
                key = (lsn.plane, lsn.port, str(prefix), match, ",".join(map(str, lsn.sources)))
                if key in declared:
                    raise ConfigError(
                        f"{where}", f"plane {lsn.plane!r} port {lsn.port} is already declared by {declared[key]!r}"
                    )
                declared[key] = lsn.name
        if (
            references
            and lsn.protocol is ListenerProtocol.HTTP
            and lsn.route_config is not None
            and lsn.route_config not in snap.routes
        ):
            raise ConfigError(f"{where}.route_config", f"unknown route configuration {lsn.route_config!r}")


def _check_route_references(snap: Snapshot) -> None:
    """Every cluster a route names exists (with references: a static config; xDS answers 503 NC instead)."""
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
