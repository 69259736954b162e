"""Host mode with the real agent in a lab: processes of a configured cgroup, running in the node namespace,
have their connects to proxied ports of a plane's addresses intercepted by the agent's proxy; processes
outside it, and bypassed ports, are not. The agent itself runs inside the intercepted cgroup (its upstream
sockets carry the own mark, so they are never redirected: no loop), while a naive proxy without that
mark loops. Stopping or killing the agent leaves nothing attached: connects go direct (fail open).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from planemesh.agent.demo import start_agent, start_servers
from planemesh.ebpf.host_redirect import HostMode, attached_programs
from planemesh.labs import Lab, load_lab, procs
from planemesh.labs import netns as ns_tools
from planemesh.labs.traffic import http_requests
from planemesh.model.static_config import default_config_text, load_default_config
from tests.netns.agent_lab import AgentLab, eventually
from tests.netns.host_cgroups import cgroup2_root, http_get, joiner, temporary_cgroup

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

PROXIED, BYPASSED = 80, 9080  # the lab server's HTTP ports: declared http / undeclared (bypass)
NOTHING_ATTACHED = {"sock_ops": [], "connect4": [], "connect6": []}


def start_agent_in(
    lab: Lab, workdir: Path, cgroup: str, *, inside: bool, extra: tuple[str, ...] = ()
) -> subprocess.Popen:
    """The agent with host mode on `cgroup` (--host-cgroup, unless `extra` configures it); with inside=True
    it (and so its workers) runs in that very cgroup."""
    args = extra if "--config" in extra else ("--host-cgroup", cgroup, *extra)
    return start_agent(lab, workdir, args, preexec_fn=joiner(cgroup if inside else None))


def write_config(path: Path, cgroups: list[str]) -> None:
    """The embedded default configuration plus a host_mode section naming `cgroups`."""
    path.write_text(default_config_text() + "\nhost_mode:\n  cgroups: " + json.dumps(cgroups) + "\n")


@contextlib.contextmanager
def lab_with_servers(prefix: str) -> Iterator[tuple[Lab, list[subprocess.Popen]]]:
    lab = load_lab(prefix=prefix)
    with lab:
        servers = start_servers(lab)
        try:
            yield lab, servers
        finally:
            for proc in servers:
                ns_tools.stop(proc)


@pytest.fixture(scope="module")
def cgroup(run_prefix: str) -> Iterator[str]:
    with temporary_cgroup(f"{run_prefix}-hostagent") as path:
        yield path


@pytest.fixture(scope="module")
def env(run_prefix: str, cgroup: str) -> Iterator[AgentLab]:
    """The default lab and an agent running inside the cgroup it intercepts, named by its static
    configuration's host_mode section (relative to the cgroup v2 mount)."""
    with (
        tempfile.TemporaryDirectory(prefix="planemesh-test-") as tmp,
        lab_with_servers(f"{run_prefix}h") as (lab, servers),
    ):
        config = Path(tmp) / "planemesh.yaml"
        write_config(config, [os.path.basename(cgroup)])
        agent = start_agent_in(lab, Path(tmp), cgroup, inside=True, extra=("--config", str(config)))
        try:
            yield AgentLab(lab, Path(tmp), agent, servers)
        finally:
            ns_tools.stop(agent)


def _in_cgroup(pid: int, cgroup: str) -> bool:
    """Is the process in `cgroup` or below it (the agent may put its workers in per-plane CPU groups)?"""
    with open(f"/proc/{pid}/cgroup") as f:
        rel = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
    path = os.path.join(cgroup2_root(), rel.lstrip("/"))
    return path == cgroup or path.startswith(cgroup + "/")


def _server_log(env: AgentLab, plane: str, path: str) -> list[dict]:
    """The requests for `path` the server pod saw on its proxied port (asked from inside the pod)."""
    r = http_requests(env.lab.pod_ns("server"), env.server(plane, 4), PROXIED, ["/_lab/log"])
    return [entry for entry in json.loads(r.bodies[0]) if entry["path"] == path]


@pytest.mark.parametrize(("plane", "version"), [("oam", 4), ("oam", 6), ("media", 4), ("media", 6)])
def test_process_in_the_cgroup_is_intercepted(env: AgentLab, cgroup: str, plane: str, version: int) -> None:
    path = f"/host-{plane}-{version}-{uuid.uuid4().hex[:8]}"
    r = http_get(env.lab.node_ns, cgroup, env.server(plane, version), PROXIED, path)
    assert r["status"] == 200, r
    seen = r["seen"]
    request_id = seen["headers"]["x-request-id"]  # added by the agent's proxy
    assert len(request_id) == 36
    assert seen["path"] == path
    # The upstream leg leaves from the node's own address on the destination's plane.
    assert seen["peer"] == env.lab.node_addr(plane, version)
    line = eventually(lambda: next((ln for ln in env.access_log().splitlines() if request_id in ln), None))
    assert line and f'"GET {path} HTTP/1.1" 200' in line and line.endswith(plane)


@pytest.mark.parametrize("version", [4, 6])
def test_process_outside_the_cgroup_is_not_intercepted(env: AgentLab, version: int) -> None:
    r = http_get(env.lab.node_ns, None, env.server("oam", version), PROXIED, "/outside")
    assert r["status"] == 200, r
    assert "x-request-id" not in r["seen"]["headers"]
    assert r["seen"]["peer"] == env.lab.node_addr("oam", version)


@pytest.mark.parametrize("version", [4, 6])
def test_bypassed_port_from_the_cgroup_is_not_redirected(env: AgentLab, cgroup: str, version: int) -> None:
    r = http_get(env.lab.node_ns, cgroup, env.server("media", version), BYPASSED, "/bypassed")
    assert r["status"] == 200, r
    assert "x-request-id" not in r["seen"]["headers"]
    assert r["seen"]["port"] == BYPASSED


def test_agent_inside_the_cgroup_does_not_loop(env: AgentLab, cgroup: str) -> None:
    """planemesh's real configuration: the agent and its workers are in the intercepted cgroup, their
    upstream sockets carry the own mark: one request, one proxied connection, one upstream request, 200."""
    workers = procs.worker_pids(env.agent.pid)
    assert len(workers) == 2  # one per plane
    for pid in (env.agent.pid, *procs.zygotes(env.agent.pid), *workers):
        assert _in_cgroup(pid, cgroup), pid
    assert {hook: len(ids) for hook, ids in attached_programs(cgroup).items()} == {
        "sock_ops": 1,
        "connect4": 1,
        "connect6": 1,
    }

    def connections() -> int:
        return env.planes()["oam"]["counters"]["connections"]

    before = connections()
    path = f"/no-loop-{uuid.uuid4().hex[:8]}"
    r = http_get(env.lab.node_ns, cgroup, env.server("oam", 4), PROXIED, path)
    assert r["status"] == 200, r
    assert eventually(lambda: connections() > before)
    eventually(lambda: False, timeout=1.2)  # two more stats periods: a loop would keep counting
    assert connections() - before == 1
    seen = _server_log(env, "oam", path)
    assert [entry["request_id"] for entry in seen] == [r["seen"]["headers"]["x-request-id"]]


def test_reload_follows_the_host_mode_section(env: AgentLab, cgroup: str, run_prefix: str) -> None:
    """SIGHUP re-reads host_mode: a cgroup added is attached, one removed is released, a bad one changes nothing."""
    config = env.workdir / "planemesh.yaml"
    original = config.read_text()
    server = env.server("oam", 4)

    def hooks(path: str) -> dict[str, int]:
        return {hook: len(ids) for hook, ids in attached_programs(path).items()}

    def reload_with(cgroups: list[str]) -> None:
        write_config(config, cgroups)
        env.agent.send_signal(signal.SIGHUP)

    ours = {"sock_ops": 1, "connect4": 1, "connect6": 1}
    with temporary_cgroup(f"{run_prefix}-hostmore") as more:
        try:
            reload_with([os.path.basename(cgroup), more])
            assert eventually(lambda: hooks(more) == ours)
            assert "x-request-id" in http_get(env.lab.node_ns, more, server, PROXIED)["seen"]["headers"]

            reload_with([more])  # the agent's own cgroup released
            assert eventually(lambda: hooks(cgroup) == {k: 0 for k in ours})
            assert "x-request-id" not in http_get(env.lab.node_ns, cgroup, server, PROXIED)["seen"]["headers"]

            reload_with([more, "no-such-cgroup"])
            assert eventually(lambda: "host_mode.cgroups[1]" in env.agent_output())
            assert hooks(more) == ours and hooks(cgroup) == {k: 0 for k in ours}  # nothing changed
        finally:
            config.write_text(original)
            env.agent.send_signal(signal.SIGHUP)
            assert eventually(lambda: hooks(cgroup) == ours and hooks(more) == {k: 0 for k in ours})


NAIVE_PROXY = """
import asyncio, json, os, sys
from planemesh.agent.proxy.server import PlaneProxy
from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.model.static_config import default_config_text, load_default_config
from planemesh.ebpf.host_redirect import OriginalDestinations

map_fd, port, limit = (int(v) for v in sys.argv[1:4])

async def main():
    # The naive part: upstream_mark=0, so its own upstream connects look like any application's.
    proxy = PlaneProxy(load_default_config(), "oam", upstream_mark=0,
                       original_destination=OriginalDestinations(map_fd).proxy_original_destination)
    await proxy.start(make_listener_socket(port, transparent=False))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    started = None
    deadline = loop.time() + 5
    while proxy.stats.downstream_total < limit and loop.time() < deadline:
        if started is None and proxy.stats.downstream_total:
            started = loop.time()
        await asyncio.sleep(0.005)
    seconds = loop.time() - (started or loop.time())
    print(json.dumps({"connections": proxy.stats.downstream_total, "seconds": seconds}), flush=True)
    os._exit(0)  # the bound: every looping connection dies with the process

asyncio.run(main())
"""


def test_naive_proxy_in_the_cgroup_without_own_mark_loops(env: AgentLab, run_prefix: str) -> None:
    """The loop planemesh avoids: a proxy inside the intercepted cgroup whose upstream sockets are not
    exempted redirects its own upstream connect back to itself, again and again (bounded at 100)."""
    snap = load_default_config()
    # Its own plane ports (the agent under test keeps 15001/15011) and its own cgroup.
    planes = tuple(
        dataclasses.replace(p, proxy_port=p.proxy_port + 100, sniff_port=p.sniff_port + 100) for p in snap.planes
    )
    naive = dataclasses.replace(snap, planes=planes)
    limit = 100
    with temporary_cgroup(f"{run_prefix}-naive") as naive_cgroup, HostMode() as host:
        host.apply_snapshot(naive)
        host.attach(naive_cgroup)
        argv = [sys.executable, "-c", NAIVE_PROXY, str(host.peer_map_fd), str(planes[0].proxy_port), str(limit)]
        proxy = ns_tools.start_until(
            env.lab.node_ns, argv, "ready", preexec_fn=joiner(naive_cgroup), pass_fds=(host.peer_map_fd,)
        )
        try:
            path = f"/naive-loop-{uuid.uuid4().hex[:8]}"
            r = http_get(env.lab.node_ns, naive_cgroup, env.server("oam", 4), PROXIED, path, timeout=8)
            assert proxy.wait(timeout=10) == 0
        finally:
            ns_tools.stop(proxy)
        result = json.loads(eventually(lambda: next((ln for ln in proxy.output_lines if ln.startswith("{")), None)))
    # One client request became `limit` connections into the proxy, and never reached the server.
    assert result["connections"] >= limit, result
    print(f"naive loop: {result['connections']} connections from one request in {result['seconds']:.2f}s")
    assert r["status"] != 200, r
    assert _server_log(env, "oam", path) == []


def test_stopped_or_killed_agent_leaves_nothing_attached(run_prefix: str) -> None:
    """Fail open: after SIGTERM (detach at shutdown) and after SIGKILL (the BPF links die with the
    process) no program is left on the cgroup and its connects reach the server directly."""
    with (
        temporary_cgroup(f"{run_prefix}-hoststop") as cgroup,
        tempfile.TemporaryDirectory(prefix="planemesh-test-") as tmp,
        lab_with_servers(f"{run_prefix}s") as (lab, _servers),
    ):
        server = lab.pod_addr("server", "oam", 4)
        assert server is not None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            agent = start_agent_in(lab, Path(tmp), cgroup, inside=False)
            try:
                r = http_get(lab.node_ns, cgroup, server, PROXIED, "/before")
                assert r["status"] == 200 and "x-request-id" in r["seen"]["headers"], r
            finally:
                ns_tools.stop(agent, sig)
            assert attached_programs(cgroup) == NOTHING_ATTACHED, signal.Signals(sig).name
            r = http_get(lab.node_ns, cgroup, server, PROXIED, "/after")
            assert r["status"] == 200, r
            assert "x-request-id" not in r["seen"]["headers"], signal.Signals(sig).name


CLIENT_LOOP = """
import collections, http.client, json, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
statuses, with_id, end = collections.Counter(), 0, time.monotonic() + seconds
while time.monotonic() < end:
    conn = http.client.HTTPConnection(host, port, timeout=5)  # a new connect each time: redirected anew
    try:
        conn.request("GET", "/upgrade")
        resp = conn.getresponse()
        body = resp.read()
        statuses[resp.status] += 1
        with_id += resp.status == 200 and b"x-request-id" in body
    except OSError as exc:
        statuses[type(exc).__name__] += 1
    finally:
        conn.close()
    time.sleep(0.01)
print(json.dumps({"statuses": statuses, "with_id": with_id}), flush=True)
"""


def test_hot_upgrade_keeps_intercepting_without_a_failed_request(run_prefix: str) -> None:
    """With a pin directory the successor shares the host-mode maps: connects redirected by either agent's
    programs during the overlap are served, and afterwards only the successor's programs are attached."""
    pin_dir = f"/sys/fs/bpf/{run_prefix}-hostup"
    extra = ("--pin-dir", pin_dir, "--drain-timeout", "1")
    with (
        temporary_cgroup(f"{run_prefix}-hostup") as cgroup,
        tempfile.TemporaryDirectory(prefix="planemesh-test-") as tmp,
        lab_with_servers(f"{run_prefix}u") as (lab, _servers),
    ):
        first = start_agent_in(lab, Path(tmp), cgroup, inside=False, extra=extra)
        successor = None
        try:
            argv = [sys.executable, "-c", CLIENT_LOOP, str(lab.pod_addr("server", "oam", 6)), str(PROXIED), "6"]
            client = ns_tools.popen(lab.node_ns, argv, stdout=subprocess.PIPE, text=True, preexec_fn=joiner(cgroup))
            eventually(lambda: False, timeout=1)  # traffic flows through the first agent
            successor = start_agent_in(lab, Path(tmp), cgroup, inside=False, extra=extra)
            assert first.wait(20) == 0
            out, _ = client.communicate(timeout=30)
            result = json.loads(out)
            attached = attached_programs(cgroup)  # the successor's programs, and only them
            assert {hook: len(ids) for hook, ids in attached.items()} == {"sock_ops": 1, "connect4": 1, "connect6": 1}
        finally:
            for proc in (successor, first):
                if proc is not None:
                    ns_tools.stop(proc)
            for name in os.listdir(pin_dir) if os.path.isdir(pin_dir) else []:
                os.unlink(os.path.join(pin_dir, name))
            if os.path.isdir(pin_dir):
                os.rmdir(pin_dir)
    total = sum(result["statuses"].values())
    assert total > 50 and result["statuses"] == {"200": total}, result
    assert result["with_id"] == total, result  # every one of them went through a proxy
