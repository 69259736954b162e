"""The agent's netlink helper: a short-lived child that makes the agent's kernel changes through pyroute2.

pyroute2 (~22 MB of RSS: its package imports all of itself) never stays in the long-lived agent. The agent
(netplanes/nl_client.py) starts this process when it has something to change (rules, routes, tc filters, HTB)
and closes it once idle; it reads links itself (netplanes/link_monitor.py). It runs in the agent's network
namespace (inherited) and exits when the agent closes its socket or dies (its end closes with it; not
PR_SET_PDEATHSIG, which fires when the *thread* that started the helper ends).

Protocol, on a SOCK_SEQPACKET socketpair: a request is one message, pickle (op name, args) with the BPF program
fds it needs as SCM_RIGHTS; the reply is pickle ("ok", result) or ("error", errno or 0, text). Only the
operations of OPS run. Pickle is safe here: both ends are the same installation and the socket is private to
the agent and its child.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute

from planemesh import cpickle as pickle
from planemesh.ebpf import egress_netlink
from planemesh.ebpf.tc_attach import LocalTc
from planemesh.netplanes import routing
from planemesh.netplanes.htb_plan import EgressPlan
from planemesh.netplanes.routing_plan import LocalDelivery, MarkRule

MAX_MESSAGE = 1 << 20
MAX_FDS = 4
PR_SET_NAME = 15
COMM = b"pm-nl-helper"


def _tc_attach(ipr: IPRoute, fds: list[int], ifindex: int, name: str) -> bool:
    return LocalTc(ipr).attach(ifindex, fds[0], name)


def _tc_detach(ipr: IPRoute, _fds: list[int], ifindex: int, remove_clsact: bool) -> None:
    LocalTc(ipr).detach(ifindex, remove_clsact)


def _egress_apply(ipr: IPRoute, fds: list[int], ifindex: int, plan: EgressPlan) -> list:
    return egress_netlink.apply_plan(ipr, ifindex, plan, fds[0])


def _egress_remove(ipr: IPRoute, _fds: list[int], ifindex: int) -> bool:
    return egress_netlink.remove_plan(ipr, ifindex)


def _routing_install(ipr: IPRoute, _fds: list[int], spec: LocalDelivery) -> list[str]:
    return routing.install(spec, ipr)


def _routing_remove(ipr: IPRoute, _fds: list[int], spec: LocalDelivery) -> list[str]:
    return routing.remove(spec, ipr)


def _rules_sync(ipr: IPRoute, _fds: list[int], own_mark: int, priority: int, desired: frozenset[MarkRule]) -> list:
    return routing.PlaneRouting(own_mark, priority).sync_rules(desired, ipr)


OPS: dict[str, Callable[..., Any]] = {
    "tc.attach": _tc_attach,
    "tc.detach": _tc_detach,
    "egress.apply": _egress_apply,
    "egress.remove": _egress_remove,
    "routing.install": _routing_install,
    "routing.remove": _routing_remove,
    "rules.sync": _rules_sync,
}


def handle(ipr: IPRoute, data: bytes, fds: list[int]) -> tuple[Any, ...]:
    """One request's reply; an exception becomes ("error", errno, text)."""
    try:
        name, args = pickle.loads(data)
        op = OPS.get(name)
        if op is None:
            return ("error", errno.EINVAL, f"no netlink operation {name!r}")
        return ("ok", op(ipr, fds, *args))
    except Exception as exc:  # every failure goes back to the agent, which raises it there
        code = getattr(exc, "code", None) or getattr(exc, "errno", None) or 0
        return ("error", code if isinstance(code, int) else 0, f"{type(exc).__name__}: {exc}")


def recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    data, ancdata, _flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    return data, list(fds)


def serve(sock: socket.socket) -> None:
    """Answer requests until the agent closes its end."""
    with IPRoute() as ipr:
        while True:
            data, fds = recv(sock)
            try:
                if not data:
                    return
                reply = handle(ipr, data, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            sock.send(pickle.dumps(reply))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "--fd":
        raise SystemExit("usage: python -m planemesh.netplanes.nl_helper --fd N")
    ctypes.CDLL(None).prctl(PR_SET_NAME, COMM, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the agent's to handle
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        serve(socket.socket(fileno=int(args[1])))


if __name__ == "__main__":
    main()
