"""Through the real management server into a lab agent: a weighted split and a fault abort arrive via xDS
and change live."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest
import yaml

from planemesh.agent.static_config import default_config_text
from planemesh.labs.traffic import http_requests
from tests.netns.agent_lab import eventually, running_agent
from tests.netns.test_agent_xds import resources, start_server, write

pytestmark = pytest.mark.netns

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
SPLIT = {"route": {"weighted_clusters": {"clusters": [{"name": "passthrough", "weight": 75},
                                                      {"name": "canary", "weight": 25}]}}}


def canary_cluster(address: str) -> dict:
    return {
        "@type": CLUSTER, "name": "canary", "type": "STATIC", "connect_timeout": "2s",
        "load_assignment": {"cluster_name": "canary", "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": address, "port_value": 80}}}}]}
        ]},
    }


def with_fault(items: list[dict], status: int) -> list[dict]:
    out = copy.deepcopy(items)
    hcm = out[0]["filter_chains"][0]["filters"][0]["typed_config"]
    fault = {"name": "envoy.filters.http.fault", "typed_config": {
        "@type": FAULT, "abort": {"http_status": status, "percentage": {"numerator": 100, "denominator": "HUNDRED"}}}}
    hcm["http_filters"].insert(0, fault)
    return out


def test_weighted_split_and_fault_abort_arrive_via_xds(run_prefix: str, tmp_path: Path) -> None:
    res = tmp_path / "resources"
    res.mkdir()
    sock = tmp_path / "xds.sock"
    boot = tmp_path / "bootstrap.yaml"
    planes = yaml.safe_load(default_config_text())["planes"]
    boot.write_text(yaml.safe_dump({"node": {"id": "lab-node"}, "server": {"address": f"unix://{sock}"},
                                    "timing": {"backoff_base_s": 0.1, "backoff_max_s": 0.5}, "planes": planes}))
    write(res / "config.yaml", resources({"route": {"cluster": "passthrough"}}))
    server = start_server(res, sock)
    try:
        with running_agent(f"{run_prefix}t", ["--bootstrap", str(boot)]) as env:
            dst = env.server("oam", 4)
            canary = env.server("media", 4)  # the same lab server on its other plane address plays the canary
            assert eventually(lambda: http_requests(env.client_ns, dst, 80, ["/"]).status == [200], 10)

            write(res / "config.yaml", [*resources(SPLIT), canary_cluster(canary)])

            def split() -> Counter | None:
                result = http_requests(env.client_ns, dst, 80, [f"/w{i}" for i in range(40)])
                if result.status != [200] * 40:
                    return None
                seen = Counter(result.seen(i)["local"] for i in range(40))
                return seen if canary in seen else None

            seen = eventually(split, timeout=10, interval=0.2)
            assert seen, "the weighted split never arrived"
            assert seen[canary] == 10 and seen[dst] == 30, seen  # 75/25, deterministic weighted cursor

            write(res / "config.yaml", with_fault([*resources(SPLIT), canary_cluster(canary)], 418))
            assert eventually(lambda: http_requests(env.client_ns, dst, 80, ["/"]).status == [418], 10, 0.1)
            aborted = http_requests(env.client_ns, dst, 80, [f"/a{i}" for i in range(10)])
            assert aborted.status == [418] * 10 and aborted.bodies[0] == b"fault filter abort"

            write(res / "config.yaml", [*resources(SPLIT), canary_cluster(canary)])  # fault removed live
            assert eventually(lambda: http_requests(env.client_ns, dst, 80, ["/"]).status == [200], 10, 0.1)
    finally:
        server.kill()
        server.wait()
