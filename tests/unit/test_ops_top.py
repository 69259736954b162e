"""`planemesh top`: per-plane rows and the screen are a pure function of two admin samples."""

from __future__ import annotations

import io

import pytest

from planemesh.agent.stats_report import DEFAULT_LATENCY_BUCKETS_S
from planemesh.agent.top import Sample, plain, quantile_ms, render, rows

pytestmark = pytest.mark.unit

STATUS = {"pid": 42, "uptime_s": 12.0, "ready": True, "blockers": [], "xds_connected": True,
          "snapshot_version": "xds:LDS=3", "planes": ["oam", "media"],
          "xds_versions": {"type.googleapis.com/envoy.config.listener.v3.Listener": "3"}}  # fmt: skip


def hist(**at_bound: int) -> dict:
    """A RouteStats latency with `n` observations in the bucket of each bound given as b<ms>=n."""
    counts = [0] * (len(DEFAULT_LATENCY_BUCKETS_S) + 1)
    for key, n in at_bound.items():
        counts[DEFAULT_LATENCY_BUCKETS_S.index(float(key[1:]) / 1000)] += n
    return {"bounds": list(DEFAULT_LATENCY_BUCKETS_S), "counts": counts, "sum_s": 0.0}


def stats(requests: int, five: int, latency: dict, flags: dict, bypass: int, proxy: int, shed: int,
          refused: int, rate_limited: int, worker_rows: int = 1) -> dict:  # fmt: skip
    per_worker = [
        {"plane": "oam", "listener": "oam", "route": "all", "cluster": "all", "requests": requests,
         "responses": {"2xx": requests - five, "5xx": five}, "request_bytes": 100 * requests,
         "response_bytes": 1000 * requests, "latency": latency, "response_flags": flags}
    ]  # fmt: skip
    return {
        "routes": per_worker * worker_rows,
        "listeners": [{"plane": "oam", "listener": "oam", "active_connections": 3, "rate_limited": rate_limited}],
        "clusters": [
            {
                "plane": "oam",
                "cluster": "all",
                "active_connections": 2,
                "circuit_breaker_overflows": {"requests": rate_limited},
            }
        ],
        "datapath": [
            {
                "plane": "oam",
                "packets": {"bypass": bypass, "proxy": proxy, "sniff": 1},
                "bytes": {"bypass": 60 * bypass, "proxy": 80 * proxy},
            },
            {"plane": "media", "packets": {"bypass": 7}, "bytes": {"bypass": 700}},
        ],
        "overload": [
            {
                "plane": "oam",
                "memory_bytes": 30 << 20,
                "workers_soft": 1,
                "workers_hard": 0,
                "shed_requests": shed,
                "source_refused": refused,
            }
        ],
        "xds": [{"type_url": "type.googleapis.com/envoy.config.listener.v3.Listener", "nacks": 1}],
    }


PREV = Sample(100.0, STATUS, stats(1000, 10, hist(b1=900, b5=100), {"UF": 10, "DI": 4}, 50, 20, 0, 0, 0))
CUR = Sample(102.0, STATUS, stats(1200, 14, hist(b1=990, b5=200, b100=10), {"UF": 12, "UO": 2, "DI": 9},
                                  250, 60, 6, 4, 2))  # fmt: skip


def test_rates_over_the_interval() -> None:
    oam, media = rows(PREV, CUR)
    assert [oam.plane, media.plane] == ["oam", "media"]
    assert oam.rps == 100.0 and oam.err_rps == 2.0
    assert oam.flags == {"UF": 1.0, "UO": 1.0}, "DI (delay injected) is no error"
    assert oam.bypass_pps == 100.0 and oam.proxy_pps == 20.0  # proxy + sniff: 40 + 0 over 2 s
    assert oam.bypass_bps == 6000.0
    assert oam.proxied_bps == 1100 * 200 / 2
    assert oam.limits == {"rate_limited": 1.0, "breaker_requests": 1.0, "shed_requests": 3.0, "source_refused": 2.0}
    assert oam.limits_ps == 7.0
    assert (oam.conns_down, oam.conns_up, oam.memory_mb, oam.overload) == (3, 2, 30.0, "soft")
    assert media.rps == 0.0 and media.p50_ms is None and media.bypass_pps == 0.0  # nothing moved in the interval


def test_latency_percentiles_cover_only_the_interval() -> None:
    oam = rows(PREV, CUR)[0]
    # interval: 90 at <=1 ms, 100 at (2.5, 5] ms, 10 at (50, 100] ms: p50 in the 5 ms bucket, p99 in 100 ms
    assert oam.p50_ms == pytest.approx(2.5 + 2.5 * (100 - 90) / 100)
    assert oam.p99_ms == pytest.approx(50 + 50 * (198 - 190) / 10)


def test_counters_that_went_back_count_from_zero() -> None:
    restarted = Sample(102.0, STATUS, stats(30, 0, hist(b1=30), {}, 10, 5, 0, 0, 0))
    oam = rows(PREV, restarted)[0]
    assert oam.rps == 15.0 and oam.bypass_pps == 5.0 and oam.p50_ms is not None and oam.p50_ms <= 1.0


def test_first_sample_of_a_new_plane_counts_everything() -> None:
    empty = Sample(99.0, {**STATUS, "planes": []}, {})
    oam = rows(empty, CUR)[0]
    assert oam.rps == 1200 / 3


@pytest.mark.parametrize(("q", "counts", "want"), [
    (0.5, [0, 10, 0], 0.75), (1.0, [0, 10, 0], 1.0), (0.5, [0, 0, 4], 1.0), (0.5, [0, 0, 0], None),
])  # fmt: skip
def test_quantile_is_prometheus_interpolation(q: float, counts: list[int], want: float | None) -> None:
    assert quantile_ms(q, [0.0005, 0.001], counts) == want


def test_render_shows_every_plane_and_the_agent_state() -> None:
    screen = render(PREV, CUR)
    text = "\n".join(screen)
    assert screen[0].startswith("planemesh top - pid 42") and "ready" in screen[0] and "xds connected" in screen[0]
    assert "Listener=3" in text and "xds NACKs  Listener=1" in text
    oam = next(line for line in screen if line.startswith("oam "))
    assert "100.0" in oam and "3/2" in oam and "soft" in oam
    assert "UF=1.0/s" in text and "shed_requests=3.0/s" in text
    assert any(line.startswith("media ") for line in screen)
    assert max(map(len, screen[2:])) <= 160


def test_render_survives_an_agent_without_stats() -> None:
    status = {"ready": False, "blockers": ["config"], "planes": []}
    screen = render(Sample(0.0, status, {}), Sample(1.0, status, {}))
    assert "NOT READY (config)" in screen[0] and screen[-1].startswith("PLANE")


def test_plain_loop_prints_n_frames() -> None:
    samples = iter([PREV, CUR, CUR])

    class Client:  # what fetch() asks for, in order: /status then /stats
        def get_json(self, path: str) -> tuple[int, dict]:
            s = self.current = next(samples) if path == "/status" else self.current
            return 200, (s.status if path == "/status" else s.stats)

    out = io.StringIO()
    assert plain(Client(), out, 0.0, 2) == 0  # type: ignore[arg-type]
    assert out.getvalue().count("planemesh top - ") == 2 and out.getvalue().count("\noam ") == 2
