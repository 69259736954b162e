"""5G service-based calls through the proxy (issue 12's telecom scenario, proxy tier): an NF consumer calls NF
producers with JSON bodies; the route table uses the SBI target header (`3gpp-Sbi-Target-apiRoot`, the request
goes to the producer it names with its authority rewritten, as an SCP does in indirect communication), a weighted
split between producer versions, a retry on 503 to the other producer, a fault abort on one service path and a
route rate limit. One test body, run for an HTTP/1.1 and an HTTP/2 (h2c prior knowledge) consumer.

Under pressure, low-priority messages (`3gpp-Sbi-Message-Priority` >= 16) are shed first (pipeline.py). Not
covered here: the lab version through the management server (tests/netns/test_traffic_xds.py covers each feature
there, for both protocols)."""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import replace

from planemesh.model.config import (
    FaultFilter,
    HeaderMatch,
    LocalRateLimit,
    RetryPolicy,
    Route,
    RouteAction,
    RouteMatch,
    WeightedCluster,
)
from tests.proxy.proxy_harness import log_line_for
from tests.proxy.test_traffic_resilience import VersionServer, endpoint, proxy_for, static
from tests.proxy.test_traffic_routing import wait_for

TARGET = "3gpp-sbi-target-apiroot"
RETRY_503 = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=1, backoff_base_s=0.001, backoff_max_s=0.002)


def sbi_routes() -> tuple[Route, ...]:
    def to_target(name: str) -> Route:
        return Route(match=RouteMatch(prefix="/", headers=(HeaderMatch(name=TARGET, exact=f"http://{name}.5gc"),)),
                     action=RouteAction(cluster=name, host_rewrite=f"{name}.5gc"))

    return (
        Route(match=RouteMatch(prefix="/nausf-auth/"), action=RouteAction(cluster="producers"),
              fault=FaultFilter(abort_status=503, abort_percent=100)),
        Route(match=RouteMatch(prefix="/nchf-convergedcharging/"), action=RouteAction(cluster="producers"),
              rate_limit=LocalRateLimit(max_tokens=2, tokens_per_fill=2, fill_interval_s=60.0)),
        to_target("producer-a"),
        to_target("producer-b"),
        Route(match=RouteMatch(prefix="/nudm-sdm/"),
              action=RouteAction(weighted=(WeightedCluster("producer-a", 3), WeightedCluster("producer-b", 1)))),
        Route(action=RouteAction(cluster="producers", retry=RETRY_503)),
    )


def test_sbi_calls_through_the_proxy(http) -> None:
    with VersionServer("producer-a") as a, VersionServer("producer-b") as b, \
            VersionServer("producer-down", status=503) as down:
        clusters = {"producer-a": static("producer-a", [endpoint(a)]),
                    "producer-b": static("producer-b", [endpoint(b)]),
                    "producers": static("producers", [endpoint(down), endpoint(b)])}
        with proxy_for(sbi_routes(), clusters) as px:
            consumer = http.client(px.port)
            body = json.dumps({"supi": "imsi-001010000000001", "servingNetworkName": "5G:mnc001.mcc001"}).encode()
            json_headers = {"content-type": "application/json", "host": "scp.5gc"}
            # Indirect communication: the target header picks the producer, whose authority the request carries.
            for name, server in (("producer-b", b), ("producer-a", a)):
                status, _, served = consumer.request("/nudr-dr/v2/subscription-data", method="POST", body=body,
                                                     headers={**json_headers, TARGET: f"http://{name}.5gc"})
                assert (status, served) == (200, name.encode())
                method, path, seen, got = server.seen[-1]
                assert (method, path, seen["host"], got) == ("POST", "/nudr-dr/v2/subscription-data",
                                                             f"{name}.5gc", body)
                assert json.loads(got)["supi"] == "imsi-001010000000001"
            # A weighted split between producer versions: 3 to 1, exact over each cycle.
            served = Counter(consumer.request(f"/nudm-sdm/v2/imsi-{i}/am-data")[2] for i in range(8))
            assert served == {b"producer-a": 6, b"producer-b": 2}
            # A producer answering 503: retried on the other one, the consumer sees only 200s.
            answers = [consumer.request(f"/npcf-smpolicycontrol/v1/sm-policies/{i}", method="POST", body=body,
                                        headers=json_headers) for i in range(4)]
            assert [(s, d) for s, _, d in answers] == [(200, b"producer-b")] * 4
            assert down.seen and len(down.seen) == px.proxy.stats.retries  # each 503 was retried on producer-b
            # A fault abort on one service, before any producer sees it.
            before = len(a.seen) + len(b.seen) + len(down.seen)
            status, _, text = consumer.request("/nausf-auth/v1/ue-authentications", method="POST", body=body,
                                               headers=json_headers)
            assert (status, text) == (503, b"fault filter abort")
            assert len(a.seen) + len(b.seen) + len(down.seen) == before
            assert '" 503 FI ' in log_line_for(px, "/nausf-auth/v1/ue-authentications")
            # A route rate limit on the charging service only.
            charging = [consumer.request(f"/nchf-convergedcharging/v3/chargingdata/{i}", method="POST", body=body,
                                         headers=json_headers)[0] for i in range(3)]
            assert charging[2] == 429 and charging[:2] != [429, 429]
            consumer.close()


def test_low_priority_sbi_messages_are_shed_first_under_pressure(http) -> None:
    """With 4 of max_requests=5 in flight (above 80 %), a message of priority 20 is refused at once and one of
    priority 1 still takes the last slot (pipeline.SBI_SHED_PRIORITY)."""
    routes = (Route(match=RouteMatch(prefix="/hold/"), action=RouteAction(cluster="slow")),
              Route(action=RouteAction(cluster="fast")))
    with VersionServer("slow", delay_s=1.5) as slow, VersionServer("fast") as fast:
        clusters = {"slow": static("slow", [endpoint(slow)]), "fast": static("fast", [endpoint(fast)])}
        with proxy_for(routes, clusters) as px:
            px.update_sla(replace(px.proxy.sla, max_requests=5))
            holders = [threading.Thread(target=http.get, args=(px.port, f"/hold/{i}")) for i in range(4)]
            for t in holders:
                t.start()
            try:
                assert wait_for(lambda: len(slow.seen) == 4, 5.0)
                status, headers, _ = http.get(px.port, "/nsmf-pdusession/v1/sm-contexts", method="POST",
                                              body=b"{}", headers={"3gpp-sbi-message-priority": "20"})
                assert (status, headers["x-planemesh-overloaded"]) == (503, "priority")
                assert '" 503 UO ' in log_line_for(px, "/nsmf-pdusession/v1/sm-contexts")
                status, _, served = http.get(px.port, "/namf-comm/v1/ue-contexts/n1-n2-messages", method="POST",
                                             body=b"{}", headers={"3gpp-sbi-message-priority": "1"})
                assert (status, served) == (200, b"fast")
                assert [p for _, p, _, _ in fast.seen] == ["/namf-comm/v1/ue-contexts/n1-n2-messages"]
            finally:
                for t in holders:
                    t.join(5)
            assert http.get(px.port, "/after", headers={"3gpp-sbi-message-priority": "31"})[0] == 200  # no pressure
