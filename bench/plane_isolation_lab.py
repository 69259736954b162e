"""The isolation bench's lab pieces: cgroups that give the load generators and lab servers their own CPU budget
(pinned per layout), one nginx per plane, the floods aimed at the flooded plane, and a bulk-TCP client.

    python -m bench.plane_isolation_lab bulk --host ADDR --port 9000 --seconds S [--streams N]

Groups, each with its own budget (cgroup v2 cpu.max / v1 cfs quota) and weight; with two CPUs or more the
protected plane `oam` owns the last CPU ("P") when its cpuset is on, the others are the rest ("R"):

| group               | budget  | weight | holds                                        | layout sides | apart |
|---------------------|---------|--------|----------------------------------------------|--------------|-------|
| bench-probe         | 0.6 CPU | 1000   | wrk measuring oam                            | P            | R     |
| bench-oam-server    | 0.6 CPU | 400    | nginx answering oam's probe                  | P            | R     |
| bench-flood         | 0.5 CPU | 100    | the flood clients aimed at media             | R            | R     |
| bench-flood-servers | 0.6 CPU | 100    | nginx on media's address, the lab's servers  | R            | R     |
| bench-spin          | none    | 100    | the `spin` control: a busy loop per CPU      | R            | R     |

Layout `sides` (default): oam's whole path (probe, its worker, its server) on one CPU, the flood's whole path
(flood client, media's worker, media's servers) on the others, so the flood cannot slow oam's measurement
through anything but the agent (and the kernel they share). Layout `apart` keeps every load generator and
server off the protected plane's CPU (the probe then shares the others with the flood). Their parent group has
weight 10,000 (the agent's has 100 per worker). The groups are made with the agent's own cgroup code
(agent/cpu_groups.py: v2 where the controller is on the unified hierarchy, else v1) below this process's cgroup
as `planemesh-bench-[<prefix>-]<pid>`, and removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import NGINX, parse_wrk
from planemesh.agent.admin_client import AdminClient, AdminUnreachable
from planemesh.agent.cpu_groups import CpuGroups, join_argv
from planemesh.labs import Lab
from planemesh.labs import netns as ns_tools
from planemesh.labs.traffic import host_port, wait_for_port
from planemesh.model.plane_limits import format_cpu_list, parse_cpu_list
from tests.support.procs import dev_module_argv

# The CPU-heavy flood: nginx in the server pod serves a large body on port 8080 (declared HTTP on both planes),
# so plane media's worker spends its CPU streaming bodies rather than refusing requests. The probe reads nginx's
# small index.html on the same port.
HEAVY_PORT, HEAVY_PATH, HEAVY_BYTES = 8080, "/heavy.bin", 1 << 20
PROBE_PATH = "/index.html"
BULK_PORT = 9000  # declared TCP: bypassed in the kernel, shaped by the plane's HTB class (sla.bandwidth_mbit)
PROBE, OAM_SERVER, FLOOD, FLOOD_SERVERS = "bench-probe", "bench-oam-server", "bench-flood", "bench-flood-servers"
SPIN = "bench-spin"
LAYOUTS = ("sides", "apart")


@dataclass(frozen=True)
class Budget:
    weight: int
    cpu_max: float  # CPUs' worth of time per period (0: no cap)
    oam_side: bool  # layout sides: on the protected plane's CPU


BUDGETS = {
    PROBE: Budget(1000, 0.6, True),
    OAM_SERVER: Budget(400, 0.6, True),
    FLOOD: Budget(100, 0.5, False),
    FLOOD_SERVERS: Budget(100, 0.6, False),
    SPIN: Budget(100, 0.0, False),  # fills the other CPUs whole: what any load there costs oam on this machine
}
PERIOD_US = 100_000
PARENT_WEIGHT = 10_000


def online_cpus() -> frozenset[int]:
    return parse_cpu_list(Path("/sys/devices/system/cpu/online").read_text())


def plane_cpus(online: frozenset[int]) -> tuple[str | None, str | None]:
    """(protected plane's cpus, the rest) when there are two CPUs or more; else (None, None): no pinning."""
    if len(online) < 2:
        return None, None
    last = max(online)
    return str(last), format_cpu_list(online - {last})


class BenchGroups:
    """The load generators' and lab servers' cgroups (see the module docstring)."""

    def __init__(self, layout: str = "sides", prefix: str | None = None) -> None:
        self.layout = layout
        self.groups = CpuGroups.create(f"bench-{prefix + '-' if prefix else ''}{os.getpid()}")
        self.cpus: dict[str, str | None] = {}
        self.budgets: dict[str, str] = {}
        protected, rest = plane_cpus(online_cpus())
        for name, budget in BUDGETS.items():
            self.cpus[name] = protected if layout == "sides" and budget.oam_side else rest
            self.groups.set_plane(name, budget.weight, 1, self.cpus[name], 0)
            self.budgets[name] = self._set_cpu_max(name, budget.cpu_max)
        # The groups' parent outweighs the agent's (100 per worker): on the CPU they share with a plane's
        # worker, the probe is not starved by the flood it measures; the budgets above still cap them.
        cpu = self.groups.hierarchies.get("cpu")
        if cpu is not None:
            with contextlib.suppress(OSError):
                cpu.weight_file(cpu.base).write_text(cpu.weight_value(PARENT_WEIGHT))

    def _set_cpu_max(self, name: str, cpus: float) -> str:
        found = self.groups.group(name, "cpu")
        if found is None:
            return "none (no cpu controller)"
        if not cpus:
            return "no cap"
        group, version = found
        quota = int(cpus * PERIOD_US)
        try:
            if version == 2:
                (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            else:
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
        except OSError as exc:
            return f"not applied: {exc}"
        return f"{cpus:g} CPU"

    def describe(self) -> str:
        parts = [f"{n} ({self.budgets[n]}, weight {BUDGETS[n].weight}, CPUs {self.cpus[n] or 'any'})" for n in BUDGETS]
        missing = {p: w for p, w in self.groups.not_applied.items() if w}
        return f"layout {self.layout}: {', '.join(parts)}" + (f"; not applied: {missing}" if missing else "")

    def wrap(self, name: str, argv: list[str]) -> list[str]:
        """`argv` started inside group `name` (it joins before it execs: everything it does counts there)."""
        return join_argv(self.groups.procs_files(name), argv)

    def members(self) -> dict[int, str]:
        """pid -> the bench group it is in (its label in bench/plane_isolation_cpu.py's ledger)."""
        found: dict[int, str] = {}
        for name in BUDGETS:
            for procs in self.groups.procs_files(name)[:1]:
                with contextlib.suppress(OSError, ValueError):
                    found.update((int(pid), name.removeprefix("bench-")) for pid in Path(procs).read_text().split())
        return found

    def move(self, name: str, pids: list[int]) -> None:
        for pid in pids:
            self.groups.add(name, pid)

    def close(self) -> None:
        self.groups.close()


NGINX_CONF = """\
daemon off; master_process off; worker_processes 1; pid {work}/nginx.pid; error_log {work}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000; keepalive_timeout 120s;
  client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work}; uwsgi_temp_path {work};
  scgi_temp_path {work};
  server {{ listen {address}:{port} backlog=4096; root {root}; }}
}}
"""


@contextlib.contextmanager
def plane_backends(lab: Lab, workdir: Path, groups: BenchGroups) -> Iterator[None]:
    """One nginx per plane on HEAVY_PORT, each on its plane's server address only and in its side's group:
    oam's answers the probe (PROBE_PATH), media's the CPU-heavy flood (HEAVY_PATH)."""
    root = workdir / "www"
    root.mkdir(exist_ok=True)
    (root / PROBE_PATH.lstrip("/")).write_text("planemesh bench " * 8)
    (root / HEAVY_PATH.lstrip("/")).write_bytes(bytes(range(256)) * (HEAVY_BYTES // 256))
    procs = []
    try:
        for plane, group in (("oam", OAM_SERVER), ("media", FLOOD_SERVERS)):
            address = lab.pod_addr("server", plane, 4) or ""
            work = workdir / f"nginx-{plane}"
            work.mkdir(exist_ok=True)
            conf = work / "nginx.conf"
            conf.write_text(NGINX_CONF.format(work=work, address=address, port=HEAVY_PORT, root=root))
            argv = ns_tools.exec_argv(lab.pod_ns("server"), [NGINX, "-c", str(conf), "-e", str(work / "error.log")])
            procs.append(subprocess.Popen(groups.wrap(group, argv)))
            wait_for_port(lab.pod_ns("client"), address, HEAVY_PORT)
        yield
    finally:
        for proc in procs:
            ns_tools.stop(proc)


# ---- the floods ------------------------------------------------------------------------------------------------

FLOODS = ("rate", "cpu_heavy", "connections", "rapid_reset", "stream_flood", "bandwidth")
CONTROL = "none"  # no flood at all: two idle probes in a row, the machine's own spread of the ratios
# No flood either, but a busy loop on each CPU that is not oam's (in group SPIN): what plain load over there costs
# oam's p99 on this machine, with nothing of the agent or the network involved (the VM's floor for the ratios).
# SCHED_IDLE: the loops keep those CPUs busy without outweighing anyone there, so the scheduler does not move a
# shared machine's other tasks onto oam's CPU to make room (uncapped at normal weight, they did: 385 ms/s there).
SPIN_CONTROL = "spin"
CONTROLS = (CONTROL, SPIN_CONTROL)
SPIN_CODE = """import os, sys, time
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
end = time.monotonic() + float(sys.argv[2])
for _ in range(int(sys.argv[1]) - 1):
    if os.fork() == 0:
        break
while time.monotonic() < end:
    pass
"""


def flood_argv(kind: str, target: str, seconds: float) -> list[str]:
    """The client that floods plane media (address `target`) for `seconds`, run in the attacker's pod."""
    if kind == CONTROL:
        return ["sleep", f"{seconds:g}"]
    if kind == SPIN_CONTROL:  # one loop per CPU of the flood's side
        return [sys.executable, "-c", SPIN_CODE, str(max(1, len(online_cpus()) - 1)), f"{seconds:g}"]
    attack = [sys.executable, "-m", "planemesh.labs.attacks"]
    seconds_arg = ["--seconds", f"{seconds:g}"]
    if kind == "rate":  # far beyond the plane's rate limit: its excess must get 429s at once
        return _wrk(target, 80, "/iso", 64, seconds)
    if kind == "cpu_heavy":  # 1 MiB bodies: the flooded plane's worker busy streaming
        return _wrk(target, HEAVY_PORT, HEAVY_PATH, 16, seconds)
    if kind == "connections":  # idle connections: as many as the attacker can open (labs/attacks.py: 10k)
        return [*attack, "idle_flood", "--host", target, "--port", "80", *seconds_arg]
    if kind == "rapid_reset":  # HEADERS + RST_STREAM pairs (CVE-2023-44487)
        return [*attack, "rapid_reset", "--host", target, "--port", "80", *seconds_arg]
    if kind == "stream_flood":  # 1,000 streams with window 0 on 1 MiB responses
        return [*attack, "stream_flood", "--host", target, "--port", str(HEAVY_PORT), "--path", HEAVY_PATH,
                *seconds_arg]  # fmt: skip
    if kind == "bandwidth":  # bulk TCP through the kernel bypass on the flooded plane
        return dev_module_argv("bench.plane_isolation_lab", "bulk", "--host", target, *seconds_arg)
    raise ValueError(f"unknown flood {kind!r} (known: {', '.join(FLOODS)})")


def _wrk(target: str, port: int, path: str, connections: int, seconds: float) -> list[str]:
    url = f"http://{host_port(target, port)}{path}"
    return ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "5s", url]


def flood_answers(kind: str, out: str) -> dict:
    """What the flooded plane answered, from the flood client's output."""
    if kind in CONTROLS:
        return {}
    if kind in ("rate", "cpu_heavy"):
        try:
            r = parse_wrk(f"media {kind}", out)
        except (AttributeError, ValueError):
            return {"error": out[-300:]}
        return {"requests": r.requests, "non_2xx": r.non_2xx, "timeouts": r.timeouts, "rps": round(r.rps)}
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": out[-300:]}


def describe_answers(kind: str, o: dict) -> str:
    shown = _describe(kind, o)
    agent = {k: v for k, v in o.get("agent", {}).items() if v}
    return shown + (f"; agent counted {', '.join(f'{v} {k}' for k, v in agent.items())}" if agent else "")


def _describe(kind: str, o: dict) -> str:
    if "error" in o:
        return f"flood failed: {o['error'][:80]!r}"
    if kind == CONTROL:
        return "no flood: idle vs idle, the machine's noise"
    if kind == SPIN_CONTROL:
        return "no flood: a busy loop on each other CPU, the VM's floor"
    if kind in ("rate", "cpu_heavy"):
        return f"{o['requests']} requests, {o['non_2xx']} non-2xx (429/503), {o['timeouts']} timeouts"
    if kind == "bandwidth":
        return f"{o['mbit_s']:.0f} Mbit/s echoed over {o['streams']} streams"
    if kind == "connections":  # idle_flood: how many it tried, got, lost before connecting, and saw closed
        notes = o.get("notes", {})
        tried, failed, opened_s = notes.get("attempted", 0), o.get("connect_failed", 0), notes.get("opened_s")
        took = f" in {opened_s:.1f} s" if opened_s is not None else " (deadline first)"
        return (f"{o.get('connections', 0)} of {tried} connected{took} ({failed} did not), "
                f"{o.get('closed', 0)} closed by the proxy")  # fmt: skip
    said = {**o.get("responses", {}), **{f"GOAWAY {k}": v for k, v in o.get("goaway", {}).items()}}
    return f"{o.get('connections', 0)} conns, {o.get('closed', 0)} closed by the proxy, answers {said or '-'}"


# ---- what the agent counted on the flooded plane ------------------------------------------------------------

# (/stats section, field) -> the name the report shows: how the flooded plane answered its excess, by the agent's
# own count (connections accepted, 429s, connections refused past the source's share or by the overload manager).
AGENT_COUNTERS = {
    ("listeners", "connections"): "accepted",
    ("listeners", "rate_limited"): "429",
    ("overload", "source_refused"): "refused (source share)",
    ("overload", "shed_connections"): "shed conns",
    ("overload", "shed_requests"): "shed reqs",
}


def agent_counts(admin: Path, plane: str) -> dict[str, int]:
    """The plane's AGENT_COUNTERS from the agent's admin /stats (summed over its rows); {} when unreachable."""
    try:
        _, stats = AdminClient(f"unix://{admin}").get_json("/stats?format=json")
    except AdminUnreachable:
        return {}
    out = dict.fromkeys(AGENT_COUNTERS.values(), 0)
    for (section, name), shown in AGENT_COUNTERS.items():
        out[shown] += sum(int(row.get(name, 0)) for row in stats.get(section, []) if row.get("plane") == plane)
    return out


def counted(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


# ---- bulk TCP client (run in the attacker's pod) ------------------------------------------------------------


def bulk(host: str, port: int, seconds: float, streams: int) -> dict:
    """`streams` connections to the TCP echo server, each sending as fast as it can and reading the echo back;
    returns the bytes that came back per second, as Mbit/s."""
    socks = [socket.create_connection((host, port), timeout=5) for _ in range(streams)]
    chunk = b"\0" * 65536
    received = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        readable, writable, _ = select.select(socks, socks, [], 0.05)
        for s in writable:
            with contextlib.suppress(BlockingIOError):
                s.send(chunk, socket.MSG_DONTWAIT)
        for s in readable:
            with contextlib.suppress(BlockingIOError):
                received += len(s.recv(1 << 20, socket.MSG_DONTWAIT))
    for s in socks:
        s.close()
    return {"kind": "bandwidth", "streams": streams, "bytes": received, "mbit_s": received * 8 / seconds / 1e6}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["bulk"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=BULK_PORT)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--streams", type=int, default=4)
    args = parser.parse_args(argv)
    print(json.dumps(bulk(args.host, args.port, args.seconds, args.streams)), flush=True)


if __name__ == "__main__":
    main()
