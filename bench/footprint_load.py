"""bench/footprint.py under load: CPU seconds per 10k proxied requests and RSS after load, planemesh vs Envoy 1.40.

One lab, nginx (one worker) on port 80 of the server pod, the oam plane's HTTP listener; each proxy in turn:
  planemesh -- the agent with one worker (the footprint bench's one-plane config);
  envoy     -- Envoy 1.40 --concurrency 1 behind the same interception (the agent runs --datapath-only), as
               bench/http_proxy.py does.
For each, `wrk -t1 -cN` (HTTP/1.1) then `h2load -t1 -cC -mM` (h2c, prior knowledge) run `seconds` each from the
client pod. CPU = user + sys (/proc/PID/stat utime + stime, all threads) of the proxy's worker processes
(planemesh: the plane's worker; Envoy: its one process) read before and after each run, divided by the requests
the load tool completed; the proxy's own request counter is printed beside it (proof it was in the path). The
planemesh agent's CPU in the same window is printed too (it is not in the worker figure). RSS (VmRSS) of each
process at start and after both runs. Figures are machine-independent ratios only in the sense of being per
request: on a busy shared VM both proxies are measured in the same run, back to back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import start_nginx, url, wrk
from bench.http_proxy import envoy_in_node, envoy_requests, lab_plane_port, planemesh_requests, wait_http_ok
from bench.sniff import parse_h2load
from planemesh.agent.demo import start_agent
from planemesh.labs import Lab
from planemesh.labs import netns as ns_tools

CLK_TCK = os.sysconf("SC_CLK_TCK")
PORT = 80  # the oam plane's declared HTTP port in the default config


@dataclass
class LoadRun:
    proxy: str
    protocol: str
    rps: float
    requests: int  # completed by the load tool (2xx/3xx for wrk, succeeded for h2load)
    counted: int  # requests the proxy itself counted in the same window
    cpu_s: float  # user + sys of the proxy's worker processes
    agent_cpu_s: float | None = None  # planemesh: the agent process in the same window

    @property
    def cpu_per_10k(self) -> float:
        return self.cpu_s / self.requests * 10_000 if self.requests else float("nan")


@dataclass
class LoadResult:
    runs: list[LoadRun] = field(default_factory=list)
    rss_kb: dict[str, tuple[int, int]] = field(default_factory=dict)  # process -> (at start, after the load)


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # comm may hold spaces: fields after ')' are fixed
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
    return total / CLK_TCK


def h1(lab: Lab, connections: int, seconds: int) -> tuple[float, int]:
    r = wrk(lab.pod_ns("client"), "h1", url(lab, "oam", 4, PORT), connections=connections, seconds=seconds)
    return r.rps, r.requests - r.non_2xx


def h2(lab: Lab, clients: int, streams: int, seconds: int) -> tuple[float, int]:
    # No --warm-up-time: the CPU window must hold exactly the requests counted.
    argv = ["h2load", "-t1", f"-c{clients}", f"-m{streams}", f"-D{seconds}", url(lab, "oam", 4, PORT)]
    r = parse_h2load("h2", ns_tools.run(lab.pod_ns("client"), argv, timeout=seconds + 60).stdout)
    return r.rps, r.succeeded


def drive(
    lab: Lab, proxy: str, workers: Callable[[], list[int]], counter: Callable[[], int], agent_pid: int | None,
    opts: dict[str, int],
) -> list[LoadRun]:  # fmt: skip
    loads = (
        ("HTTP/1.1", lambda: h1(lab, opts["connections"], opts["seconds"])),
        ("h2", lambda: h2(lab, opts["h2_clients"], opts["h2_streams"], opts["seconds"])),
    )
    runs = []
    for protocol, load in loads:
        pids = workers()
        counted_before, cpu_before = counter(), cpu_seconds(pids)
        agent_before = cpu_seconds([agent_pid]) if agent_pid else 0.0
        rps, requests = load()
        cpu = cpu_seconds(pids) - cpu_before
        agent_cpu = cpu_seconds([agent_pid]) - agent_before if agent_pid else None
        runs.append(LoadRun(proxy, protocol, rps, requests, counter() - counted_before, cpu, agent_cpu))
    return runs


@contextlib.contextmanager
def nginx(lab: Lab, work: Path) -> Iterator[None]:
    proc = start_nginx(lab, "server", [PORT], work)
    try:
        yield
    finally:
        ns_tools.stop(proc)


def under_load(lab: Lab, work: Path, config: Path, pin_dir: str, opts: dict[str, int], envoy: bool,
               rss_kb: Callable[[int], int], children: Callable[[int], list[int]]) -> LoadResult:  # fmt: skip
    """Both proxies in turn, in the same lab (the footprint bench's helpers read RSS and child pids)."""
    result = LoadResult()
    server = lab.pod_addr("server", "oam", 4) or ""
    with nginx(lab, work):
        (work / "load-pm").mkdir(exist_ok=True)
        agent = start_agent(lab, work / "load-pm", ["--config", str(config), "--pin-dir", pin_dir])
        try:
            wait_http_ok(lab, server, PORT)  # nginx echoes nothing: the `counted` column proves the path
            workers = children(agent.pid)
            start = {"planemesh agent": rss_kb(agent.pid), "planemesh worker": sum(map(rss_kb, workers))}
            result.runs += drive(lab, "planemesh", lambda: children(agent.pid),
                                 lambda: planemesh_requests(work / "load-pm"), agent.pid, opts)  # fmt: skip
            after = {"planemesh agent": rss_kb(agent.pid), "planemesh worker": sum(map(rss_kb, children(agent.pid)))}
            result.rss_kb.update({k: (start[k], after[k]) for k in start})
        finally:
            ns_tools.stop(agent)
        if not envoy:
            return result
        (work / "load-envoy").mkdir(exist_ok=True)
        datapath_only = ["--config", str(config), "--pin-dir", pin_dir, "--datapath-only"]
        agent = start_agent(lab, work / "load-envoy", datapath_only)
        try:
            with envoy_in_node(lab, work, lab_plane_port(lab)) as proc:
                wait_http_ok(lab, server, PORT, header="x-envoy-upstream-service-time")
                start_kb = rss_kb(proc.pid)
                result.runs += drive(lab, "envoy 1.40", lambda: [proc.pid], lambda: envoy_requests(lab), None, opts)
                result.rss_kb["envoy 1.40 (concurrency 1)"] = (start_kb, rss_kb(proc.pid))
        finally:
            ns_tools.stop(agent)
    return result


def report(result: LoadResult, opts: dict[str, int]) -> list[str]:
    s = opts["seconds"]
    lines = [
        f"under load: wrk -t1 -c{opts['connections']} and h2load -t1 -c{opts['h2_clients']} -m{opts['h2_streams']}"
        f", {s} s each, nginx 1 worker; CPU = user+sys of the proxy's workers (/proc/PID/stat)",
        f"{'proxy':12} {'protocol':9} {'req/s':>8} {'requests':>9} {'counted':>9} {'CPU s':>7} {'CPU s/10k':>10}"
        f" {'agent CPU s':>12}",
    ]
    for r in result.runs:
        agent = "-" if r.agent_cpu_s is None else f"{r.agent_cpu_s:.2f}"
        lines.append(f"{r.proxy:12} {r.protocol:9} {r.rps:8.0f} {r.requests:9d} {r.counted:9d} {r.cpu_s:7.2f} "
                     f"{r.cpu_per_10k:10.3f} {agent:>12}")  # fmt: skip
    lines.append(f"{'RSS MB':28} {'start':>8} {f'after {2 * s} s load':>18}")
    for name, (start, after) in result.rss_kb.items():
        lines.append(f"{name:28} {start / 1024:8.1f} {after / 1024:18.1f}")
    return lines
