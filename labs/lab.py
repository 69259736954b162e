"""Build and tear down a lab: every host, the node included, in a network namespace of its own.

Names: namespaces are `<prefix>-<lab>-node` and `<prefix>-<lab>-<pod>`; the node-side interface of pod P on
plane L is `P-L`, the pod-side one is `L`. The machine's own namespace is never touched. `down()` removes
every namespace carrying the lab's prefix (leftovers of a crashed run included) and the processes in them.

A plane with a `table` is routed like a VRF on a telecom node: the host routes to its pods live in that
table, and `iif <node-side interface> lookup <table>` rules (priority IIF_RULE_PRIORITY) steer what the
node forwards from the plane's interfaces; the main table knows none of the plane's pods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns

import planemesh.labs.netns as ns_tools
from planemesh.labs.model import LabPod, LabSpec, lab_from_dict, spec_to_dict
from planemesh.model.static_config import read_yaml_file

IFA_F_NODAD = 0x02  # no duplicate address detection: lab addresses are unique by construction
DEFAULT_PREFIX = "pm"

NODE_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}
POD_SYSCTLS = {"net.ipv6.conf.default.accept_dad": "0", "net.ipv6.conf.all.accept_dad": "0"}
ROUTER_SYSCTLS = {  # a pod with `forwarding: true`
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}
IIF_RULE_PRIORITY = 2000  # after planemesh's own rules (1000, 1001), before main (32766)
MAIN_TABLE = 254
RTNH_F_ONLINK = 4
FAMILY = {4: 2, 6: 10}  # AF_INET, AF_INET6


def default_lab_path() -> Path:
    return Path(__file__).with_name("default.yaml")


def load_lab(path: str | Path | None = None, prefix: str | None = None) -> Lab:
    raw = read_yaml_file(Path(path) if path else default_lab_path())
    return Lab(lab_from_dict(raw), prefix or os.environ.get("PM_LAB_PREFIX") or DEFAULT_PREFIX)


@dataclass
class Lab:
    spec: LabSpec
    prefix: str = DEFAULT_PREFIX

    # ---- names -------------------------------------------------------------------------------
    @property
    def ns_prefix(self) -> str:
        return f"{self.prefix}-{self.spec.name}-"

    @property
    def node_ns(self) -> str:
        return self.ns_prefix + "node"

    def pod_ns(self, pod: str) -> str:
        self.spec.pod(pod)
        return self.ns_prefix + pod

    @staticmethod
    def node_ifname(pod: str, plane: str) -> str:
        return f"{pod}-{plane}"

    @staticmethod
    def pod_ifname(plane: str) -> str:
        return plane

    def node_addr(self, plane: str, version: int = 4) -> str | None:
        return self.spec.node_address(plane, version)

    def pod_addr(self, pod: str, plane: str, version: int = 4) -> str | None:
        return self.spec.pod_address(pod, plane, version)

    def namespaces(self) -> list[str]:
        return [self.node_ns] + [self.ns_prefix + p.name for p in self.spec.pods]

    def existing(self) -> list[str]:
        return [n for n in ns_tools.list_namespaces() if n.startswith(self.ns_prefix)]

    # ---- lifecycle -----------------------------------------------------------------------------
    def up(self) -> Lab:
        """Build the lab from scratch (leftovers of an earlier run are removed first)."""
        self.down()
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> list[str]:
        removed = self.existing()
        # Pods first: their processes go, then the veths go with their namespaces.
        for name in sorted(removed, key=lambda n: n == self.node_ns):
            ns_tools.remove(name)
        return removed

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: Any) -> None:
        self.down()

    def _build(self) -> None:
        for name in self.namespaces():
            netns.create(name)
        ns_tools.write_sysctls(self.node_ns, {**NODE_SYSCTLS, **dict(self.spec.node_sysctls)})
        with IPRoute(netns=self.node_ns) as node:
            _up(node, "lo")
            for pod in self.spec.pods:
                self._plug(node, pod)
            if self.spec.node_default_via is not None:
                self._node_default_route(node, *self.spec.node_default_via)

    def _plug(self, node: IPRoute, pod: LabPod) -> None:
        """A pod's namespace settings, then one veth per plane, then its default route (if any)."""
        pod_ns = self.pod_ns(pod.name)
        ns_tools.write_sysctls(pod_ns, {**POD_SYSCTLS, **(ROUTER_SYSCTLS if pod.forwarding else {})})
        with IPRoute(netns=pod_ns) as pod_ipr:
            _up(pod_ipr, "lo")
            for plane_name in pod.planes:
                self._wire(node, pod_ipr, pod.name, pod_ns, plane_name)
            if pod.gateway is not None:
                idx = pod_ipr.link_lookup(ifname=self.pod_ifname(pod.gateway))[0]
                for version in (4, 6):
                    gw = self.node_addr(pod.gateway, version)
                    if gw is not None:
                        pod_ipr.route("add", family=FAMILY[version], dst="default", gateway=gw, oif=idx)

    def _node_default_route(self, node: IPRoute, pod: str, plane: str) -> None:
        """The node's main-table default route via `pod`'s address on `plane` (like an OAM gateway)."""
        idx = node.link_lookup(ifname=self.node_ifname(pod, plane))[0]
        for version in (4, 6):
            gw = self.pod_addr(pod, plane, version)
            if gw is not None:
                node.route(
                    "add", family=FAMILY[version], dst="default", gateway=gw, oif=idx, flags=RTNH_F_ONLINK,
                    table=MAIN_TABLE,
                )  # fmt: skip

    def _wire(self, node: IPRoute, pod_ipr: IPRoute, pod: str, pod_ns: str, plane: str) -> None:
        node_if, pod_if = self.node_ifname(pod, plane), self.pod_ifname(plane)
        node.link("add", ifname=node_if, kind="veth", peer={"ifname": pod_if, "net_ns_fd": pod_ns})
        node_idx = _up(node, node_if)
        pod_idx = _up(pod_ipr, pod_if)
        table = self.spec.plane(plane).table or MAIN_TABLE
        for version, host_len in ((4, 32), (6, 128)):
            net = self.spec.plane(plane).subnet(version)
            if net is None:
                continue
            gw, me = self.node_addr(plane, version), self.pod_addr(pod, plane, version)
            family = FAMILY[version]
            flags = IFA_F_NODAD if version == 6 else 0
            # Routed, point-to-point (Calico-style): the node owns the plane's gateway address on
            # every plane veth and a host route per pod; the pod reaches its plane via that gateway.
            node.addr("add", index=node_idx, address=gw, prefixlen=host_len, flags=flags)
            node.route("add", family=family, dst=f"{me}/{host_len}", oif=node_idx, prefsrc=gw, scope=253, table=table)
            if table != MAIN_TABLE:  # VRF-like: what arrives on the plane's interfaces is routed in its table
                node.rule("add", family=family, iifname=node_if, table=table, priority=IIF_RULE_PRIORITY)
            pod_ipr.addr("add", index=pod_idx, address=me, prefixlen=host_len, flags=flags)
            pod_ipr.route("add", family=family, dst=f"{gw}/{host_len}", oif=pod_idx, scope=253)
            pod_ipr.route("add", family=family, dst=str(net.cidr), gateway=gw, oif=pod_idx, prefsrc=me)

    def add_pod(self, name: str, planes: tuple[str, ...], gateway: str | None = None) -> None:
        """Plug a new pod into the running lab (hotplug): its namespace, then one veth per plane."""
        pod = LabPod(name, tuple(planes), gateway=gateway)
        spec = dataclasses.replace(self.spec, pods=(*self.spec.pods, pod))
        lab_from_dict(spec_to_dict(spec))  # the same validation as a lab file
        self.spec = spec
        netns.create(self.pod_ns(name))
        with IPRoute(netns=self.node_ns) as node:
            self._plug(node, pod)

    def remove_pod(self, name: str) -> None:
        """Unplug a pod: its namespace goes, and its veths with it (and the node's `iif` rules naming them)."""
        pod = self.spec.pod(name)
        ns_tools.remove(self.pod_ns(name))
        with IPRoute(netns=self.node_ns) as node:
            for plane in pod.planes:
                table = self.spec.plane(plane).table
                for family in FAMILY.values() if table else ():
                    with contextlib.suppress(Exception):  # already gone (no such rule)
                        node.rule(
                            "del", family=family, iifname=self.node_ifname(name, plane), table=table,
                            priority=IIF_RULE_PRIORITY,
                        )  # fmt: skip
        self.spec = dataclasses.replace(self.spec, pods=tuple(p for p in self.spec.pods if p.name != name))

    # ---- inspection ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        present = set(self.existing())
        hosts: dict[str, Any] = {}
        for name in self.namespaces():
            if name not in present:
                hosts[name] = None
                continue
            with IPRoute(netns=name) as ipr:
                links = {link["index"]: link.get("ifname") for link in ipr.get_links() if link.get("ifname") != "lo"}
                addrs: dict[str, list[str]] = {n: [] for n in links.values()}
                for a in ipr.get_addr():
                    if a["index"] in links:
                        addrs[links[a["index"]]].append(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
            hosts[name] = addrs
        return {"lab": self.spec.name, "prefix": self.prefix, "up": present == set(self.namespaces()), "hosts": hosts}


def _up(ipr: IPRoute, ifname: str) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise RuntimeError(f"interface {ifname} did not appear")
    ipr.link("set", index=idx[0], state="up")
    return idx[0]
