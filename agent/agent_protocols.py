"""What the agent's glue modules need from the running agent (agent/daemon.py's Agent), as protocols: the glue
calls back into the agent without importing its module, and the agent imports the glue (no import cycle).
tests/unit/test_agent_protocols.py checks that Agent provides every member named here."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from planemesh.agent.agent_options import AgentOptions
from planemesh.agent.cpu_groups import CpuGroups
from planemesh.agent.kernel import KernelDataPath
from planemesh.agent.node_overload_loop import NodeOverloadLoop
from planemesh.agent.sdnotify import Readiness
from planemesh.agent.worker_stats import WorkerStats
from planemesh.model.config import Snapshot
from planemesh.netplanes.discovery import PlaneInterface

if TYPE_CHECKING:  # the admin endpoint's module is imported only once the agent serves it (agent/daemon.py)
    from planemesh.agent.admin import AdminApp


class AgentForXds(Protocol):
    """agent/xds_source.py: builds the xDS client (or the embedded server) that feeds the agent snapshots."""

    options: AgentOptions
    embedded_xds_server: Any  # set by xds_source: planemesh.xds.server.ManagementServer with --xds-resources

    async def apply(self, snap: Snapshot) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]: ...


class AgentForAdmin(Protocol):
    """agent/admin_glue.py: the admin endpoint reads the agent's live state through these at request time."""

    options: AgentOptions
    snapshot: Snapshot | None
    interfaces: dict[int, PlaneInterface]
    kernel: KernelDataPath
    readiness: Readiness
    cpu_groups: CpuGroups
    worker_stats: WorkerStats  # the "proxy" stats provider
    node_overload: NodeOverloadLoop  # the "node_overload" stats provider
    xds_client: Any  # an XdsClient or WorkloadStreams (agent/xds_source.py); None without xDS
    admin_app: AdminApp | None  # set by admin_glue once the endpoint serves

    def healthy(self) -> bool: ...
