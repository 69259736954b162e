"""Capture of pod traffic bound for peer nodes, with the agent's own TC program (ebpf/pm_tc.c).

One plane (id 1) on the pod-facing interfaces whose undeclared ports bypass, and one PROXY rule per
(tunnelled port, peer pod CIDR): the program assigns such SYNs to the transparent capture listener
(`proxy_port`) and the policy route delivers them locally. Everything else keeps the kernel's path,
and the HBONE connections themselves (node to node, port 15008) are never on a captured interface.

The plane is fail-closed: a tunnelled SYN finding no capture listener (the node restarting, handing over to a
hot-upgraded agent's, crashed) is dropped, never routed in plaintext, and so is a later segment of a captured
connection whose socket is gone (the node that held it died: the rest of the pod's stream must not leave in
plaintext; the pod gets the RST its socket's close sent). `close(detach=False)` leaves the filters,
maps and pinned program in place for the next node, which re-uses them (ebpf/build.py: same hash, no compile)
and drops interfaces it no longer captures.
"""

from __future__ import annotations

from pyroute2 import IPRoute

from planemesh.agent.hbone.routes import Routes
from planemesh.agent.hbone.settings import Capture
from planemesh.ebpf.abi import PM_IF_F_ATTACHED as IF_ATTACHED
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
        self.capture = capture
        self.routes = routes  # the routes its rules were made from
        self.dp = Datapath(pin_dir)
        self.ifindexes: list[int] = []
        try:
            with IPRoute() as ipr:
                wanted: list[int] = []
                for name in capture.interfaces:
                    found = ipr.link_lookup(ifname=name)
                    if not found:
                        raise CaptureError(f"capture.interfaces: no interface {name!r}")
                    wanted.append(found[0])
                for ifindex, (_plane, flags) in self.dp.interfaces().items():
                    if ifindex not in wanted and flags & IF_ATTACHED:  # a predecessor's, no longer captured
                        self.dp.detach(ifindex, ipr)
                for ifindex in wanted:
                    self.dp.set_interface(ifindex, PLANE)
                    self.dp.attach(ifindex, ipr)
                    self.ifindexes.append(ifindex)
                self.dp.set_plane(PLANE, capture.port, 0, Action.BYPASS, fail_closed=True, drop_orphans=True)
                self.dp.sync_policy(capture_rules(capture, routes))
                if self.own_route:
                    routing.install(routing.LocalDelivery(), ipr)
        except BaseException:
            self.close()
            raise

    def update_routes(self, routes: Routes) -> None:
        """New peer routes (WDS): the per-(port, CIDR) PROXY rules follow them, in place."""
        self.dp.sync_policy(capture_rules(self.capture, routes))
        self.routes = routes

    @property
    def compiled(self) -> bool:
        """False when the pinned program of the same hash was re-used (nothing compiled)."""
        return self.dp.compiled

    def close(self, detach: bool = True) -> None:
        """detach=False: leave everything (filters, maps, pins, route) to the next node."""
        if not detach:
            self.dp.close(detach=False)
            return
        with IPRoute() as ipr:
            if self.own_route:
                routing.remove(routing.LocalDelivery(), ipr)
            self.dp.close(detach=True, ipr=ipr)
