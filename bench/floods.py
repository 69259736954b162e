"""Issue-11 floods, planemesh vs Envoy 1.40 on the same inputs, one lab, one run.

    ./run.sh bench floods [--seconds 4] [--only rapid_reset,ping_flood] [--proxies planemesh,envoy]

Proxies, each behind the same TC interception (as in bench/http_proxy.py): the planemesh agent (planes oam and
media, one worker each), then Envoy 1.40 with --concurrency 1 as the single shared node proxy (the agent runs
--datapath-only; Envoy binds both planes' transparent listener ports). Every attack gets a freshly started proxy,
so one attack's leftovers never count against the next. The attacks come from labs/attacks.py, run in the client
pod against the server pod's oam address (ports: 80 nginx, 8080 nginx with a 1 MiB body, SLOW_PORT a listener
whose accept queue is full, so the proxy's connect stays pending):
  rapid_reset (2 conns), settings_flood / ping_flood / window_update_flood (1 conn, never reads),
  stream_flood (1,000 streams, initial window 0, 1 MiB responses), idle_flood (10k connections),
  h2c_upgrade_body (4 conns, Upgrade: h2c POST announcing 1 GiB, upstream connect pending).
Measured concurrently: when the proxy closed the abusive connections, the RSS peak of the attacked plane's worker
(Envoy: its process), and two steady-rate probes (a new HTTP/1.1 connection per request) on the same plane (oam)
and on the other plane (media). Markdown table to stdout, JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.common import scratch_dir, start_nginx, wait_http
from bench.http_proxy import envoy_in_node
from bench.plane_isolation_lab import HEAVY_BYTES, HEAVY_PATH, HEAVY_PORT
from planemesh.agent.demo import start_agent
from planemesh.labs import Lab, procs
from planemesh.labs import netns as ns_tools
from planemesh.labs.attacks import ATTACKS
from planemesh.labs.lab import DEFAULT_PREFIX, default_lab_path
from planemesh.labs.model import lab_from_dict
from planemesh.model.static_config import default_config_text, read_yaml_file

SLOW_PORT = 8090  # declared HTTP on both planes; its listener never accepts (blackhole_listener)
BYSTANDER = "peer"  # the well-behaved clients' pod (node-side interfaces peer-oam, peer-media)
PROBE_RATE = 25  # requests/s per probe: light on a 2-core machine, ~100 samples per attack
PROBE_TIMEOUT_S = 2.0
IDLE_PROBE_S = 2.0  # the probes alone, right before each attack: the "idle" p99 the other plane is compared to
RECOVERY_LIMIT_S = 10.0  # after an attack, how long to wait for the attacked plane to serve again
RSS_SAMPLE_S = 0.05
TARGETS = {"close_s": 2.0, "rss_mb": 150.0, "other_p99_ratio": 1.5, "same_errors": 0}
# attack -> (port, path, seconds scale): idle_flood needs time to open 10k connections before it holds them.
PLAN = {
    "rapid_reset": (80, "/", 1.0),
    "settings_flood": (80, "/", 1.0),
    "ping_flood": (80, "/", 1.0),
    "window_update_flood": (80, "/", 1.0),
    "stream_flood": (HEAVY_PORT, HEAVY_PATH, 1.0),
    "idle_flood": (80, "/", 1.5),
    "h2c_upgrade_body": (SLOW_PORT, "/upload", 1.0),
}
assert set(PLAN) == set(ATTACKS)


def flood_config(path: Path) -> Path:
    """The default agent config plus SLOW_PORT declared HTTP on both planes."""
    raw = yaml.safe_load(default_config_text())
    raw["listeners"] += [{"plane": p["name"], "port": SLOW_PORT, "protocol": "http"} for p in raw["planes"]]
    path.write_text(yaml.safe_dump(raw))
    return path


def proxy_ports() -> dict[str, int]:
    raw = yaml.safe_load(default_config_text())
    return {p["name"]: p["proxy_port"] for p in raw["planes"]}


def blackhole_listener(ns: str, fill_from: str, port: int) -> list[socket.socket]:
    """A listener in `ns` that never accepts, its accept queue already full: the kernel drops further SYNs, so a
    proxy's upstream connect to it stays pending until the proxy's connect timeout. Keep the sockets open."""

    def make() -> list[socket.socket]:
        listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("::", port))
        listener.listen(0)
        first = socket.create_connection((fill_from, port), timeout=2)  # now the queue (backlog 0) is full
        second = socket.socket(socket.AF_INET6 if ":" in fill_from else socket.AF_INET, socket.SOCK_STREAM)
        second.setblocking(False)
        second.connect_ex((fill_from, port))  # its SYN is dropped: stays pending
        try:
            socket.create_connection((fill_from, port), timeout=0.5).close()
        except OSError:
            return [listener, first, second]
        raise RuntimeError(f"port {port}: a connect to the blackhole listener completed")

    return ns_tools.call_in(ns, make)


# ---- measurements that run beside an attack ------------------------------------------------------------------
@dataclass
class ProbeResult:
    plane: str
    latency_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return len(self.latency_ms) + self.errors

    @property
    def p99_ms(self) -> float | None:
        if len(self.latency_ms) < 2:
            return self.latency_ms[0] if self.latency_ms else None
        return statistics.quantiles(self.latency_ms, n=100, method="inclusive")[98]

    def summary(self) -> dict[str, Any]:
        p99 = self.p99_ms
        return {"plane": self.plane, "requests": self.requests, "errors": self.errors,
                "error_kinds": self.error_kinds, "p99_ms": round(p99, 3) if p99 is not None else None}  # fmt: skip


class Probe(threading.Thread):
    """A well-behaved client in `ns`: GET over a new connection PROBE_RATE times a second, each latency counted
    from its scheduled start (a late request is not hidden); errors: no answer within PROBE_TIMEOUT_S, a socket
    error, or a status other than 200."""

    def __init__(self, ns: str, plane: str, host: str, port: int) -> None:
        super().__init__(daemon=True, name=f"probe-{plane}")
        self.ns, self.host, self.port = ns, host, port
        self.result = ProbeResult(plane)
        self.stop = threading.Event()

    def run(self) -> None:
        from pyroute2 import netns

        netns.setns(self.ns)
        start, n = time.monotonic(), 0
        while not self.stop.is_set():
            scheduled = start + n / PROBE_RATE
            n += 1
            if (delay := scheduled - time.monotonic()) > 0:
                time.sleep(delay)
            try:
                status = get_status(self.host, self.port, PROBE_TIMEOUT_S)
            except OSError as exc:
                status = type(exc).__name__
            if status == "200":
                self.result.latency_ms.append((time.monotonic() - scheduled) * 1000)
            else:
                self.result.errors += 1
                self.result.error_kinds[status] = self.result.error_kinds.get(status, 0) + 1

    def finish(self) -> ProbeResult:
        self.stop.set()
        self.join(PROBE_TIMEOUT_S * 3)
        return self.result


def get_status(host: str, port: int, timeout: float) -> str:
    """GET / over a new connection; the status code, or "no answer" when the connection closed without one."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.") else "no answer"


class RssWatch(threading.Thread):
    """VmRSS of one process every RSS_SAMPLE_S; `peak_mb`, and whether the process went away meanwhile."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name=f"rss-{pid}")
        self.pid, self.peak_mb, self.gone = pid, 0.0, False
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            mb = rss_mb(self.pid)
            if mb is None:
                self.gone = True
                return
            self.peak_mb = max(self.peak_mb, mb)
            time.sleep(RSS_SAMPLE_S)

    def finish(self) -> float:
        self.stop.set()
        self.join(2)
        return round(self.peak_mb, 1)


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def worker_pid(agent_pid: int, plane: str) -> int | None:
    """The agent's proxy worker process for `plane`, exec'd or forked by its zygote (labs/procs.py)."""
    pids = procs.worker_pids(agent_pid, plane)
    return pids[0] if pids else None


# ---- one attack against one proxy -------------------------------------------------------------------------------
@dataclass
class Proxy:
    """A started proxy: the process whose RSS counts and a liveness check for what hosts it."""

    name: str
    pid: int
    alive: Any  # () -> bool
    after_pid: Any  # () -> int | None: the watched process after the attack (a restarted worker has a new pid)


def run_attack(lab: Lab, proxy: Proxy, kind: str, seconds: float) -> dict[str, Any]:
    port, path, scale = PLAN[kind]
    client, target = lab.pod_ns("client"), lab.pod_addr("server", "oam", 4) or ""
    probes = probes_for(lab)
    rss_before = rss_mb(proxy.pid)
    watch = RssWatch(proxy.pid)
    for thread in (watch, *probes):
        thread.start()
    time.sleep(0.5)
    argv = [sys.executable, "-m", "planemesh.labs.attacks", kind, "--host", target, "--port", str(port),
            "--path", path, "--seconds", str(seconds * scale)]  # fmt: skip
    done = ns_tools.run(client, argv, timeout=seconds * scale + 60, check=False)
    ended = time.monotonic()
    time.sleep(0.5)  # what the proxy does right after the attack stops still counts
    same, other = (p.finish() for p in probes)
    recovered = ns_tools.call_in(client, recovery_s, target, ended)
    peak = watch.finish()  # the peak until the plane serves again: a backlog can keep growing after the attack
    try:
        outcome = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        outcome = {"kind": kind, "error": (done.stderr or done.stdout)[-500:]}
    return {
        "attack": kind, "proxy": proxy.name, "outcome": outcome,
        "rss_before_mb": round(rss_before or 0, 1), "rss_peak_mb": peak, "rss_after_mb": rss_mb(proxy.pid),
        "watched_process_exited": watch.gone, "restarted": proxy.after_pid() not in (None, proxy.pid),
        "host_alive": proxy.alive(), "same_plane": same.summary(), "other_plane": other.summary(),
        "recovered_s": recovered,
    }  # fmt: skip


def recovery_s(host: str, since: float) -> float | None:
    """Seconds from `since` (the attack's end) until `host`:80 answers 200 through the attacked plane again;
    None when it does not within RECOVERY_LIMIT_S. Call it inside the client pod."""
    while time.monotonic() - since < RECOVERY_LIMIT_S:
        with contextlib.suppress(OSError):
            if get_status(host, 80, 1.0) == "200":
                return round(time.monotonic() - since, 2)
        time.sleep(0.2)
    return None


def probes_for(lab: Lab) -> list[Probe]:
    """Same plane (oam, attacked) first, then the other plane (media); both to nginx on port 80, from the
    bystander pod: another pod than the attacker's, as a well-behaved neighbour is (the attacker's own pod may
    be refused by its per-source share: that is the defence, not a failure)."""
    return [
        Probe(lab.pod_ns(BYSTANDER), plane, lab.pod_addr("server", plane, 4) or "", 80) for plane in ("oam", "media")
    ]


def flood_lab(prefix: str | None) -> Lab:
    """The default lab plus a bystander pod on both planes, where the probes run."""
    raw = read_yaml_file(default_lab_path())
    raw["pods"].append({"name": BYSTANDER, "planes": ["oam", "media"]})
    return Lab(lab_from_dict(raw), prefix or os.environ.get("PM_LAB_PREFIX") or DEFAULT_PREFIX)


def idle_probe(lab: Lab, seconds: float) -> dict[str, dict[str, Any]]:
    probes = probes_for(lab)
    for p in probes:
        p.start()
    time.sleep(seconds)
    return {p.result.plane: p.finish().summary() for p in probes}


def wait_both_planes(lab: Lab, header: str | None) -> None:
    for pod in ("client", BYSTANDER):
        for plane in ("oam", "media"):
            wait_http(lab.pod_ns(pod), lab.pod_addr("server", plane, 4) or "", 80, response_header=header)


@contextlib.contextmanager
def planemesh(lab: Lab, work: Path, config: Path) -> Iterator[Proxy]:
    agent = start_agent(lab, work, ["--config", str(config)])
    try:
        wait_both_planes(lab, None)
        pid = worker_pid(agent.pid, "oam")
        if pid is None:
            raise RuntimeError("no oam worker process under the agent")
        yield Proxy("planemesh", pid, lambda: agent.poll() is None, lambda: worker_pid(agent.pid, "oam"))
    finally:
        workers = [w for w in (worker_pid(agent.pid, p) for p in ("oam", "media")) if w is not None]
        ns_tools.stop(agent)
        reap(workers)


def reap(pids: list[int], grace_s: float = 10.0) -> None:
    """Wait for this run's worker processes to exit after their agent stopped (a worker an attack left stuck
    still holds the plane's listening port), SIGKILL after `grace_s`."""
    deadline = time.monotonic() + grace_s
    while (pids := [p for p in pids if os.path.exists(f"/proc/{p}")]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            print(f"  worker {pid} still alive {grace_s:.0f} s after its agent stopped: killed", file=sys.stderr)
    while any(os.path.exists(f"/proc/{p}/stat") and _state(p) != "Z" for p in pids):
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@contextlib.contextmanager
def envoy(lab: Lab, work: Path) -> Iterator[Proxy]:
    with envoy_in_node(lab, work, proxy_ports()) as proc:
        wait_both_planes(lab, "x-envoy-upstream-service-time")  # proof Envoy, not the fall-open path, answers
        yield Proxy("envoy", proc.pid, lambda: proc.poll() is None, lambda: proc.pid if proc.poll() is None else None)


def run_proxy(lab: Lab, name: str, work: Path, config: Path, attacks: list[str], seconds: float) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    datapath = None
    if name == "envoy":  # the interception stays; only Envoy is restarted per attack
        (work / "datapath").mkdir()
        datapath = start_agent(lab, work / "datapath", ["--datapath-only", "--config", str(config)])
    try:
        for i, kind in enumerate(attacks):
            run_dir = work / f"{name}-{i}"
            run_dir.mkdir()
            print(f"  {name:9} {kind:20} ...", file=sys.stderr, flush=True)
            try:
                with planemesh(lab, run_dir, config) if name == "planemesh" else envoy(lab, run_dir) as proxy:
                    idle = idle_probe(lab, IDLE_PROBE_S)  # just before the attack: the machine's load drifts
                    rows.append({**run_attack(lab, proxy, kind, seconds), "idle": idle})
            except RuntimeError as exc:  # a proxy that does not come up (again) is a result, not the end of the run
                rows.append({"attack": kind, "proxy": name, "error": str(exc)[-300:]})
    finally:
        if datapath is not None:
            ns_tools.stop(datapath)
    return {"rows": rows}


# ---- report -----------------------------------------------------------------------------------------------------
def sent_text(o: dict[str, Any]) -> str:
    if "error" in o:
        return f"error: {o['error'][:60]}"
    if o["kind"] == "idle_flood":
        return f"{o['connections']} conns held"
    if o["kind"] == "h2c_upgrade_body":
        return f"{o['bytes_sent'] / (1 << 20):.0f} MiB body"
    return f"{o['frames_sent']:,} frames"


def closed_text(o: dict[str, Any], limit: float) -> tuple[str, bool]:
    n, closed = o.get("connections", 0), o.get("closed_after_s", [])
    if not n:
        return "-", False
    if len(closed) == n:
        return f"{max(closed):.2f} s", max(closed) <= limit
    return (f"not closed in {o['seconds']:.0f} s" + (f" ({len(closed)}/{n})" if closed else "")), False


def said_text(o: dict[str, Any]) -> str:
    parts = [f"GOAWAY {k}" for k in o.get("goaway", {})]
    parts += [f"{v} RST {k}" for k, v in o.get("rst_received", {}).items()]
    parts += [f"{v}x {k}" for k, v in o.get("responses", {}).items() if k != "headers"]
    parts += [f"{k} {v}" for k, v in o.get("close_how", {}).items()]
    return ", ".join(parts) or "-"


def report(results: dict[str, dict[str, Any]], seconds: float) -> str:
    t = TARGETS
    lines = [
        f"Floods, {seconds:g} s each (idle_flood {seconds * PLAN['idle_flood'][2]:g} s); attacked plane oam. Targets: "
        f"closed <= {t['close_s']:g} s, RSS peak < {t['rss_mb']:g} MB, other plane p99 <= {t['other_p99_ratio']}x "
        f"idle, same plane {t['same_errors']} errors.",
        "",
        "| attack | proxy | sent | closed after | proxy said | RSS MB before / peak | same plane errors / req"
        " | same p99 ms | other p99 ms (x idle) | oam serves again | targets met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        for row in res["rows"]:
            if "error" in row:
                lines.append(f"| {row['attack']} | {name} | proxy did not start: {row['error'][:80]!r} |||||||||")
                continue
            o, idle_other = row["outcome"], row["idle"]["media"]["p99_ms"]
            closed, close_ok = closed_text(o, t["close_s"])
            same, other = row["same_plane"], row["other_plane"]
            ratio = other["p99_ms"] / idle_other if other["p99_ms"] and idle_other else None
            met = {
                "close": close_ok,
                "rss": row["rss_peak_mb"] < t["rss_mb"],
                "other": ratio is not None and ratio <= t["other_p99_ratio"] and other["errors"] == 0,
                "same": same["errors"] <= t["same_errors"],
            }
            fate = "" if not row["restarted"] else " (worker restarted)"
            fate = fate if row["host_alive"] else " (DIED)"
            lines.append(
                f"| {row['attack']} | {name}{fate} | {sent_text(o)} | {closed} | {said_text(o)} | "
                f"{row['rss_before_mb']:.0f} / {row['rss_peak_mb']:.0f} | {same['errors']} / {same['requests']} | "
                f"{_ms(same['p99_ms'])} | {_ms(other['p99_ms'])} ({f'{ratio:.1f}x' if ratio else '-'}"
                f"{', ' + str(other['errors']) + ' err' if other['errors'] else ''}) | {_recovered(row)} | "
                f"{' '.join(k for k, ok in met.items() if ok) or 'none'} |"
            )
    lines.append("")
    for name, res in results.items():
        idles = [row["idle"][plane]["p99_ms"] for row in res["rows"] if "idle" in row for plane in ("oam", "media")]
        if idles := [v for v in idles if v is not None]:
            lines.append(f"idle p99 before each attack ({name}): {min(idles):.1f} .. {max(idles):.1f} ms")
    return "\n".join(lines)


def _recovered(row: dict[str, Any]) -> str:
    r = row.get("recovered_s")
    return f"> {RECOVERY_LIMIT_S:.0f} s" if r is None else f"{r:.1f} s"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="each attack's duration (idle_flood: 1.5x)")
    parser.add_argument("--only", default=",".join(ATTACKS), help="comma-separated attacks")
    parser.add_argument("--proxies", default="planemesh,envoy")
    parser.add_argument("--prefix", default="pmflood")
    args = parser.parse_args(argv)
    attacks = [a for a in args.only.split(",") if a]
    proxies = [p for p in args.proxies.split(",") if p]
    if unknown := [a for a in attacks if a not in PLAN] + [p for p in proxies if p not in ("planemesh", "envoy")]:
        parser.error(f"unknown: {', '.join(unknown)}; attacks: {', '.join(ATTACKS)}; proxies: planemesh, envoy")
    started = time.monotonic()
    lab = flood_lab(args.prefix)
    results: dict[str, dict[str, Any]] = {}
    with scratch_dir() as tmp, lab:
        work = Path(tmp)
        (work / "www").mkdir()
        (work / "www" / HEAVY_PATH.lstrip("/")).write_bytes(bytes(range(256)) * (HEAVY_BYTES // 256))
        nginx = start_nginx(lab, "server", [80, HEAVY_PORT], work)
        holes = blackhole_listener(lab.pod_ns("server"), lab.pod_addr("server", "oam", 4) or "", SLOW_PORT)
        config = flood_config(work / "agent.yaml")
        try:
            for name in proxies:
                (work / name).mkdir()
                results[name] = run_proxy(lab, name, work / name, config, attacks, args.seconds)
        finally:
            for sock in holes:
                sock.close()
            ns_tools.stop(nginx)
    print(report(results, args.seconds))
    out = Path(__file__).with_name("results")
    out.mkdir(exist_ok=True)
    path = out / f"floods-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps({"seconds": args.seconds, "targets": TARGETS, "results": results}, indent=1))
    print(f"\n{path} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
