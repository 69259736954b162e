"""Plane isolation (issue 4): plane A's latency with plane B idle vs flooded beyond its rate limit.

    ./run.sh bench plane_isolation [--seconds 5]

The lab's two planes each run their own proxy worker process, in their own CPU cgroup. Plane `media` has a
local rate limit in its SLA; wrk floods it with many connections (well past the limit: its excess must get
429s, never timeouts), while a steady wrk on plane `oam` measures p50/p99. Two SLA variants in one run, the
second applied live by SIGHUP: equal CPU weights, then oam weighted above media (sla.cpu_weight).
Target: oam p99 flooded / idle <= 1.2.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.common import WrkResult, parse_wrk, start_nginx
from planemesh.labs import netns as ns_tools
from planemesh.labs.traffic import host_port
from planemesh.model.static_config import default_config_text

FLOOD_RATE_LIMIT_RPS = 300
EQUAL_WEIGHTS = {"oam": 100, "media": 100}
SLA_WEIGHTS = {"oam": 1000, "media": 100}


def isolation_config(
    path: Path, rate_limit_rps: int = FLOOD_RATE_LIMIT_RPS, cpu_weights: dict[str, int] = EQUAL_WEIGHTS
) -> Path:
    raw = yaml.safe_load(default_config_text())
    for plane in raw["planes"]:
        plane["sla"] = {**plane.get("sla", {}), "cpu_weight": cpu_weights[plane["name"]]}
        if plane["name"] == "media":
            plane["sla"].update(rate_limit_rps=rate_limit_rps, rate_limit_burst=50)
    path.write_text(yaml.safe_dump(raw))
    return path


# The CPU-heavy flood: nginx in the server pod serves a large body on port 8080 (declared HTTP on both planes),
# so plane media's worker spends its CPU streaming bodies rather than refusing requests.
HEAVY_PORT, HEAVY_PATH, HEAVY_BYTES = 8080, "/heavy.bin", 1 << 20


@contextlib.contextmanager
def heavy_backend(env, workdir: Path) -> Iterator[None]:  # type: ignore[no-untyped-def]
    (workdir / "www").mkdir(exist_ok=True)
    (workdir / "www" / HEAVY_PATH.lstrip("/")).write_bytes(bytes(range(256)) * (HEAVY_BYTES // 256))
    nginx = start_nginx(env.lab, "server", [HEAVY_PORT], workdir)
    try:
        yield
    finally:
        ns_tools.stop(nginx)


def _wrk(env, plane: str, connections: int, seconds: int, port: int = 80, path: str = "/iso") -> subprocess.Popen:  # type: ignore[no-untyped-def]
    url = f"http://{host_port(env.server(plane, 4), port)}{path}"
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    return ns_tools.popen(env.client_ns, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _result(proc: subprocess.Popen, name: str) -> WrkResult:
    out, _ = proc.communicate(timeout=120)
    return parse_wrk(name, out)


@dataclass
class Isolation:
    idle: WrkResult
    flooded: WrkResult
    flood: WrkResult

    @property
    def p99_ratio(self) -> float:
        return self.flooded.p99_ms / self.idle.p99_ms if self.idle.p99_ms else float("inf")


def measure(  # type: ignore[no-untyped-def]
    env, seconds: int = 5, probe_connections: int = 2, flood_connections: int = 64, heavy: bool = False
) -> Isolation:
    """oam's probe with media idle, then flooded (heavy: large bodies from HEAVY_PORT, see heavy_backend)."""
    idle = _result(_wrk(env, "oam", probe_connections, seconds), "oam, media idle")
    time.sleep(0.5)
    target = (HEAVY_PORT, HEAVY_PATH) if heavy else (80, "/iso")
    flood = _wrk(env, "media", flood_connections, seconds + 2, *target)
    time.sleep(1.0)  # the flood is in full swing
    flooded = _result(_wrk(env, "oam", probe_connections, seconds), "oam, media flooded")
    return Isolation(idle, flooded, _result(flood, "media flood" + (" (1 MiB)" if heavy else "")))


def report(iso: Isolation, title: str) -> str:
    rows = [
        title,
        f"{'case':22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'timeouts':>8}",
        *(
            f"{r.name:22} {r.rps:9.0f} {r.p50_ms:8.3f} {r.p99_ms:8.3f} {r.non_2xx:8d} {r.timeouts:8d}"
            for r in (iso.idle, iso.flooded, iso.flood)
        ),
        "",
        f"oam p99 flooded / idle: {iso.p99_ratio:.2f}   (target <= 1.2)",
        f"media excess answered:  {iso.flood.non_2xx} x 429, {iso.flood.timeouts} timeouts "
        f"(rate limit {FLOOD_RATE_LIMIT_RPS}/s)",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    from tests.netns.agent_lab import running_agent

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--prefix", default="pmiso")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="planemesh-bench-") as tmp:
        config = isolation_config(Path(tmp) / "agent.yaml")
        with running_agent(args.prefix, ["--config", str(config)]) as env, heavy_backend(env, Path(tmp)):
            for weights in (EQUAL_WEIGHTS, SLA_WEIGHTS):
                if weights is not EQUAL_WEIGHTS:
                    isolation_config(config, cpu_weights=weights)
                    env.agent.send_signal(signal.SIGHUP)  # the weights change in place; workers keep running
                    time.sleep(2.0)
                for heavy in (False, True):
                    flood = "CPU-heavy flood (1 MiB bodies)" if heavy else "flood beyond the rate limit"
                    print(report(measure(env, args.seconds, heavy=heavy), f"{flood}, CPU weights {weights}"))
                    print()


if __name__ == "__main__":
    main()
