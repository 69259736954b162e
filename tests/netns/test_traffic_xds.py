"""Every traffic-management feature with real traffic in a lab, each configuration pushed through the management
server and ACKed by the agent before the first request.

One lab, one agent and one management server (in this process, on its own event loop) serve the whole module.
Versions of a service are lab servers on ports of the server pod, each answering with its name (v1..v4,
shadow). Every test pushes a complete resource set (listener, routes, clusters, endpoints), so the agent builds
a fresh snapshot: balancer cursors, breakers, ejections and rate limit buckets start anew.
"""

from __future__ import annotations

import itertools
import re
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from planemesh.labs import load_lab
from planemesh.labs import netns as ns_tools
from planemesh.labs.envoy_resources import (
    by_type,
    eds_cluster,
    fault,
    header_exact,
    http_listener,
    load_assignment,
    local_ratelimit,
    locality,
    route,
    route_config,
)
from planemesh.labs.traffic import HttpResult, http_requests, http_requests_until
from planemesh.model.static_config import default_config_text
from planemesh.xds.resources import SHORT_NAME, TYPE_ORDER
from planemesh.xds.server import ManagementServer
from tests.netns.agent_lab import AgentLab, eventually, running_agent
from tests.xds.xds_harness import LoopThread

pytestmark = pytest.mark.netns

PORTS = {"v1": 8081, "v2": 8082, "v3": 8083, "v4": 8084, "shadow": 8090}
SERVICES = ("v1", "v2", "shadow")  # one cluster each; "pool" holds whatever endpoints a test gives it


class XdsPusher:
    """The management server in this process: push() replaces every resource type (clusters and endpoints
    first, then listeners and routes) and returns once the agent ACKed each changed type."""

    def __init__(self, loop: LoopThread, sock: Path) -> None:
        self.loop = loop
        self.server = ManagementServer(None)
        self.address = loop.run(self.server.start(f"unix://{sock}"))

    def write_bootstrap(self, path: Path, node: dict[str, Any]) -> Path:
        """An agent bootstrap for this server: the default planes, quick reconnects."""
        path.write_text(yaml.safe_dump({
            "node": node, "server": {"address": self.address},
            "timing": {"backoff_base_s": 0.1, "backoff_max_s": 0.5},
            "planes": yaml.safe_load(default_config_text())["planes"],
        }))  # fmt: skip
        return path

    def _in_loop(self, fn, *args) -> Any:
        async def call() -> Any:
            return fn(*args)

        return self.loop.run(call())

    def push(self, docs: list[dict], *, wait: bool = True, timeout: float = 10.0) -> None:
        typed = by_type(docs)
        nacks = self._in_loop(self._nacks)
        changed = [t for t in TYPE_ORDER if t in SHORT_NAME and t != TYPE_ORDER[-1]
                   and self._in_loop(self.server.set_resources, t, typed.get(t, []))]  # fmt: skip
        if not wait:
            return
        deadline = time.monotonic() + timeout
        while not self._in_loop(self._acked, changed, nacks):
            assert time.monotonic() < deadline, f"the agent did not ACK {[SHORT_NAME[t] for t in changed]}"
            time.sleep(0.005)

    def _client(self):
        live = [c for c in self.server.clients() if c.connected]
        return live[-1] if live else None

    def _nacks(self) -> dict[str, int]:
        client = self._client()
        return {name: r.nacks for name, r in client.types.items()} if client else {}

    def _acked(self, changed: list[str], nacks_before: dict[str, int]) -> bool:
        client = self._client()
        if client is None:
            return False
        for type_url in changed:
            report = client.types.get(SHORT_NAME[type_url])
            if report is None:
                return False
            if report.nacks > nacks_before.get(SHORT_NAME[type_url], 0):
                raise AssertionError(f"the agent NACKed {SHORT_NAME[type_url]}: {report.last_nack}")
            if report.acked_version != str(self.server.type_versions[type_url]):
                return False
        return True


@dataclass
class Mesh:
    env: AgentLab
    xds: XdsPusher
    host: str  # the server pod's oam IPv4 address: the service address clients call, and the endpoints' host
    http2: bool = False  # the client speaks h2c (prior knowledge); set per test by the `http` fixture

    @property
    def proto(self) -> str:
        """The protocol as the access log writes it."""
        return "HTTP/2" if self.http2 else "HTTP/1.1"

    def ep(self, name: str) -> tuple[str, int]:
        return self.host, PORTS[name]

    def push(self, routes: list[dict], *, filters: tuple[dict, ...] = (), pool: list[dict] | None = None,
             pool_lb: str = "ROUND_ROBIN", **pool_fields: Any) -> None:  # fmt: skip
        """Listener (with `filters`), one virtual host of `routes`, clusters v1/v2/shadow and "pool"."""
        pool = pool if pool is not None else [locality([self.ep("v1"), self.ep("v2")])]
        docs = [http_listener(filters=filters), route_config(routes), eds_cluster("pool", pool_lb, **pool_fields),
                load_assignment("pool", pool)]  # fmt: skip
        for name in SERVICES:
            docs += [eds_cluster(name), load_assignment(name, [locality([self.ep(name)])])]
        self.xds.push(docs)

    def get(self, paths: list[str], headers=None, timeout: float = 10.0) -> HttpResult:
        return http_requests(self.env.client_ns, self.host, 80, paths, headers=headers, timeout=timeout,
                             http2=self.http2)

    def get_parallel(self, paths: list[str], headers: list[dict] | None = None, conns: int = 4) -> HttpResult:
        """The paths over `conns` keep-alive connections at once; results back in path order."""
        shares = [(paths[i::conns], headers[i::conns] if headers else None) for i in range(conns)]
        with ThreadPoolExecutor(conns) as pool:
            parts = list(pool.map(lambda share: self.get(*share), shares))
        out = HttpResult()
        for i in range(len(paths)):
            part, j = parts[i % conns], i // conns
            out.status.append(part.status[j])
            out.bodies.append(part.bodies[j])
            out.headers.append(part.headers[j])
            out.latency_ms.append(part.latency_ms[j])
        return out

    def lab(self, name: str, path: str) -> Any:
        """A lab server's own controls (/_lab/...), straight to its port: undeclared ports bypass the proxy."""
        return http_requests(self.env.client_ns, self.host, PORTS[name], [path]).seen(0)


def served_by(result: HttpResult) -> list[str]:
    return [result.seen(i)["server"] if status == 200 else str(status) for i, status in enumerate(result.status)]


def access_lines(mesh: Mesh, pattern: str, count: int) -> list[str]:
    """The access log lines matching `pattern`, once at least `count` were written (the log is batched)."""
    found: list[str] = []

    def enough() -> bool:
        found[:] = [line for line in mesh.env.access_log().splitlines() if re.search(pattern, line)]
        return len(found) >= count

    assert eventually(enough, timeout=5), f"{count} access log lines matching {pattern!r}: {found}"
    return found


@pytest.fixture(scope="module")
def mesh(run_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("traffic-xds")
    prefix = f"{run_prefix}q"
    host = load_lab(prefix=prefix).pod_addr("server", "oam", 4)
    assert host is not None
    loop = LoopThread()
    xds = None
    try:
        xds = XdsPusher(loop, tmp / "xds.sock")
        boot = xds.write_bootstrap(tmp / "bootstrap.yaml", {"id": "traffic-lab"})
        first = [http_listener(), route_config([route(cluster="v1")]), eds_cluster("pool"), load_assignment("pool", [])]
        for name in SERVICES:
            first += [eds_cluster(name), load_assignment(name, [locality([(host, PORTS[name])])])]
        xds.push(first, wait=False)  # before the agent exists: its first fetch finds a complete set
        with running_agent(prefix, ["--bootstrap", str(boot)]) as env:
            ports = [f"{port}={name}" for name, port in PORTS.items()]
            argv = [sys.executable, "-m", "planemesh.labs.servers", "http", *[a for p in ports for a in ("--port", p)]]
            servers = ns_tools.start_until(env.lab.pod_ns("server"), argv, "ready")
            try:
                mesh = Mesh(env, xds, host)
                assert eventually(lambda: mesh.get(["/"]).status == [200], timeout=10)
                yield mesh
            finally:
                ns_tools.stop(servers)
    finally:
        if xds is not None:
            loop.run(xds.server.stop())
        loop.close()


@pytest.fixture(params=["h1", "h2"])
def http(request: pytest.FixtureRequest, mesh: Mesh) -> Iterator[Mesh]:
    """The mesh with an HTTP/1.1 client, then an HTTP/2 (h2c prior knowledge) one: one test body for both."""
    mesh.http2 = request.param == "h2"
    # The test's own push must change the resources, so that the h2 run starts from a fresh snapshot (balancer
    # cursors, ejections, buckets) like the HTTP/1.1 run before it: an unchanged set is not sent again.
    mesh.push([route("/reset-between-protocols/", "v2"), route(cluster="v1")])
    try:
        yield mesh
    finally:
        mesh.http2 = False


# ---- routing ------------------------------------------------------------------------------------------------


def test_weighted_split_90_10_over_2000_requests(http: Mesh) -> None:
    mesh = http
    mesh.push([route(weighted={"v1": 90, "v2": 10})])
    result = mesh.get_parallel([f"/split/{i}" for i in range(2000)])
    counts = Counter(served_by(result))
    assert set(counts) == {"v1", "v2"}, counts
    assert abs(counts["v2"] - 200) <= 40, counts  # 10% +/- 2% (3 sigma of a binomial 2000 x 0.1)


def test_header_matched_requests_always_reach_v2(http: Mesh) -> None:
    mesh = http
    mesh.push([route(cluster="v2", headers=[header_exact("x-canary", "v2")]), route(cluster="v1")])
    assert served_by(mesh.get([f"/h/{i}" for i in range(100)], headers={"x-canary": "v2"})) == ["v2"] * 100
    assert served_by(mesh.get([f"/n/{i}" for i in range(50)])) == ["v1"] * 50
    assert served_by(mesh.get([f"/o/{i}" for i in range(50)], headers={"x-canary": "v3"})) == ["v1"] * 50


def test_sbi_target_header_routes_with_authority_rewrite_and_a_weighted_split(http: Mesh) -> None:
    """5G indirect communication as an SCP routes it: `3gpp-Sbi-Target-apiRoot` names the producer, which gets
    the request with its own authority; calls without it are split between producer versions, 3 to 1."""
    mesh = http
    target = "3gpp-sbi-target-apiroot"
    by_target = route(cluster="v2", headers=[header_exact(target, "http://nf-v2.5gc")],
                      host_rewrite_literal="nf-v2.5gc")
    mesh.push([by_target, route(weighted={"v1": 3, "v2": 1})])
    direct = mesh.get([f"/nudr-dr/v2/{i}" for i in range(10)], headers={target: "http://nf-v2.5gc"})
    assert served_by(direct) == ["v2"] * 10
    assert {direct.seen(i)["headers"]["host"] for i in range(10)} == {"nf-v2.5gc"}
    split = Counter(served_by(mesh.get([f"/nudm-sdm/v2/{i}" for i in range(40)])))
    assert split == {"v1": 30, "v2": 10}, split


# ---- fault injection ----------------------------------------------------------------------------------------


def test_fault_abort_50_percent(http: Mesh) -> None:
    mesh = http
    mesh.push([route(cluster="v1")], filters=(fault(abort_status=503, abort_percent=50),))
    result = mesh.get_parallel([f"/abort/{i}" for i in range(1000)])
    counts = Counter(served_by(result))
    assert set(counts) == {"v1", "503"}, counts
    assert abs(counts["503"] - 500) <= 80, counts  # 50% +/- 8% (5 sigma of a binomial 1000 x 0.5)
    aborted = result.status.index(503)
    assert result.bodies[aborted] == b"fault filter abort"
    access_lines(mesh, rf'"GET /abort/\d+ {mesh.proto}" 503 FI ', counts["503"])


def test_fault_delay_shifts_latency_by_the_configured_amount(http: Mesh) -> None:
    mesh = http
    mesh.push([route(cluster="v1")])
    before = mesh.get([f"/nodelay/{i}" for i in range(20)])
    mesh.push([route(cluster="v1")], filters=(fault(delay_ms=200),))
    delayed = mesh.get([f"/delay-fault/{i}" for i in range(6)])
    assert served_by(delayed) == ["v1"] * 6
    assert min(delayed.latency_ms) >= 200
    shift = delayed.p50_ms - before.p50_ms
    assert 195 <= shift <= 300, (before.p50_ms, delayed.p50_ms)  # 200 ms, give or take a busy machine
    access_lines(mesh, rf'"GET /delay-fault/\d+ {mesh.proto}" 200 DI ', 6)


# ---- resilience -----------------------------------------------------------------------------------------------


def test_retries_turn_503s_into_200s_and_respect_per_try_timeout(http: Mesh) -> None:
    mesh = http
    retry = {"retry_on": "5xx", "num_retries": 2, "per_try_timeout": "0.3s"}
    mesh.push([route("/flaky/", "v1", retry_policy=retry), route(cluster="v1")])
    run = uuid.uuid4().hex[:8]
    # Each key fails twice, then succeeds: two retries make every request a 200 on the third attempt.
    healed = mesh.get([f"/flaky/{run}-{i}/2" for i in range(20)])
    assert healed.status == [200] * 20 and {healed.seen(i)["attempt"] for i in range(20)} == {3}
    # Three failures are one too many: the last answer passes, flagged URX.
    spent = mesh.get([f"/flaky/{run}-spent/3"])
    assert spent.status == [503] and spent.seen(0)["attempt"] == 3
    access_lines(mesh, rf'"GET /flaky/{run}-spent/3 {mesh.proto}" 503 URX ', 1)
    # The first attempt hangs for 2 s: the per-try timeout (0.3 s) moves on to a second, fast attempt.
    slow = mesh.get([f"/flaky/{run}-slow/1?delay=2000"])
    assert slow.status == [200] and slow.seen(0)["attempt"] == 2
    assert 300 <= slow.latency_ms[0] < 800, slow.latency_ms  # 0.3 s + back-off (<= 25 ms), not 2 s


def test_open_circuit_returns_503_uo_immediately(http: Mesh) -> None:
    mesh = http
    mesh.push([route(cluster="pool")], pool=[locality([mesh.ep("v1")])],
              circuit_breakers={"thresholds": [{"max_requests": 1}]})  # fmt: skip
    run = uuid.uuid4().hex[:8]
    held: dict[str, HttpResult] = {}
    hold = threading.Thread(target=lambda: held.update(r=mesh.get([f"/delay/1500?{run}"])))
    hold.start()
    assert eventually(lambda: any(run in e["path"] for e in mesh.lab("v1", "/_lab/log")), timeout=5)
    refused = mesh.get([f"/cb/{run}/{i}" for i in range(5)])
    hold.join(10)
    assert refused.status == [503] * 5 and max(refused.latency_ms) < 200, refused.latency_ms
    assert {h["x-planemesh-overloaded"] for h in refused.headers} == {"cluster_requests"}
    access_lines(mesh, rf'"GET /cb/{run}/\d {mesh.proto}" 503 UO ', 5)
    assert held["r"].status == [200]
    assert mesh.get(["/cb/after"]).status == [200]  # the request's unit was released: the circuit closed


def test_outlier_detection_ejects_and_returns_after_backoff(http: Mesh) -> None:
    mesh = http
    mesh.push([route(cluster="pool")], outlier_detection={"consecutive_5xx": 3, "base_ejection_time": "1s",
                                                          "max_ejection_percent": 50})  # fmt: skip
    mesh.lab("v2", "/_lab/fail/503")
    try:
        first = mesh.get([f"/od/{i}" for i in range(6)])  # round robin: v1, v2, v1, v2, v1, v2
        ejected_at = time.monotonic()
        assert served_by(first) == ["v1", "503"] * 3
        assert served_by(mesh.get([f"/od/e{i}" for i in range(20)])) == ["v1"] * 20  # v2 is out
        mesh.lab("v2", "/_lab/ok")
        time.sleep(max(0.0, ejected_at + 1.05 - time.monotonic()))
        back = Counter(served_by(mesh.get([f"/od/r{i}" for i in range(10)])))
        assert back == {"v1": 5, "v2": 5}, back  # back in rotation after base_ejection_time
    finally:
        mesh.lab("v2", "/_lab/ok")


# ---- load balancing --------------------------------------------------------------------------------------------


def test_ring_hash_is_sticky_and_moves_about_one_nth_on_eds_update(http: Mesh) -> None:
    mesh = http
    four = [mesh.ep(v) for v in ("v1", "v2", "v3", "v4")]
    hashing = [{"header": {"header_name": "x-user"}}]
    mesh.push([route(cluster="pool", hash_policy=hashing)], pool=[locality(four)], pool_lb="RING_HASH")
    users = [{"x-user": f"user-{i}"} for i in range(400)]
    paths = [f"/ring/{i}" for i in range(400)]
    first = served_by(mesh.get_parallel(paths, users))
    assert first == served_by(mesh.get_parallel(paths, users))  # same key, same endpoint
    assert set(first) == {"v1", "v2", "v3", "v4"}
    mesh.push([route(cluster="pool", hash_policy=hashing)], pool=[locality(four[:3])], pool_lb="RING_HASH")
    after = served_by(mesh.get_parallel(paths, users))
    moved = [i for i in range(400) if after[i] != first[i]]
    assert all(first[i] == "v4" for i in moved) and "v4" not in after  # only the leaving endpoint's keys move
    assert 0.15 <= len(moved) / 400 <= 0.35, len(moved)  # about 1/N of the keys


def test_locality_weights_3_to_1_scaled_by_health(http: Mesh) -> None:
    mesh = http
    weighted = {"common_lb_config": {"locality_weighted_lb_config": {}}}
    three_to_one = [locality([mesh.ep("v1")], zone="a", weight=3), locality([mesh.ep("v2")], zone="b", weight=1)]
    mesh.push([route(cluster="pool")], pool=three_to_one, **weighted)
    counts = Counter(served_by(mesh.get_parallel([f"/loc/{i}" for i in range(400)])))
    assert abs(counts["v1"] - 300) <= 20 and counts["v1"] + counts["v2"] == 400, counts
    # Half of zone a unhealthy in EDS: its weight becomes 3 x min(1, 1.4 x 0.5) = 2.1 against zone b's 1.
    half = locality([mesh.ep("v1")], zone="a", weight=3, unhealthy=[mesh.ep("v3")])
    mesh.push([route(cluster="pool")], **weighted, pool=[half, locality([mesh.ep("v2")], zone="b", weight=1)])
    counts = Counter(served_by(mesh.get_parallel([f"/loc2/{i}" for i in range(310)])))
    assert abs(counts["v1"] - 210) <= 20 and counts["v1"] + counts["v2"] == 310, counts


# ---- mirroring and rate limiting -------------------------------------------------------------------------------


def test_mirroring_duplicates_to_the_shadow_without_changing_the_primary(http: Mesh) -> None:
    mesh = http
    mesh.push([route(cluster="v1", request_mirror_policies=[{"cluster": "shadow"}])])
    mesh.lab("shadow", "/_lab/clear")
    run = uuid.uuid4().hex[:8]
    primary = mesh.get([f"/m/{run}/{i}" for i in range(20)])
    assert served_by(primary) == ["v1"] * 20
    seen = [primary.seen(i) for i in range(20)]
    assert [s["path"] for s in seen] == [f"/m/{run}/{i}" for i in range(20)]
    assert not any(s["headers"]["host"].endswith("-shadow") for s in seen)

    def shadowed() -> list[dict]:
        entries = [e for e in mesh.lab("shadow", "/_lab/log") if run in e["path"]]
        return entries if len(entries) >= 20 else []

    copies = sorted(eventually(shadowed, timeout=5), key=lambda e: int(e["path"].rsplit("/", 1)[1]))
    assert [c["path"] for c in copies] == [s["path"] for s in seen]
    assert [c["request_id"] for c in copies] == [s["headers"]["x-request-id"] for s in seen]
    assert all(c["host"] == f"{s['headers']['host']}-shadow" for c, s in zip(copies, seen, strict=True))
    mesh.lab("shadow", "/_lab/fail/500")  # a failing shadow is never seen by the client
    try:
        assert served_by(mesh.get([f"/m/{run}/bad{i}" for i in range(10)])) == ["v1"] * 10
    finally:
        mesh.lab("shadow", "/_lab/ok")


def test_local_rate_limit_admits_the_configured_rate(mesh: Mesh) -> None:
    mesh.push([route(cluster="v1")], filters=(local_ratelimit(10, tokens_per_fill=10, fill_interval_ms=1000),))
    stop = threading.Event()
    out: dict[str, Any] = {}
    client = threading.Thread(target=lambda: out.update(r=http_requests_until(
        mesh.env.client_ns, mesh.host, 80, "/rl/", stop, pause_s=0.004)))  # fmt: skip
    client.start()
    time.sleep(2.5)
    stop.set()
    client.join(10)
    result, sent_at = out["r"]
    runs: list[tuple[int, float]] = []  # (admitted in a row, when the run started)
    for i, status in enumerate(result.status):
        if status == 200:
            if i and result.status[i - 1] == 200:
                runs[-1] = (runs[-1][0] + 1, runs[-1][1])
            else:
                runs.append((1, sent_at[i]))
    assert set(result.status) == {200, 429}
    # The bucket starts full (10), then 10 tokens every second: runs of exactly 10, one per second.
    assert [n for n, _ in runs] == [10] * len(runs) and len(runs) in (3, 4), runs
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(runs[1:])]  # the first run started with the test
    assert all(0.9 <= g <= 1.1 for g in gaps), gaps
    limited = result.headers[result.status.index(429)]
    assert limited["x-ratelimit-limit"] == "10" and limited["x-ratelimit-remaining"] == "0"
    assert 0 <= int(limited["x-ratelimit-reset"]) <= 1
    access_lines(mesh, r'"GET /rl/\d+ HTTP/1.1" 429 RL ', 1)


# ---- live changes ---------------------------------------------------------------------------------------------


def test_live_route_change_drops_no_request_in_flight(mesh: Mesh) -> None:
    mesh.push([route(cluster="v1")])
    run = uuid.uuid4().hex[:8]
    slow: list[HttpResult] = []
    stop = threading.Event()
    stream: dict[str, Any] = {}
    workers = [threading.Thread(target=lambda i=i: slow.append(mesh.get([f"/delay/1500?{run}-{i}"])))
               for i in range(3)]  # fmt: skip
    workers.append(threading.Thread(target=lambda: stream.update(r=http_requests_until(
        mesh.env.client_ns, mesh.host, 80, f"/live/{run}/", stop, pause_s=0.002))))  # fmt: skip
    for w in workers:
        w.start()
    assert eventually(lambda: sum(run in e["path"] for e in mesh.lab("v1", "/_lab/log")) >= 3 + 5, timeout=5)
    mesh.push([route(cluster="v2")])  # while three slow requests and a keep-alive stream are in flight
    acked = time.monotonic()  # the agent ACKs once every worker applied the new snapshot
    time.sleep(0.2)
    stop.set()
    for w in workers:
        w.join(10)
    assert [r.status for r in slow] == [[200]] * 3 and {r.seen(0)["server"] for r in slow} == {"v1"}
    result, sent_at = stream["r"]
    served = served_by(result)
    assert set(served) == {"v1", "v2"}, Counter(served)  # every request answered 200, by one version or the other
    switched = served.index("v2")
    assert served[switched:] == ["v2"] * (len(served) - switched)  # and never back
    assert all(s == "v2" for t, s in zip(sent_at, served, strict=True) if t >= acked)
    assert statistics.median(result.latency_ms) < 50
