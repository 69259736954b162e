"""What the data-path objects ask of tc: the calls Datapath (ebpf/loader.py) and EgressShaper (ebpf/egress_shaper.py)
make on an interface, as a Protocol, so the netlink side can run where pyroute2 is: in this process
(ebpf/tc_attach.py LocalTc: tests, the HBONE node) or in the agent's short-lived netlink helper
(netplanes/nl_client.py HelperTc), while the programs and maps stay with the caller."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from planemesh.netplanes.htb_plan import EgressOp, EgressPlan


class TcHooks(Protocol):
    def attach(self, ifindex: int, prog_fd: int, name: str) -> bool:
        """Our direct-action filter on clsact ingress (replaced if there); True if this created the clsact."""
        ...

    def detach(self, ifindex: int, remove_clsact: bool) -> None:
        """Our ingress filter off; the clsact too if `remove_clsact` and nothing else uses it."""
        ...

    def egress_apply(self, ifindex: int, plan: EgressPlan, prog_fd: int) -> list[EgressOp]:
        """The interface's HTB made to carry `plan` (a diff) with our classifier on it; the operations run."""
        ...

    def egress_remove(self, ifindex: int) -> bool:
        """Our HTB root deleted (the kernel default returns); True if there was one."""
        ...
