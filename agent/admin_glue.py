"""Connects the running agent to the admin endpoint: readiness, live snapshot, interfaces, stats providers."""

from __future__ import annotations

import logging
from typing import Any

from planemesh.agent.admin import AdminApp, AdminServer
from planemesh.agent.agent_protocols import AgentForAdmin
from planemesh.ebpf import abi

log = logging.getLogger("planemesh.admin")


def datapath_report(agent: AgentForAdmin) -> dict[str, Any]:
    """BPF per-CPU counters, summed, as the metrics module's DataPathStats rows (one per plane)."""
    snap = agent.snapshot
    if snap is None:
        return {}
    names = {p.plane_id: p.name for p in snap.planes}
    rows: dict[str, dict[str, Any]] = {}
    for (plane_id, slot), (packets, nbytes) in agent.kernel.counters().items():
        name = names.get(plane_id)
        if name is None:
            continue
        row = rows.setdefault(name, {"plane": name, "packets": {}, "bytes": {}, "interfaces_attached": 0})
        row["packets"][abi.slot_name(slot)] = packets
        row["bytes"][abi.slot_name(slot)] = nbytes
    for iface in agent.interfaces.values():
        if iface.plane in names.values():
            rows.setdefault(iface.plane, {"plane": iface.plane, "packets": {}, "bytes": {}, "interfaces_attached": 0})
            rows[iface.plane]["interfaces_attached"] += 1
    return {"datapath": list(rows.values())}


def interface_rows(agent: AgentForAdmin) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for iface in sorted(agent.interfaces.values(), key=lambda i: i.ifindex):
        out.setdefault(iface.plane, []).append(
            {"name": iface.ifname, "ifindex": iface.ifindex, "addresses": list(iface.addresses), "attached": True}
        )
    return out


async def start_admin(agent: AgentForAdmin) -> AdminServer:
    app = AdminApp(
        readiness=agent.readiness,
        snapshot=lambda: agent.snapshot,
        interfaces=lambda: interface_rows(agent),
        is_healthy=agent.healthy,
    )
    app.stats.register("datapath", lambda: datapath_report(agent))
    app.stats.register("proxy", agent.worker_stats.report)
    app.stats.register("plane_groups", agent.cpu_groups.report)
    app.stats.register("node_overload", agent.node_overload.report)
    if agent.xds_client is not None and hasattr(agent.xds_client, "stats_report"):
        app.stats.register("xds", agent.xds_client.stats_report)
    server = AdminServer(app, agent.options.admin)
    await server.start()
    agent.admin_app = app
    return server
