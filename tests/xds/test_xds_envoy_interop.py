"""Real interop on loopback: the real Envoy and our XdsClient on our ManagementServer, SotW and Delta.

Envoy ACKs our resources (its admin config_dump shows the versions we sent), proxies a real HTTP request
with them, and NACKs a broken cluster, which our server reports; our client gets the same config and
gives the same verdicts. One Envoy per mode, started once per module.
"""

from __future__ import annotations

import http.server
import threading
import urllib.request
from pathlib import Path

import pytest

from planemesh.xds.bootstrap import bootstrap_from_dict
from planemesh.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from planemesh.xds.server import ManagementServer, resource_version
from planemesh.xds.transport import XdsClient
from tests.xds.xds_harness import Envoy, LoopThread, free_port, wait_for, write_resources

T = "type.googleapis.com/"


def resources(listen_port: int, backend_port: int) -> list[dict]:
    return [
        {
            "@type": T + "envoy.config.listener.v3.Listener",
            "name": "web",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": T
                                + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                "stat_prefix": "web",
                                "rds": {"route_config_name": "web_routes", "config_source": {"ads": {}}},
                                "http_filters": [
                                    {
                                        "name": "envoy.filters.http.router",
                                        "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"},
                                    }
                                ],
                            },
                        }
                    ]
                }
            ],
        },
        {
            "@type": T + "envoy.config.route.v3.RouteConfiguration",
            "name": "web_routes",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend", "timeout": "3s"}}],
                }
            ],
        },
        {
            "@type": T + "envoy.config.cluster.v3.Cluster",
            "name": "backend",
            "type": "EDS",
            "connect_timeout": "1s",
            "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
        },
        {
            "@type": T + "envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": "backend",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": "127.0.0.1", "port_value": backend_port}}
                            }
                        }
                    ]
                }
            ],
        },
    ]


BROKEN = [
    {
        "@type": T + "envoy.config.cluster.v3.Cluster",
        "name": "broken",
        "type": "STATIC",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "broken",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}}
                    ]
                }
            ],
        },
    }
]


class _Backend(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"backend says hi"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module", params=["sotw", "delta"])
def world(request, tmp_path_factory):
    mode = request.param
    work: Path = tmp_path_factory.mktemp(f"xds-{mode}")
    resdir = work / "resources"
    resdir.mkdir()
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    listen_port = free_port()
    write_resources(resdir, "main.yaml", resources(listen_port, backend.server_address[1]))
    loop = LoopThread()
    server = ManagementServer(resdir, poll_interval_s=0.1)
    envoy = client = None
    try:
        address = loop.run(server.start("127.0.0.1:0"))
        assert server.load_error is None
        envoy = Envoy(work, int(address.rsplit(":", 1)[1]), f"envoy-{mode}", delta=mode == "delta")
        boot = bootstrap_from_dict(
            {
                "node": {"id": f"planemesh-{mode}"},
                "server": {"address": address, "mode": mode},
                "timing": {"backoff_base_s": 0.1, "backoff_max_s": 0.5},
                "planes": [{"name": "lo", "id": 1, "interfaces": ["lo"], "cidrs": ["127.0.0.0/8"]}],
            }
        )
        applied = []

        async def apply(snapshot):
            applied.append(snapshot)

        client = XdsClient(boot, apply)
        task = loop.spawn(client.run())
        yield {
            "mode": mode,
            "server": server,
            "envoy": envoy,
            "client": client,
            "applied": applied,
            "resdir": resdir,
            "listen_port": listen_port,
        }
        task.cancel()
    finally:
        if envoy is not None:
            envoy.stop()
        loop.run(server.stop())
        loop.close()
        backend.shutdown()


def report(server, node_id, kind):
    for c in server.clients():
        if c.node_id == node_id and c.connected and kind in c.types:
            return c.types[kind]
    return None


def acked_everything(server, node_id, mode):
    for type_url, kind in ((CLUSTER, "CDS"), (ENDPOINT, "EDS"), (LISTENER, "LDS"), (ROUTE, "RDS")):
        rep = report(server, node_id, kind)
        if rep is None or not rep.acks or rep.acked_version != rep.sent_version:
            return False
        if mode == "sotw" and rep.acked_version != str(server.type_versions[type_url]):
            return False
    return True


def test_envoy_acks_our_resources_and_serves_with_them(world):
    server, envoy, mode = world["server"], world["envoy"], world["mode"]
    wait_for(lambda: acked_everything(server, envoy.node_id, mode), 10, "envoy to ACK CDS, EDS, LDS and RDS")
    dump = wait_for(
        lambda: (d := envoy.config_dump())["listeners"] and d["routes"] and d["endpoints"] and d,
        10,
        "envoy config_dump to show our resources",
    )
    if mode == "sotw":
        # (Envoy's endpoint dump carries no version_info; its EDS ACK above is the proof for EDS.)
        expected = {
            k: str(server.type_versions[t])
            for k, t in (("listeners", LISTENER), ("clusters", CLUSTER), ("routes", ROUTE))
        }
        assert {
            k: dump[k].get(n) for k, n in (("listeners", "web"), ("clusters", "backend"), ("routes", "web_routes"))
        } == expected
    else:
        assert dump["listeners"]["web"] == resource_version(server.resources[LISTENER]["web"])
        assert dump["clusters"]["backend"] == resource_version(server.resources[CLUSTER]["backend"])
    assert "backend" in dump["endpoints"]
    # Envoy really uses the configuration: HTTP through its listener reaches the backend of the EDS cluster.
    url = f"http://127.0.0.1:{world['listen_port']}/hello"
    body = wait_for(lambda: _get(url), 10, "a request through envoy")
    assert body == b"backend says hi"


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read() if r.status == 200 else None
    except OSError:
        return None


def test_our_client_gets_the_same_config_as_envoy(world):
    server, envoy, client, mode = world["server"], world["envoy"], world["client"], world["mode"]
    wait_for(lambda: acked_everything(server, f"planemesh-{mode}", mode), 10, "our client to ACK everything")
    wait_for(lambda: acked_everything(server, envoy.node_id, mode), 10, "envoy to ACK everything")
    for kind in ("CDS", "EDS", "LDS", "RDS"):
        assert (
            report(server, envoy.node_id, kind).acked_version == report(server, f"planemesh-{mode}", kind).acked_version
        )
    snap = world["applied"][-1]
    assert [(x.name, x.plane, x.port, str(x.protocol)) for x in snap.listeners] == [
        ("web", "lo", world["listen_port"], "http")
    ]
    assert snap.routes["web_routes"].virtual_hosts[0].routes[0].action.cluster == "backend"
    assert [(e.address, e.port) for e in snap.clusters["backend"].endpoints] == [
        ("127.0.0.1", int(dict(server.resources[ENDPOINT])["backend"].value and _backend_port(server)))
    ]
    status = client.status()
    assert status["connected"] and all(t["nacks"] == 0 for t in status["types"].values())


def _backend_port(server):
    from planemesh.xds.resources import unpack

    cla = unpack(server.resources[ENDPOINT]["backend"], ENDPOINT)
    return cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value


def test_broken_cluster_is_nacked_by_envoy_and_us_and_reported(world):
    server, envoy, client, mode = world["server"], world["envoy"], world["client"], world["mode"]
    ours = f"planemesh-{mode}"
    wait_for(lambda: acked_everything(server, envoy.node_id, mode), 10, "a settled start")
    good_cds = report(server, envoy.node_id, "CDS").acked_version
    write_resources(world["resdir"], "broken.yaml", BROKEN)
    try:
        envoy_nack = wait_for(lambda: (r := report(server, envoy.node_id, "CDS")) and r.nacks and r, 10, "envoy NACK")
        our_nack = wait_for(lambda: (r := report(server, ours, "CDS")) and r.nacks and r, 10, "our NACK")
        assert "broken" in envoy_nack.last_nack and "cluster provided LB" in envoy_nack.last_nack
        assert "cluster[broken].lb_policy" in our_nack.last_nack
        assert envoy_nack.acked_version == our_nack.acked_version == good_cds  # the old version stays
        assert "broken" not in envoy.config_dump()["clusters"]
        assert "broken" not in world["applied"][-1].clusters and client.status()["types"]["CDS"]["nacks"] >= 1
        assert _get(f"http://127.0.0.1:{world['listen_port']}/still") == b"backend says hi"
    finally:
        (world["resdir"] / "broken.yaml").unlink()
    # Fixed: both take the next version.
    wait_for(lambda: acked_everything(server, envoy.node_id, mode), 10, "envoy to ACK the fixed set")
    wait_for(lambda: acked_everything(server, ours, mode), 10, "our client to ACK the fixed set")
