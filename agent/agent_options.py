"""What `planemesh agent` was asked to do: its options, from the parsed flags and the environment."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from planemesh.model.defaults import env_setting, setting
from planemesh.model.node import NodeIdentity


@dataclass
class AgentOptions:
    config: Path | None = None  # static YAML; None with no bootstrap: the embedded default
    bootstrap: Path | None = None  # xDS bootstrap
    netns: str | None = None  # enter this network namespace first (labs)
    admin: list[str] = field(default_factory=lambda: ["unix:///run/planemesh/admin.sock"])
    pin_dir: str | None = None
    access_log: str | None = None
    drain_timeout_s: float = 5.0
    xds: str | None = None  # override the bootstrap's server address
    xds_resources: Path | None = None  # serve this directory with an embedded management server
    runtime_dir: Path = Path("/run/planemesh")
    handover: Path | None = None  # hot-upgrade socket; default <runtime_dir>/handover-<netns or host>.sock
    datapath_only: bool = False  # programs and routes only: another proxy (e.g. Envoy in bench/) owns the ports
    worker_zygote: bool = False  # --worker-zygote: fork workers from a pre-imported process (agent/zygote.py)
    host_cgroups: list[str] = field(default_factory=list)  # --host-cgroup: cgroup paths or systemd slices
    node: NodeIdentity = field(default_factory=NodeIdentity)  # --node-id/--node-ip/--pod-name: the xDS Node
    host_proc: Path = Path("/proc")  # --host-proc: the host's /proc as this process sees it

    @property
    def host_mode_file(self) -> Path | None:
        """The YAML file whose `host_mode:` section names host-mode cgroups: the static config or the bootstrap."""
        return self.config or self.bootstrap


def options_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> AgentOptions:
    """The agent's options from its parsed flags; a repeatable flag not given falls back to its variable
    (planemesh.model.defaults: flag > environment > default)."""
    node_ips = setting("agent", "--node-ip").values(args.node_ip, environ)
    if not node_ips:
        node_ips = env_setting("PLANEMESH_NODE_IP").values(None, environ)
    return AgentOptions(
        config=Path(args.config) if args.config else None,
        bootstrap=Path(args.bootstrap) if args.bootstrap else None,
        netns=args.netns,
        admin=setting("agent", "--admin").values(args.admin, environ),
        pin_dir=args.pin_dir,
        access_log=args.access_log,
        drain_timeout_s=args.drain_timeout,
        xds=args.xds,
        xds_resources=Path(args.xds_resources) if args.xds_resources else None,
        handover=Path(args.handover) if args.handover else None,
        datapath_only=args.datapath_only,
        worker_zygote=bool(args.worker_zygote) and not args.no_worker_zygote,  # exec'd workers: the least RSS
        host_cgroups=setting("agent", "--host-cgroup").values(args.host_cgroup, environ),
        node=NodeIdentity(node_id=args.node_id, node_ips=tuple(node_ips), pod_name=args.pod_name),
        host_proc=Path(args.host_proc),
    )
