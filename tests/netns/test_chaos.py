"""Chaos in the netns tier: random faults (seeded; the seed is printed, set PM_CHAOS_SEED to replay) while one
client per plane runs continuously, checking every body by SHA-256.

Faults, each attributed to the plane it hits: kill -9 of a plane's worker, SIGSTOP of it for a few seconds (and
once for good: the agent restarts it), a plane interface flapped down and up, the plane's upstream server killed
and restarted. Node-wide: a new config pushed over xDS, a broken one (NACKed; the last good keeps serving), the
agent replaced by a new one (hot upgrade). Afterwards: the agent is alive, every plane serves, no 2xx carried a
wrong body, and every failed request overlaps a fault of its own plane. Node-wide faults are asserted to cause
no error at all: a push and a NACK never touch the data path, and a hot upgrade hands the listening sockets
over (the old workers answer what their clients send while draining, with `Connection: close`).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from planemesh.agent.demo import start_agent
from planemesh.labs import netns as ns_tools
from planemesh.labs.traffic import http_requests
from tests.netns.agent_lab import AgentLab, eventually, running_agent
from tests.netns.chaos_client import ClientLog, Fault, by_fault, run_client, unexplained
from tests.netns.faults import flap, stopped, wait_worker
from tests.netns.test_agent_xds import BROKEN, resources, start_server, write
from tests.netns.test_stalled_worker import xds_bootstrap

pytestmark = pytest.mark.netns

CHAOS_S = float(os.environ.get("PM_CHAOS_SECONDS", "40"))
GRACE_S = 3.0  # a request that ends this long after its fault ended is still the fault's
PORTS = {"oam": 8081, "media": 8082}  # one upstream server per plane, so killing it is that plane's fault
FAMILY = {"oam": 4, "media": 6}  # one client per plane: IPv4 on oam, IPv6 on media
PLANE_FAULTS = ("kill9", "sigstop", "stuck", "flap", "upstream")
NODE_FAULTS = ("push", "broken_push", "agent_restart")
# After one of each: not the agent restart again, it is the slow one (the new agent compiles its BPF program:
# 5-25 s on a loaded 2-core machine) and the test is bounded to about a minute and a half.
REPEATED = ("kill9", "sigstop", "flap", "upstream", "push", "broken_push")  # "stuck" once too: 6 s or more


def chaos_resources(generation: int) -> list[dict]:
    """Listeners on both chaos ports; each generation differs (the route timeout) so a push is a change."""
    base = resources({"route": {"cluster": "passthrough", "timeout": f"{20 + generation}s"}})
    listener, rest = base[0], base[1:]
    lsns = [{**listener, "name": f"http-{port}",
             "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}}}
            for port in PORTS.values()]  # fmt: skip
    return [*lsns, *rest]


def start_upstream(env: AgentLab, plane: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "planemesh.labs.servers", "http", "--port", str(PORTS[plane])]
    return ns_tools.start_until(env.lab.pod_ns("server"), argv, "ready")


class Chaos:
    def __init__(self, env: AgentLab, res: Path, agent_args: list[str], rng: random.Random) -> None:
        self.env, self.res, self.agent_args, self.rng = env, res, agent_args, rng
        self.upstreams = {plane: start_upstream(env, plane) for plane in PORTS}
        self.faults: list[Fault] = []
        self.generation = 0
        self.old_agents: list[subprocess.Popen] = []
        self.first_agent = env.agent  # running_agent stops that one; close() stops its successors

    def run(self, kind: str) -> Fault:
        plane = self.rng.choice(list(PORTS)) if kind in PLANE_FAULTS else None
        fault = Fault(kind, plane, time.monotonic(), may_fail=kind in PLANE_FAULTS)
        self.faults.append(fault)
        getattr(self, kind)(fault)
        fault.ended = time.monotonic()
        print(f"chaos: {kind:<13} {plane or 'node':<6} {fault.ended - fault.started:5.2f}s", flush=True)
        return fault

    def kill9(self, fault: Fault) -> None:
        pid = wait_worker(self.env.agent.pid, fault.plane or "")
        os.kill(pid, signal.SIGKILL)
        wait_worker(self.env.agent.pid, fault.plane or "", timeout=30, not_pid=pid)
        time.sleep(0.5)  # the new worker reports ready shortly after it exists

    def sigstop(self, fault: Fault) -> None:
        with stopped(wait_worker(self.env.agent.pid, fault.plane or "")):
            time.sleep(self.rng.uniform(1.0, 3.0))

    def stuck(self, fault: Fault) -> None:
        """A worker stopped for good: the agent kills it after STALL_RESTART_S and starts a new one."""
        pid = wait_worker(self.env.agent.pid, fault.plane or "")
        with stopped(pid):
            wait_worker(self.env.agent.pid, fault.plane or "", timeout=30, not_pid=pid)
        time.sleep(0.5)

    def flap(self, fault: Fault) -> None:
        ifname = f"{self.rng.choice(['client', 'server'])}-{fault.plane}"
        flap(self.env.lab.node_ns, ifname, self.rng.uniform(0.3, 1.5))
        time.sleep(0.5)  # neighbours re-resolve

    def upstream(self, fault: Fault) -> None:
        plane = fault.plane or ""
        ns_tools.stop(self.upstreams[plane], signal.SIGKILL)
        time.sleep(self.rng.uniform(0.3, 1.5))
        self.upstreams[plane] = start_upstream(self.env, plane)

    def push(self, fault: Fault) -> None:
        self.generation += 1
        write(self.res / "config.yaml", chaos_resources(self.generation))
        time.sleep(1.0)

    def broken_push(self, fault: Fault) -> None:
        before = self.nacks()
        items = chaos_resources(self.generation)
        items[-2]["virtual_hosts"][0]["routes"][-1] = {"match": {"prefix": "/"}, **BROKEN}
        write(self.res / "config.yaml", items)
        assert eventually(lambda: self.nacks() > before, 10), ("the broken config was not NACKed", before, self.xds())
        self.push(fault)  # the server goes back to a good config

    def agent_restart(self, fault: Fault) -> None:
        old = self.env.agent
        self.env.agent = start_agent(self.env.lab, self.env.workdir, self.agent_args)
        fault.marks["successor_ready"] = time.monotonic()
        self.old_agents.append(old)
        assert old.wait(30) == 0, "the predecessor did not hand over cleanly"
        fault.marks["predecessor_gone"] = time.monotonic()

    def xds(self) -> object:
        try:
            return self.env.admin.get_json("/stats?format=json")[1]["xds"]
        except Exception as exc:
            return exc

    def nacks(self) -> int:
        with contextlib.suppress(Exception):
            _, stats = self.env.admin.get_json("/stats?format=json")
            return sum(row["nacks"] for row in stats["xds"])
        return -1

    def close(self) -> None:
        current = [self.env.agent] if self.env.agent is not self.first_agent else []
        for proc in [*current, *self.upstreams.values(), *self.old_agents]:
            ns_tools.stop(proc)


@contextlib.contextmanager
def clients(env: AgentLab) -> Iterator[tuple[dict[str, ClientLog], threading.Event]]:
    stop = threading.Event()
    logs = {plane: ClientLog(plane) for plane in PORTS}
    threads = []
    for i, plane in enumerate(PORTS):
        args = (env.server(plane, FAMILY[plane]), PORTS[plane], stop, i, logs[plane])
        threads.append(threading.Thread(target=ns_tools.call_in, args=(env.client_ns, run_client, *args)))
    for t in threads:
        t.start()
    try:
        yield logs, stop
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def failing(env: AgentLab) -> dict[str, str]:
    """(plane/family: what went wrong) for each plane and address family that is not proxied right now."""
    bad = {}
    for plane in PORTS:
        for version in (4, 6):
            try:
                got = http_requests(env.client_ns, env.server(plane, version), PORTS[plane], ["/"], timeout=5)
                if got.status != [200] or "x-request-id" not in got.seen(0)["headers"]:
                    bad[f"{plane}/v{version}"] = f"status {got.status}, not proxied"
            except OSError as exc:
                bad[f"{plane}/v{version}"] = repr(exc)
    return bad


def test_chaos(run_prefix: str, tmp_path: Path) -> None:
    seed = int(os.environ.get("PM_CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"chaos seed {seed} (PM_CHAOS_SEED={seed} replays the same faults)", flush=True)
    rng = random.Random(seed)
    res = tmp_path / "resources"
    res.mkdir()
    write(res / "config.yaml", chaos_resources(0))
    sock = tmp_path / "xds.sock"
    server = start_server(res, sock)
    args = ["--bootstrap", str(xds_bootstrap(tmp_path / "b.yaml", sock)), "--drain-timeout", "2"]
    chaos = None
    try:
        with running_agent(f"{run_prefix}c", args) as env:
            try:
                ns_tools.write_sysctls(env.lab.node_ns, {"net.ipv6.conf.all.keep_addr_on_down": "1"})
                chaos = Chaos(env, res, args, rng)
                assert eventually(lambda: not failing(env), 15), failing(env)
                # Every kind once (in a random order), then random ones until the time is up.
                kinds = rng.sample(PLANE_FAULTS + NODE_FAULTS, k=len(PLANE_FAULTS + NODE_FAULTS))
                with clients(env) as (logs, _):
                    time.sleep(1.0)
                    deadline = time.monotonic() + CHAOS_S
                    while kinds or time.monotonic() < deadline:
                        chaos.run(kinds.pop(0) if kinds else rng.choice(REPEATED))
                        if os.environ.get("PM_CHAOS_DEBUG"):
                            print("  after:", failing(env), flush=True)
                        time.sleep(rng.uniform(0.3, 1.2))
                    time.sleep(GRACE_S)
                assert env.agent.poll() is None, env.agent_output()
                assert eventually(lambda: not failing(env), 15), (seed, failing(env), env.agent_output()[-3000:])
                report = [f"seed {seed}"]
                for log in logs.values():
                    causes = by_fault(log, chaos.faults, GRACE_S)
                    report.append(f"{log.plane}: {log.ok} ok, {len(log.errors())} failed, overlapping {causes}")
                print("\n".join(report))
                for log in logs.values():
                    assert not log.crashed, (seed, log.plane, log.crashed)
                    assert log.ok > 20, report
                    assert not log.corrupted, (seed, log.corrupted[:5])
                    stray = unexplained(log, chaos.faults, GRACE_S)
                    assert not stray, (seed, log.plane, stray[:5])
            finally:
                if chaos is not None:
                    chaos.close()
    finally:
        server.kill()
        server.wait()
