"""The admin endpoint for real: over a unix socket and over 127.0.0.1, with http.client."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat

import pytest
from prometheus_client.parser import text_string_to_metric_families

from planemesh.agent.admin import AdminApp, AdminBind, AdminBindError, AdminServer, parse_admin_bind
from planemesh.agent.sdnotify import DEFAULT_BLOCKERS, Readiness
from planemesh.agent.stats_report import (
    ClusterStats,
    LatencyHistogram,
    ListenerStats,
    RouteStats,
    StatsReport,
    XdsTypeStats,
)
from planemesh.model.config import Snapshot
from planemesh.model.snapshot_json import from_jsonable

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"


def _proxy_report() -> StatsReport:
    hist = LatencyHistogram()
    for value in (0.0004, 0.003, 0.003, 0.2, 45.0):
        hist.observe(value)
    return StatsReport(
        routes=[RouteStats("oam", "oam_80", "default", "backend", requests=5, responses={"2xx": 4, "5xx": 1},
                           request_bytes=100, response_bytes=2000, latency=hist)],
        listeners=[ListenerStats("oam", "oam_80", active_connections=3, connections=7, rate_limited=2)],
        clusters=[ClusterStats("oam", "backend", active_connections=2, retries=1,
                               circuit_breaker_overflows={"pending": 4})],
    )  # fmt: skip


def _datapath_report() -> dict:
    return {"datapath": [{"plane": "oam", "packets": {"bypass": 900, "proxy": 40}, "interfaces_attached": 2}]}


def _xds_report() -> StatsReport:
    return StatsReport(
        xds=[XdsTypeStats(LISTENER_TYPE, version="v7", acks=6, nacks=1, resources=4)], xds_connected=True
    )


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_ready_flips_when_blockers_clear(live_admin, transport):
    get = live_admin.unix_get if transport == "unix" else live_admin.tcp_get
    status, _, body = get("/ready")
    assert status == 503
    for blocker in DEFAULT_BLOCKERS:
        assert blocker in body.decode()
    for blocker in DEFAULT_BLOCKERS[:-1]:
        live_admin.readiness.clear(blocker)
    status, _, body = get("/ready?format=json")
    assert status == 503 and json.loads(body) == {"ready": False, "blockers": [DEFAULT_BLOCKERS[-1]]}
    live_admin.readiness.clear(DEFAULT_BLOCKERS[-1])
    assert get("/ready")[0] == 200
    assert get("/ready?format=json")[2] == b'{\n "blockers": [],\n "ready": true\n}\n'


def test_healthz_follows_the_liveness_callback(live_admin):
    assert live_admin.tcp_get("/healthz")[:1] == (200,)
    live_admin.state["healthy"] = False
    assert live_admin.tcp_get("/healthz")[0] == 503
    status, headers, body = live_admin.unix_get("/healthz", method="HEAD")
    assert status == 503 and body == b"" and int(headers["Content-Length"]) > 0


def test_stats_parse_and_equal_what_providers_returned(live_admin):
    live_admin.stats.register("proxy", _proxy_report)
    live_admin.stats.register("proxy-worker-2", _proxy_report)  # same labels: summed
    live_admin.stats.register("datapath", _datapath_report)
    live_admin.stats.register("xds", _xds_report)
    status, headers, body = live_admin.unix_get("/stats")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    route = (("cluster", "backend"), ("listener", "oam_80"), ("plane", "oam"), ("route", "default"))
    assert samples[("planemesh_http_requests_total", route)] == 10
    assert samples[("planemesh_http_responses_total", tuple(sorted((*route, ("class", "5xx")))))] == 2
    assert samples[("planemesh_http_responses_total", tuple(sorted((*route, ("class", "2xx")))))] == 8
    assert samples[("planemesh_http_response_bytes_total", route)] == 4000
    assert samples[("planemesh_http_request_duration_seconds_count", route)] == 10
    assert samples[("planemesh_http_request_duration_seconds_sum", route)] == pytest.approx(2 * 45.2064)
    assert samples[("planemesh_http_request_duration_seconds_bucket", tuple(sorted((*route, ("le", "0.0005")))))] == 2
    assert samples[("planemesh_http_request_duration_seconds_bucket", tuple(sorted((*route, ("le", "0.005")))))] == 6
    assert samples[("planemesh_http_request_duration_seconds_bucket", tuple(sorted((*route, ("le", "30.0")))))] == 8
    assert samples[("planemesh_http_request_duration_seconds_bucket", tuple(sorted((*route, ("le", "+Inf")))))] == 10
    listener = (("listener", "oam_80"), ("plane", "oam"))
    assert samples[("planemesh_listener_active_connections", listener)] == 6
    assert samples[("planemesh_rate_limited_total", listener)] == 4
    cluster = (("cluster", "backend"), ("plane", "oam"))
    assert samples[("planemesh_cluster_circuit_breaker_overflows_total", (*cluster, ("resource", "pending")))] == 8
    assert samples[("planemesh_cluster_retries_total", cluster)] == 2
    assert samples[("planemesh_bpf_packets_total", (("plane", "oam"), ("verdict", "bypass")))] == 900
    assert samples[("planemesh_bpf_packets_total", (("plane", "oam"), ("verdict", "proxy")))] == 40
    assert samples[("planemesh_xds_version_info", (("type_url", LISTENER_TYPE), ("version", "v7")))] == 1
    assert samples[("planemesh_xds_acks_total", (("type_url", LISTENER_TYPE),))] == 6
    assert samples[("planemesh_xds_nacks_total", (("type_url", LISTENER_TYPE),))] == 1
    assert samples[("planemesh_xds_connected", ())] == 1
    assert samples[("planemesh_ready", ())] == 0
    assert samples[("planemesh_readiness_blocker", (("blocker", "listeners bound"),))] == 1
    assert ("process_resident_memory_bytes", ()) in samples


def test_a_failing_provider_is_counted_and_the_scrape_still_works(live_admin):
    def broken() -> StatsReport:
        raise RuntimeError("worker gone")

    live_admin.stats.register("broken", broken)
    live_admin.stats.register("datapath", _datapath_report)
    live_admin.stats.register("garbage", lambda: 42)  # type: ignore[arg-type, return-value]
    status, _, body = live_admin.tcp_get("/stats")
    assert status == 200
    samples = {(s.name, tuple(s.labels.values())): s.value
               for f in text_string_to_metric_families(body.decode()) for s in f.samples}  # fmt: skip
    assert samples[("planemesh_stats_provider_errors_total", ("broken",))] == 1
    assert samples[("planemesh_stats_provider_errors_total", ("garbage",))] == 1
    assert samples[("planemesh_bpf_packets_total", ("oam", "bypass"))] == 900


def test_config_dump_round_trips_the_snapshot(live_admin, default_snapshot):
    status, _, body = live_admin.unix_get("/config_dump")
    assert status == 503 and "no configuration" in json.loads(body)["error"]
    live_admin.state["snapshot"] = default_snapshot
    live_admin.stats.register("xds", _xds_report)
    status, headers, body = live_admin.tcp_get("/config_dump")
    assert status == 200 and headers["Content-Type"] == "application/json"
    dump = json.loads(body)
    assert dump["version"] == default_snapshot.version
    assert dump["xds_versions"] == {LISTENER_TYPE: "v7"}
    assert from_jsonable(Snapshot, dump["snapshot"]) == default_snapshot


def test_planes_show_config_interfaces_and_counters(live_admin, default_snapshot):
    live_admin.state["snapshot"] = default_snapshot
    live_admin.stats.register("proxy", _proxy_report)
    live_admin.stats.register("datapath", _datapath_report)
    live_admin.app.interfaces = lambda: {"oam": [{"name": "pod1-oam", "ifindex": 7,
                                                   "addresses": ["198.18.1.1/24"], "attached": True}]}  # fmt: skip
    status, _, body = live_admin.unix_get("/planes")
    assert status == 200
    planes = {p["name"]: p for p in json.loads(body)["planes"]}
    assert set(planes) == {"oam", "media"}
    oam = planes["oam"]
    assert oam["id"] == 1 and oam["cidrs"] == ["198.18.1.0/24", "fd00:18:1::/64"]
    assert oam["interfaces"][0]["name"] == "pod1-oam"
    assert oam["counters"] == {"bpf_packets": {"bypass": 900, "proxy": 40}, "active_connections": 3,
                               "connections": 7, "rate_limited": 2, "http_requests": 5}  # fmt: skip
    assert {x["port"] for x in oam["listeners"]} == {80, 8080, 9000}
    assert planes["media"]["counters"]["bpf_packets"] == {}


def test_status_summary(live_admin, default_snapshot):
    live_admin.state["snapshot"] = default_snapshot
    status, _, body = live_admin.tcp_get("/status")
    st = json.loads(body)
    assert status == 200 and st["pid"] == os.getpid() and st["ready"] is False
    assert st["snapshot_version"] == default_snapshot.version and st["planes"] == ["oam", "media"]


def test_bad_requests_get_clear_answers(live_admin):
    assert live_admin.tcp_get("/nope")[0] == 404
    assert live_admin.tcp_get("/ready", method="POST")[0] == 405
    for raw, expected in [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
        (b"\xff\xfe\r\n\r\n", b"400"),
    ]:
        with socket.create_connection(("127.0.0.1", live_admin.tcp_port), timeout=5) as sock:
            sock.sendall(raw)
            assert sock.recv(64).split(b" ")[1] == expected
    assert live_admin.tcp_get("/healthz")[0] == 200  # still serving


def test_unix_socket_mode_and_cleanup(live_admin, event_loop_thread):
    mode = os.stat(live_admin.unix_path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
    asyncio.run_coroutine_threadsafe(live_admin.server.close(), event_loop_thread).result(5)
    assert not os.path.exists(live_admin.unix_path)


def test_second_agent_on_the_same_socket_is_refused(live_admin, event_loop_thread):
    other = AdminServer(AdminApp(Readiness()), [f"unix://{live_admin.unix_path}"])
    with pytest.raises(AdminBindError, match="already running"):
        asyncio.run_coroutine_threadsafe(other.start(), event_loop_thread).result(5)
    assert live_admin.unix_get("/healthz")[0] == 200


def test_stale_socket_is_replaced(tmp_path, event_loop_thread):
    path = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: a crashed agent's leftover
    server = AdminServer(AdminApp(Readiness([])), [path])
    asyncio.run_coroutine_threadsafe(server.start(), event_loop_thread).result(5)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), event_loop_thread).result(5)


def test_closing_never_removes_a_successors_socket(tmp_path, event_loop_thread):
    # Hot upgrade: the successor binds the path as soon as the old agent stops answering on it; the old
    # agent's close() used to unlink the path afterwards, leaving the new agent with no admin socket.
    path = str(tmp_path / "admin.sock")
    old = AdminServer(AdminApp(Readiness([])), [path])
    asyncio.run_coroutine_threadsafe(old.start(), event_loop_thread).result(5)
    os.unlink(path)  # as if the old one had stopped listening and the successor replaced the stale file
    new = AdminServer(AdminApp(Readiness([])), [path])
    asyncio.run_coroutine_threadsafe(new.start(), event_loop_thread).result(5)
    try:
        asyncio.run_coroutine_threadsafe(old.close(), event_loop_thread).result(5)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        asyncio.run_coroutine_threadsafe(new.close(), event_loop_thread).result(5)
    assert not os.path.exists(path)


def test_a_regular_file_in_the_way_is_not_deleted(tmp_path, event_loop_thread):
    path = tmp_path / "admin.sock"
    path.write_text("precious")
    server = AdminServer(AdminApp(Readiness([])), [str(path)])
    with pytest.raises(AdminBindError, match="not a socket"):
        asyncio.run_coroutine_threadsafe(server.start(), event_loop_thread).result(5)
    assert path.read_text() == "precious"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("unix:///run/planemesh/admin.sock", AdminBind(unix_path="/run/planemesh/admin.sock")),
        ("/tmp/a.sock", AdminBind(unix_path="/tmp/a.sock")),
        ("127.0.0.1:15000", AdminBind(host="127.0.0.1", port=15000)),
        ("127.0.0.53:9", AdminBind(host="127.0.0.53", port=9)),
        ("[::1]:15000", AdminBind(host="::1", port=15000)),
        ("localhost:15001", AdminBind(host="127.0.0.1", port=15001)),
        ("http://127.0.0.1:15000/", AdminBind(host="127.0.0.1", port=15000)),
    ],
)
def test_parse_admin_bind(spec, expected):
    assert parse_admin_bind(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0.0.0.0:15000", "non-loopback"),
        ("[::]:15000", "non-loopback"),
        ("198.18.1.1:15000", "non-loopback"),
        ("10.0.0.1:15000", "non-loopback"),
        ("[fd00:18::1]:15000", "non-loopback"),
        ("example.com:15000", "not an IP address"),
        ("127.0.0.1:http", "not a port"),
        ("127.0.0.1:70000", "not a port"),
        ("unix://relative.sock", "absolute"),
        ("15000", "HOST:PORT"),
    ],
)
def test_non_loopback_and_malformed_binds_are_refused(spec, message):
    with pytest.raises(AdminBindError, match=message):
        parse_admin_bind(spec)


def test_hand_built_non_loopback_bind_is_refused_before_binding():
    with pytest.raises(AdminBindError, match="non-loopback"):
        AdminServer(AdminApp(Readiness()), [AdminBind(host="0.0.0.0", port=0)])
