"""Capture of pod traffic bound for peer nodes, with the agent's own TC program (ebpf/pm_tc.c).

One plane (id 1) on the pod-facing interfaces whose undeclared ports bypass, and one PROXY rule per
(tunnelled port, peer pod CIDR): the program assigns such SYNs to the transparent capture listener
(`proxy_port`) and the policy route delivers them locally. Everything else keeps the kernel's path,
and the HBONE connections themselves (node to node, port 15008) are never on a captured interface.
"""

from __future__ import annotations

from pyroute2 import IPRoute

from planemesh.agent.hbone.routes import Routes
from planemesh.agent.hbone.settings import Capture
from planemesh.ebpf.abi import Action
from planemesh.ebpf.loader import Datapath
from planemesh.ebpf.policy import PolicyRule
from planemesh.netplanes import routing

PLANE = 1


class CaptureError(RuntimeError):
    pass


def capture_rules(capture: Capture, routes: Routes) -> dict[PolicyRule, Action]:
    """(plane, port, peer CIDR) -> PROXY for every tunnelled port and peer pod CIDR. Pure."""
    return {
        PolicyRule(PLANE, port, str(cidr)): Action.PROXY
        for port in capture.ports
        for peer in routes.peers
        for cidr in peer.cidrs
    }


class CaptureDatapath:
    """Attach, configure, and on close detach everything it installed (in the calling netns)."""

    def __init__(self, capture: Capture, routes: Routes, pin_dir: str | None = None, own_route: bool = True) -> None:
        """`own_route`: install (and on close remove) the policy route; False when the agent owns it (same mark)."""
        self.own_route = own_route
        self.dp = Datapath(pin_dir)
        self.ifindexes: list[int] = []
        try:
            with IPRoute() as ipr:
                for name in capture.interfaces:
                    found = ipr.link_lookup(ifname=name)
                    if not found:
                        raise CaptureError(f"capture.interfaces: no interface {name!r}")
                    self.dp.set_interface(found[0], PLANE)
                    self.dp.attach(found[0], ipr)
                    self.ifindexes.append(found[0])
                self.dp.set_plane(PLANE, capture.port, 0, Action.BYPASS)
                self.dp.sync_policy(capture_rules(capture, routes))
                if self.own_route:
                    routing.install(routing.LocalDelivery(), ipr)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with IPRoute() as ipr:
            if self.own_route:
                routing.remove(routing.LocalDelivery(), ipr)
            self.dp.close(detach=True, ipr=ipr)
