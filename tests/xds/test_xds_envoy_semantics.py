"""Envoy 1.40 as the oracle for the update semantics: the same pushes go to the real Envoy and to our client
through our ManagementServer, and both must give the same verdicts (loopback only).

- a push with one bad listener: both apply the good one and NACK naming only the bad one;
- removing a cluster a route still names: both ACK (Envoy answers 503 until it returns);
- an Envoy configured like istio-agent (Delta, no initial fetch timeout) facing an empty server goes LIVE.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
import yaml

from planemesh.xds.server import ManagementServer
from tests.xds import test_xds_envoy_interop as interop
from tests.xds.test_xds_envoy_interop import acked_everything, report, resources
from tests.xds.xds_harness import Envoy, LoopThread, free_port, wait_for, write_resources

T = "type.googleapis.com/"
world = interop.world  # the module-scoped Envoy + our client on one ManagementServer, per mode


def _listener(name: str, address: str, port: int) -> dict:
    doc = resources(port, 9)[0]
    return {**doc, "name": name, "address": {"socket_address": {"address": address, "port_value": port}}}


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def test_a_bad_listener_is_nacked_alone_the_good_one_is_applied_by_envoy_and_us(world):
    server, envoy, mode = world["server"], world["envoy"], world["mode"]
    ours = f"planemesh-{mode}"
    wait_for(lambda: acked_everything(server, envoy.node_id, mode), 10, "a settled start")
    wait_for(lambda: acked_everything(server, ours, mode), 10, "our settled start")
    good_port = free_port()
    write_resources(
        world["resdir"], "extra.yaml", [_listener("extra", "127.0.0.1", good_port), _listener("bad", "300.1.1.1", 81)]
    )
    try:
        envoy_nack = wait_for(lambda: (r := report(server, envoy.node_id, "LDS")) and r.nacks and r, 10, "envoy NACK")
        our_nack = wait_for(lambda: (r := report(server, ours, "LDS")) and r.nacks and r, 10, "our NACK")
        assert "bad" in envoy_nack.last_nack and "extra" not in envoy_nack.last_nack
        assert "listener[bad]" in our_nack.last_nack and "extra" not in our_nack.last_nack
        assert envoy_nack.acked_version == our_nack.acked_version  # both still on the previous version
        # both applied the good listener of the NACKed push
        wait_for(lambda: "extra" in envoy.config_dump()["listeners"], 10, "envoy to apply the good listener")
        wait_for(lambda: any(x.name == "extra" for x in world["applied"][-1].listeners), 10, "us to apply it")
        assert "bad" not in envoy.config_dump()["listeners"]
        assert not any(x.name == "bad" for x in world["applied"][-1].listeners)
        for kind in ("CDS", "EDS", "RDS"):  # the other types were never NACKed
            assert report(server, envoy.node_id, kind).nacks == report(server, ours, kind).nacks == 0
    finally:
        (world["resdir"] / "extra.yaml").unlink()
    wait_for(lambda: acked_everything(server, envoy.node_id, mode), 10, "envoy to ACK the fixed set")
    wait_for(lambda: acked_everything(server, ours, mode), 10, "our client to ACK the fixed set")


def test_removing_a_cluster_a_route_names_is_accepted_by_envoy_and_us(world):
    server, envoy, mode, resdir = world["server"], world["envoy"], world["mode"], world["resdir"]
    ours = f"planemesh-{mode}"
    wait_for(lambda: acked_everything(server, envoy.node_id, mode), 10, "a settled start")
    main = (resdir / "main.yaml").read_text()
    docs = yaml.safe_load(main)
    without = [d for d in docs if not (d["@type"].endswith("Cluster") and d["name"] == "backend")]
    write_resources(resdir, "main.yaml", without)
    url = f"http://127.0.0.1:{world['listen_port']}/gone"
    try:
        wait_for(lambda: "backend" not in envoy.config_dump()["clusters"], 10, "envoy to remove the cluster")
        wait_for(lambda: "backend" not in world["applied"][-1].clusters, 10, "us to remove the cluster")
        wait_for(lambda: acked_everything(server, envoy.node_id, mode), 10, "envoy to ACK the removal")
        wait_for(lambda: acked_everything(server, ours, mode), 10, "our client to ACK the removal")
        assert report(server, envoy.node_id, "CDS").nacks == report(server, ours, "CDS").nacks == 0
        assert wait_for(lambda: _status(url) == 503 or None, 10, "envoy's 503 for the missing cluster")
        route = world["applied"][-1].routes["web_routes"].virtual_hosts[0].routes[0]
        assert route.action.cluster == "backend"  # the route stays; planemesh answers 503 NC
    finally:
        (resdir / "main.yaml").write_text(main)
    wait_for(lambda: "backend" in world["applied"][-1].clusters, 10, "the cluster to come back")


@pytest.fixture
def empty_server():
    loop = LoopThread()
    server = ManagementServer(None)
    try:
        yield loop, server, loop.run(server.start("127.0.0.1:0"))
    finally:
        loop.run(server.stop())
        loop.close()


def test_envoy_configured_like_istio_agent_goes_live_on_an_empty_delta_server(empty_server, tmp_path):
    _loop, _server, address = empty_server
    envoy = Envoy(tmp_path, int(address.rsplit(":", 1)[1]), "istio-like", delta=True, istio_agent=True)
    try:
        assert wait_for(lambda: envoy.state() == "LIVE", 10, "envoy to leave PRE_INITIALIZING")
    finally:
        envoy.stop()
