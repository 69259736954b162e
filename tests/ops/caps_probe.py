"""Run under a reduced capability set: do what the agent does to the kernel, report each step as JSON.

Used by test_ops_systemd.py (argv: IFNAME). Runs inside a network namespace the test created.
"""

from __future__ import annotations

import json
import socket
import sys


def _cap_eff() -> str:
    with open("/proc/self/status") as status:
        return next(line.split()[1] for line in status if line.startswith("CapEff:"))


def main(ifname: str) -> int:
    steps: dict[str, str] = {"cap_eff": _cap_eff()}

    def step(name: str, func) -> bool:  # type: ignore[no-untyped-def]
        try:
            func()
            steps[name] = "ok"
            return True
        except Exception as exc:
            steps[name] = f"{type(exc).__name__}: {exc}"[:300]
            return False

    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ifindex = ipr.link_lookup(ifname=ifname)[0]
        state: dict = {}

        def load() -> None:
            from planemesh.ebpf.loader import Datapath

            state["dp"] = Datapath(None)

        if step("bpf_load", load):
            step("tc_attach", lambda: state["dp"].attach(ifindex, ipr))
            step("map_update", lambda: state["dp"].set_interface(ifindex, 1))

        step("fwmark_rule", lambda: ipr.rule("add", family=socket.AF_INET, fwmark=0x100, table=4242, priority=4242))
        step("local_route", lambda: ipr.route("add", family=socket.AF_INET, dst="0.0.0.0/0", type="local",
                                              table=4242, oif=1, scope="host"))  # fmt: skip

    def transparent_listener() -> None:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
            sock.setsockopt(socket.IPPROTO_IPV6, 75, 1)  # IPV6_TRANSPARENT
            sock.bind(("::", 0))
            sock.listen()

    def marked_socket() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, 36, 0x200)  # SO_MARK

    step("ip_transparent", transparent_listener)
    step("so_mark", marked_socket)
    print(json.dumps(steps))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
