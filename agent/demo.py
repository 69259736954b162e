"""`planemesh demo`: the default lab, the agent on its embedded config, real traffic, a short table.

HTTP (port 80, declared) from the client pod to the server pod goes through the plane's proxy;
plain TCP (port 9000) bypasses it in the kernel. Both planes, IPv4 and IPv6. Everything is torn down
at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planemesh import module_argv
from planemesh.labs import Lab, load_lab
from planemesh.labs import netns as ns_tools
from planemesh.labs.traffic import host_port, http_requests, tcp_echo, wait_for_port
from planemesh.model.defaults import option

HTTP_PORT, TCP_PORT, UNDECLARED_TCP_PORT = 80, 9000, 9001
BYPASS_HTTP_PORT = 9080  # HTTP on an undeclared port: bypassed in the kernel (load tests)
PLANES = ("oam", "media")


@dataclass
class Row:
    plane: str
    family: str
    http_ok: int
    http_total: int
    request_id_seen: bool
    curl_ok: bool
    p50_ms: float
    tcp_ok: bool
    tcp_peer_is_client: bool


def start_servers(lab: Lab) -> list[subprocess.Popen]:
    server_ns = lab.pod_ns("server")
    return [
        ns_tools.start_until(
            server_ns,
            module_argv("planemesh.labs.servers", "http", "--port", str(HTTP_PORT), "--port", str(BYPASS_HTTP_PORT)),
            "ready",
        ),
        ns_tools.start_until(
            server_ns,
            module_argv("planemesh.labs.servers", "tcp", "--port", str(TCP_PORT), "--port", str(UNDECLARED_TCP_PORT)),
            "ready",
        ),
    ]


def default_xds_resources() -> Path:
    """The demo's Envoy resources, served by the agent's embedded xDS server."""
    return Path(__file__).with_name("default-xds")


def start_agent(
    lab: Lab, workdir: Path, extra: Sequence[str] | None = None, env: dict[str, str] | None = None, **popen: Any
) -> subprocess.Popen:
    """The agent in the lab's node namespace, admin socket and access log in `workdir`; `popen`: more
    subprocess options (e.g. preexec_fn to start it in a cgroup)."""
    argv = [
        *module_argv("planemesh.agent.cli", "agent"),
        "--netns", lab.node_ns,
        "--admin", f"unix://{workdir / 'admin.sock'}",
        "--access-log", str(workdir / "access.log"),
        *(extra or []),
    ]  # fmt: skip
    return ns_tools.start_until(None, argv, "planemesh agent ready", timeout=60, env=env, **popen)


def drive(lab: Lab, requests: int = 50) -> list[Row]:
    client_ns = lab.pod_ns("client")
    rows = []
    for plane in PLANES:
        for version in (4, 6):
            dst = lab.pod_addr("server", plane, version)
            me = lab.pod_addr("client", plane, version)
            wait_for_port(client_ns, dst, TCP_PORT)
            http = http_requests(client_ns, dst, HTTP_PORT, ["/demo"] * requests)
            ok = sum(1 for s in http.status if s == 200)
            rid = all("x-request-id" in http.seen(i)["headers"] for i in range(len(http.bodies)))
            curl = ns_tools.run(
                client_ns,
                ["curl", "-sS", "--max-time", "5", f"http://{host_port(dst, HTTP_PORT)}/curl"],
                check=False,
            )
            curl_ok = curl.returncode == 0 and "x-request-id" in json.loads(curl.stdout or "{}").get("headers", {})
            tcp = tcp_echo(client_ns, dst, TCP_PORT, size=256 * 1024)
            rows.append(
                Row(
                    plane,
                    f"IPv{version}",
                    ok,
                    requests,
                    rid,
                    curl_ok,
                    http.p50_ms,
                    tcp.echoed_ok,
                    tcp.peer_seen_by_server == me,
                )
            )
    return rows


def render(rows: list[Row], agent_planes: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"{'plane':6} {'family':6} {'HTTP via proxy':>15} {'x-request-id':>12} {'curl':>5} {'p50 ms':>7} "
        f"{'TCP bypass':>10} {'server saw client':>17}",
    ]
    for r in rows:
        lines.append(
            f"{r.plane:6} {r.family:6} {f'{r.http_ok}/{r.http_total}':>15} {'yes' if r.request_id_seen else 'NO':>12} "
            f"{'ok' if r.curl_ok else 'FAIL':>5} {r.p50_ms:7.2f} {'ok' if r.tcp_ok else 'FAIL':>10} "
            f"{'yes' if r.tcp_peer_is_client else 'NO':>17}"
        )
    if agent_planes:
        lines.append("")
        lines.append("agent side (admin /planes): proxy counters and BPF per-CPU counters")
        lines.append(
            f"{'plane':6} {'proxied requests':>16} {'listener':>8} {'conns to proxy':>14} "
            f"{'bypassed pkts':>13} {'proxied pkts':>12}"
        )
        for name, view in agent_planes.items():
            lines.append(
                f"{name:6} {view['requests']:>16} {view['listener']:>8} {view['new_proxied']:>14} "
                f"{view['bypassed_packets']:>13} {view['proxied_packets']:>12}"
            )
    return "\n".join(lines)


def agent_plane_summary(sock: Path) -> dict[str, dict[str, Any]]:
    from planemesh.agent.admin_client import AdminClient, AdminUnreachable

    try:
        _, planes = AdminClient(f"unix://{sock}").get_json("/planes")
    except AdminUnreachable:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for view in planes.get("planes", []):
        counters = view.get("counters", {})
        bpf = counters.get("bpf_packets", {})
        out[view["name"]] = {
            "requests": counters.get("http_requests", 0),
            "listener": view.get("proxy_port", "-"),
            "new_proxied": bpf.get("listener", 0),
            "bypassed_packets": bpf.get("bypass", 0),
            "proxied_packets": bpf.get("proxy", 0),
        }
    return out


def xds_summary(sock: Path) -> str:
    from planemesh.agent.admin_client import AdminClient, AdminUnreachable

    try:
        _, stats = AdminClient(f"unix://{sock}").get_json("/stats?format=json")
    except AdminUnreachable:
        return "-"
    rows = stats.get("xds", [])
    return ", ".join(f"{r['type_url'].rsplit('.', 1)[-1]} v{r['version']} ({r['acks']} ACK)" for r in rows) or "-"


def run_demo(prefix: str, requests: int) -> int:
    lab = load_lab(prefix=prefix)
    print(f"planemesh demo: building lab {lab.spec.name!r} (namespaces {lab.ns_prefix}*)", flush=True)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="planemesh-demo-") as tmp, lab:
        workdir = Path(tmp)
        try:
            procs += start_servers(lab)
            print(
                "planemesh demo: starting the agent in the node namespace, configured over xDS by its embedded"
                f" management server from {default_xds_resources()}",
                flush=True,
            )
            agent = start_agent(lab, workdir, ["--xds-resources", str(default_xds_resources())])
            procs.append(agent)
            started = time.perf_counter()
            rows = drive(lab, requests)
            elapsed = time.perf_counter() - started
            time.sleep(1.2)  # workers report stats every 0.5 s and flush access logs every second
            summary = agent_plane_summary(workdir / "admin.sock")
            print()
            print(render(rows, summary))
            log_lines = (workdir / "access.log").read_text().splitlines() if (workdir / "access.log").exists() else []
            print(f"\naccess log: {len(log_lines)} lines, e.g.\n  {log_lines[-1] if log_lines else '-'}")
            p50 = statistics.median(r.p50_ms for r in rows)
            print(
                f"traffic took {elapsed:.1f}s; median per-request p50 {p50:.2f} ms; "
                "interception by eBPF only, no netfilter rules"
            )
            ok = all(
                r.http_ok == r.http_total and r.request_id_seen and r.tcp_ok and r.tcp_peer_is_client for r in rows
            )
            print(f"xDS: {xds_summary(workdir / 'admin.sock')}")
            print("RESULT:", "PASS" if ok else "FAIL")
            return 0 if ok else 1
        finally:
            for proc in reversed(procs):
                ns_tools.stop(proc)
            print("planemesh demo: agent stopped, lab torn down", flush=True)


def _cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(args.prefix, args.requests)


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the default lab with the agent and real traffic, print a table")
    p.add_argument("--prefix", **option("demo", "--prefix"))
    p.add_argument("--requests", type=int, **option("demo", "--requests"))
    p.set_defaults(func=_cmd_demo)
