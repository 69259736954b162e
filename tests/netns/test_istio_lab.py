"""istiod-shaped resources drive a real agent in a lab: virtualOutbound, virtualInbound (PERMISSIVE, with its
TLS chains), a `0.0.0.0_PORT` outbound listener that does not bind, with an HTTP chain and istiod's
PassthroughCluster default chain (sniffed), istio-proxy filters everywhere, a VirtualService weighted split and
fault, istiod's retry policy, clusters with transport_socket_matches (tlsMode istio) and endpoints with
istio's metadata. The agent ACKs every type and the traffic behaves as through istio sidecars.
"""

from __future__ import annotations

import copy
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from planemesh.labs import load_lab
from planemesh.labs import netns as ns_tools
from planemesh.labs.traffic import http_requests
from planemesh.xds.conformance import CORPUS
from tests.netns.agent_lab import eventually, running_agent
from tests.netns.test_traffic_xds import XdsPusher
from tests.xds.xds_harness import LoopThread

pytestmark = pytest.mark.netns

T = "type.googleapis.com/"
PORT = 8081  # the service port: v1 listens on it, v2 on 8082
SVC = "reviews.default.svc.cluster.local"


def _corpus(fname: str) -> dict[str, dict]:
    items = json.loads((CORPUS / fname).read_text())
    return {item.get("name") or item["cluster_name"]: item for item in items}


def istiod_push(host: str) -> list[dict]:
    """The corpus's shapes, re-aimed at the lab: service port 8081, subsets v1 (host:8081) and v2 (host:8082)."""
    listeners, routes, clusters, endpoints = (
        _corpus(f) for f in ("listeners.json", "routes.json", "clusters.json", "endpoints.json")
    )
    outbound = copy.deepcopy(listeners["0.0.0.0_9080"])
    outbound["name"] = f"0.0.0.0_{PORT}"
    outbound["address"]["socket_address"]["port_value"] = PORT
    hcm = outbound["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["rds"]["route_config_name"] = str(PORT)
    rc = copy.deepcopy(routes["9080-vs"])
    rc["name"] = str(PORT)
    split, faulty, _allow_any = rc["virtual_hosts"]
    split["domains"] = ["*"]
    split["routes"][0]["route"]["weighted_clusters"]["clusters"] = [
        {"name": f"outbound|{PORT}|v1|{SVC}", "weight": 80},
        {"name": f"outbound|{PORT}|v2|{SVC}", "weight": 20},
    ]
    fault_route = copy.deepcopy(faulty["routes"][0])
    fault_route["match"] = {"prefix": "/ratings"}
    fault_route["route"]["cluster"] = f"outbound|{PORT}|v1|{SVC}"
    fault_route["typed_per_filter_config"]["envoy.filters.http.fault"] = {
        "@type": T + "envoy.extensions.filters.http.fault.v3.HTTPFault",
        "abort": {"http_status": 503, "percentage": {"numerator": 100}},
    }
    split["routes"].insert(0, fault_route)
    rc["virtual_hosts"] = [split]
    docs = [listeners["virtualOutbound"], listeners["virtualInbound"], outbound, rc]
    docs += [clusters[n] for n in ("BlackHoleCluster", "PassthroughCluster", "InboundPassthroughCluster")]
    docs += [clusters[n] for n in ("inbound|9080||", "inbound|9090||", "inbound|9091||")]
    docs += [endpoints["BlackHoleCluster"]]
    template_cluster, template_cla = clusters[f"outbound|9080|v1|{SVC}"], endpoints[f"outbound|9080|v1|{SVC}"]
    for subset, port in (("v1", 8081), ("v2", 8082)):
        name = f"outbound|{PORT}|{subset}|{SVC}"
        cluster = copy.deepcopy(template_cluster)
        cluster["name"] = cluster["eds_cluster_config"]["service_name"] = name
        cla = copy.deepcopy(template_cla)
        cla["cluster_name"] = name
        lbe = cla["endpoints"][0]["lb_endpoints"][0]  # keeps istio's metadata (tlsMode: istio, workload)
        lbe["endpoint"]["address"]["socket_address"] = {"address": host, "port_value": port}
        cla["endpoints"][0]["lb_endpoints"] = [lbe]
        cla["endpoints"][0]["load_balancing_weight"] = 1
        docs += [cluster, cla]
    return docs


@pytest.fixture(scope="module")
def lab(run_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    tmp: Path = tmp_path_factory.mktemp("istio-lab")
    prefix = f"{run_prefix}i"
    host = load_lab(prefix=prefix).pod_addr("server", "oam", 4)
    assert host is not None
    loop = LoopThread()
    xds = None
    try:
        xds = XdsPusher(loop, tmp / "xds.sock")
        boot = xds.write_bootstrap(
            tmp / "bootstrap.yaml", {"id": "sidecar~10.244.0.5~productpage-v1.default~default.svc.cluster.local"}
        )
        xds.push(istiod_push(host), wait=False)  # before the agent exists: its first fetch is the whole push
        with running_agent(prefix, ["--bootstrap", str(boot)]) as env:
            argv = [sys.executable, "-m", "planemesh.labs.servers", "http", "--port", "8081=v1", "--port", "8082=v2"]
            servers = ns_tools.start_until(env.lab.pod_ns("server"), argv, "ready")
            try:
                get = lambda paths: http_requests(env.client_ns, host, PORT, paths)  # noqa: E731
                assert eventually(lambda: get(["/"]).status == [200], timeout=15)
                yield env, xds, host, get
            finally:
                ns_tools.stop(servers)
    finally:
        if xds is not None:
            loop.run(xds.server.stop())
        loop.close()


def test_the_whole_istiod_push_is_acked(lab) -> None:
    _env, xds, host, _get = lab
    xds.push(istiod_push(host))  # raises if the agent NACKs any type


def test_virtual_service_weighted_split_80_20(lab) -> None:
    env, _xds, host, get = lab
    result = get([f"/split/{i}" for i in range(400)])
    assert set(result.status) == {200}
    served = Counter(result.seen(i)["server"] for i in range(400))
    assert set(served) == {"v1", "v2"} and 0.70 <= served["v1"] / 400 <= 0.90, served
    # through the L7 proxy (the sniffed listener): the access log names v2's endpoint as the upstream host
    assert eventually(lambda: '"GET /split/' in env.access_log() and f'"{host}:8082"' in env.access_log(), timeout=5)


def test_virtual_service_fault_aborts_only_its_route(lab) -> None:
    _env, _xds, _host, get = lab
    assert get([f"/ratings/{i}" for i in range(20)]).status == [503] * 20
    assert get(["/reviews/1"]).status == [200]
