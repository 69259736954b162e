"""The agent's xDS side: a client of any control plane (--bootstrap), or of an embedded management
server serving a directory of Envoy resources (--xds-resources, the single-node default). With a bootstrap
`workloads:` section, one stream per local workload instead (agent/workloads/streams.py, docs/workloads.md).

The client calls Agent.apply for every complete, validated snapshot; a ConfigError raised there becomes
the NACK and the previous snapshot keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

from planemesh.agent.agent_protocols import AgentForXds
from planemesh.model.config import ConfigError


def bootstrap_for(agent: AgentForXds) -> Any:
    """The bootstrap the agent connects with: the file (or the embedded default), --xds and the node identity."""
    from planemesh.xds.bootstrap import Bootstrap, check_target, load_bootstrap, with_node

    opts = agent.options
    if opts.bootstrap is not None:
        boot = load_bootstrap(opts.bootstrap)
    else:
        # Embedded mode: the node's planes come from the static config (or the embedded default).
        from planemesh.model.static_config import load_default_config, load_static_config

        planes = (load_static_config(opts.config) if opts.config else load_default_config()).planes
        boot = Bootstrap(node_id=os.uname().nodename, cluster="planemesh", server="unix:///dev/null", planes=planes)
    if opts.xds:
        boot = dataclasses.replace(boot, server=check_target(opts.xds, "--xds"))
    return with_node(boot, opts.node)


async def start_xds(agent: AgentForXds) -> Any:
    from planemesh.xds.transport import XdsClient

    opts = agent.options
    boot = bootstrap_for(agent)
    if opts.xds_resources is not None:
        from planemesh.xds.server import ManagementServer

        if not opts.xds_resources.is_dir():
            raise ConfigError("--xds-resources", f"{opts.xds_resources} is not a directory")
        server = ManagementServer(opts.xds_resources)
        runtime = opts.runtime_dir
        runtime.mkdir(parents=True, exist_ok=True)
        address = await server.start(f"unix://{runtime / f'xds-{os.getpid()}.sock'}")
        agent.embedded_xds_server = server
        boot = dataclasses.replace(boot, server=address)
    if boot.workloads is not None:
        from planemesh.agent.workloads.sources import make_source
        from planemesh.agent.workloads.streams import WorkloadStreams

        streams = WorkloadStreams(boot, boot.workloads, agent.apply)
        agent.spawn(streams.run(make_source(boot.workloads, boot.planes)), "xds-workloads")
        return streams
    client = XdsClient(boot, agent.apply)
    agent.spawn(client.run(), "xds-client")
    return client


async def stop_xds(agent: AgentForXds) -> None:
    server = getattr(agent, "embedded_xds_server", None)
    if server is not None:
        async with asyncio.timeout(5):
            await server.stop()
