"""One node, many workloads, for real: the agent opens one ADS stream per local pod (labs/workloads.yaml), the
management server gives each pod its own configuration, and the traffic shows each pod gets its own
behaviour: outbound chosen by the source pod (client -> v1, clientb -> v2 for the same destination), inbound by
the destination pod (each server's own inbound chain, even for a client on no workload of this node), and a pod
removed closes its stream and loses its configuration."""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from planemesh.labs import netns as ns_tools
from planemesh.labs.envoy_resources import HCM, PASSTHROUGH, ROUTER, T, by_type, http_listener, route, route_config
from planemesh.labs.netns import call_in
from planemesh.labs.traffic import http_requests
from planemesh.labs.workloads import write_workloads_file
from planemesh.model.static_config import default_config_text
from planemesh.xds.server import ManagementServer
from tests.netns.agent_lab import eventually, running_agent
from tests.xds.xds_harness import LoopThread

pytestmark = pytest.mark.netns

LAB = Path(__file__).resolve().parents[2] / "labs" / "workloads.yaml"
WORKLOADS = ["client", "clientb", "server", "serverb"]  # `remote` is not one: a client on another node
SERVICE, INBOUND = 8081, 8083
TCP_SERVICE = 9400  # a TCP port both clients' configurations declare, differently
VIP_SERVICE = 8090  # client's own service port: any destination (serverb's address here) -> v1 (server's 8081)
ORIGINAL_DST = T + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"


def _static_cluster(name: str, host: str, port: int) -> dict:
    endpoint = {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
    return {"@type": T + "envoy.config.cluster.v3.Cluster", "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]}}  # fmt: skip


ONLY_CLIENT = "x-only-client"  # requests with it are for the client pod's identity only
DENY_POLICY = {
    "ns[default]-policy[deny-forbidden]-rule[0]": {
        "permissions": [{"header": {"name": "x-forbidden", "present_match": True}}],
        "principals": [{"any": True}],
    },
    "ns[default]-policy[only-client]-rule[0]": {  # DENY x-only-client from notPrincipals [sa/client]
        "permissions": [{"and_rules": {"rules": [{"header": {"name": ONLY_CLIENT, "present_match": True}}]}}],
        "principals": [{"and_ids": {"ids": [{"not_id": {"or_ids": {"ids": [
            {"authenticated": {"principal_name": {"exact": "spiffe://cluster.local/ns/default/sa/client"}}}]}}}]}}],
    },
}  # fmt: skip
DENY_FORBIDDEN = {  # AuthorizationPolicies DENY as istiod renders them: x-forbidden, and x-only-client but from
    "name": "envoy.filters.http.rbac",  # another identity than the client pod's
    "typed_config": {"@type": T + "envoy.extensions.filters.http.rbac.v3.RBAC",
                     "rules": {"action": "DENY", "policies": DENY_POLICY}},
}  # fmt: skip


def _tcp_listener(cluster: str, network_filters: tuple[dict, ...] = ()) -> dict:
    """istiod's outbound listener of a TCP service port: one chain, tcp_proxy to `cluster`."""
    tcp = {"@type": T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": cluster,
           "cluster": cluster}  # fmt: skip
    return {"@type": T + "envoy.config.listener.v3.Listener", "name": f"0.0.0.0_{TCP_SERVICE}",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": TCP_SERVICE}},
            "filter_chains": [{"filters": [*network_filters, {"name": "tcp_proxy", "typed_config": tcp}]}]}  # fmt: skip


ALLOW_ANY_TCP = {  # an AuthorizationPolicy ALLOW for TCP as istiod renders it (envoy.filters.network.rbac)
    "name": "envoy.filters.network.rbac",
    "typed_config": {"@type": T + "envoy.extensions.filters.network.rbac.v3.RBAC", "stat_prefix": "tcp.",
                     "rules": {"action": "ALLOW", "policies": {"ns[default]-policy[any]-rule[0]": {
                         "permissions": [{"any": True}], "principals": [{"any": True}]}}}},
}  # fmt: skip


UNSERVED = "/_unserved"  # a path no inbound route of the lab's servers matches (theirs: `/` and `/[^_].*`)


def _chain(port: int, tag: str, filters: list[dict]) -> dict:
    """An inbound chain whose route (not a filter) stamps `tag` on the request and on the response."""
    rc = {"name": f"inbound|{port}", "virtual_hosts": [{"name": "inbound", "domains": ["*"], "routes": [{
        "match": {"safe_regex": {"regex": "/|/[^_].*"}}, "route": {"cluster": f"inbound|{port}||"},
        "request_headers_to_add": [{"header": {"key": "x-inbound-config", "value": tag}}],
        "response_headers_to_add": [{"header": {"key": "x-inbound-route", "value": tag}}]}]}]}  # fmt: skip
    hcm = {"@type": HCM, "stat_prefix": "inbound", "route_config": rc, "http_filters": [*filters, ROUTER]}
    return {"name": f"0.0.0.0_{port}", "filter_chain_match": {"destination_port": port},
            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}  # fmt: skip


def _virtual_inbound(tag: str, service_port_rbac: bool = False) -> dict:
    """istiod's shape: 15006 with original_dst and a chain per pod port; this pod's chains stamp `tag`. With
    `service_port_rbac`, the pod also serves the service port behind a DENY policy."""
    chains = [_chain(INBOUND, tag, [])]
    if service_port_rbac:
        chains.append(_chain(SERVICE, tag, [DENY_FORBIDDEN]))
    return {
        "@type": T + "envoy.config.listener.v3.Listener",
        "name": "virtualInbound",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}},
        "listener_filters": [{"name": "envoy.filters.listener.original_dst", "typed_config": {"@type": ORIGINAL_DST}}],
        "filter_chains": chains,
    }


@pytest.fixture(scope="module")
def lab(run_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    tmp: Path = tmp_path_factory.mktemp("workloads-lab")
    loop = LoopThread()
    server = ManagementServer(None)
    try:
        address = loop.run(server.start(f"unix://{tmp / 'xds.sock'}"))
        workloads = tmp / "workloads.yaml"
        workloads.write_text("workloads: []\n")  # none yet: the agent is ready with an empty configuration
        boot = tmp / "bootstrap.yaml"
        boot.write_text(yaml.safe_dump({
            "node": {"id": "node-1"}, "server": {"address": address},
            "timing": {"backoff_base_s": 0.1, "backoff_max_s": 0.5},
            "planes": yaml.safe_load(default_config_text())["planes"],
            "workloads": {"source": "file", "file": str(workloads), "poll_interval_s": 0.1},
        }))  # fmt: skip
        with running_agent(f"{run_prefix}w", ["--bootstrap", str(boot)], lab_file=str(LAB)) as env:
            host = env.lab.pod_addr("server", "oam", 4)
            shared = [http_listener(f"0.0.0.0_{SERVICE}", SERVICE, routes=str(SERVICE)),
                      route_config([route(cluster="v1")], name=str(SERVICE)),
                      route_config([route(cluster="v1")], name=str(VIP_SERVICE)),
                      _static_cluster("v1", host, 8081), _static_cluster("v2", host, 8082),
                      {**PASSTHROUGH, "name": f"inbound|{INBOUND}||"},
                      {**PASSTHROUGH, "name": f"inbound|{SERVICE}||"},
                      {**PASSTHROUGH, "name": "PassthroughCluster"}]  # fmt: skip

            async def serve() -> None:
                for type_url, msgs in by_type(shared).items():
                    server.set_resources(type_url, msgs)
                # clientb's sidecar would be told: the service goes to v2 (its own VirtualService), /to-v1 to v1
                ((rds, msgs),) = by_type([route_config([route("/to-v1", cluster="v1"), route(cluster="v2")],
                                                       name=str(SERVICE))]).items()  # fmt: skip
                server.set_node_resources("clientb.default", rds, msgs)
                # the TCP port: client's sidecar would pass it through (plain tcp_proxy: the kernel's bypass),
                # clientb's sends it to v2 behind a network RBAC (an inspected chain: the proxy relays it)
                # ... and client's sidecar has a service of its own on VIP_SERVICE, routed to the server's pod
                ((lds, msgs),) = by_type([_tcp_listener("PassthroughCluster"),
                                          http_listener(f"0.0.0.0_{VIP_SERVICE}", VIP_SERVICE,
                                                        routes=str(VIP_SERVICE))]).items()  # fmt: skip
                server.set_node_resources("client.default", lds, msgs)
                ((lds, msgs),) = by_type([_tcp_listener("v2", (ALLOW_ANY_TCP,))]).items()
                server.set_node_resources("clientb.default", lds, msgs)
                for pod in ("server", "serverb"):  # server also serves the service port, behind a DENY policy
                    ((lds, msgs),) = by_type([_virtual_inbound(f"{pod}-inbound", pod == "server")]).items()
                    server.set_node_resources(f"{pod}.default", lds, msgs)

            loop.run(serve())
            write_workloads_file(workloads, env.lab, WORKLOADS)
            argv = [sys.executable, "-m", "planemesh.labs.servers", "http", "--port", "8081=v1", "--port", "8082=v2",
                    "--port", f"{INBOUND}=server", "--port", f"{TCP_SERVICE}=tcp-original"]  # fmt: skip
            procs = [ns_tools.start_until(env.lab.pod_ns("server"), argv, "ready")]
            argv = [sys.executable, "-m", "planemesh.labs.servers", "http", "--port", f"{INBOUND}=serverb"]
            procs.append(ns_tools.start_until(env.lab.pod_ns("serverb"), argv, "ready"))
            try:
                yield env, server, loop, workloads, host
            finally:
                for proc in procs:
                    ns_tools.stop(proc)
    finally:
        loop.run(server.stop())
        loop.close()


def _served_by(env, pod: str, host: str, port: int, n: int = 4) -> list[str]:
    try:
        result = http_requests(env.lab.pod_ns(pod), host, port, [f"/{pod}/{i}" for i in range(n)])
    except OSError as exc:  # a plane's workers restarting (its listener set changed) reset what they held
        return [f"error: {exc}"]
    return [result.seen(i)["server"] if s == 200 else str(s) for i, s in enumerate(result.status)]


def _streams(server: ManagementServer, loop: LoopThread) -> set[str]:
    async def live() -> set[str]:
        return {c.node_id.split("~")[2] for c in server.clients() if c.connected}

    return loop.run(live())


def test_one_stream_per_workload(lab) -> None:
    _env, server, loop, _wl, _host = lab
    assert eventually(lambda: _streams(server, loop) == {f"{w}.default" for w in WORKLOADS}, timeout=20)


def test_outbound_by_source(lab) -> None:
    env, _server, _loop, _wl, host = lab
    assert eventually(lambda: _served_by(env, "clientb", host, SERVICE) == ["v2"] * 4, timeout=20)
    assert _served_by(env, "client", host, SERVICE) == ["v1"] * 4  # same destination, its own routes
    # the proxy handled both (its access log names the clusters' endpoints), not the kernel's bypass
    assert eventually(lambda: f'"{host}:8082"' in env.access_log() and f'"{host}:8081"' in env.access_log(), 5)


def test_inbound_by_destination(lab) -> None:
    env, _server, _loop, _wl, _host = lab
    for pod in ("server", "serverb"):
        dst = env.lab.pod_addr(pod, "oam", 4)
        result = eventually(lambda dst=dst: (r := http_requests(env.lab.pod_ns("remote"), dst, INBOUND, ["/in"]))
                            .status == [200] and r, timeout=20)  # fmt: skip
        seen = result.seen(0)
        assert seen["server"] == pod and seen["headers"].get("x-inbound-config") == f"{pod}-inbound", seen


def test_a_removed_pod_closes_its_stream_and_loses_its_configuration(lab) -> None:
    env, server, loop, workloads, host = lab
    assert eventually(lambda: _served_by(env, "clientb", host, SERVICE) == ["v2"] * 4, timeout=20)
    write_workloads_file(workloads, env.lab, ["client", "server", "serverb"])
    assert eventually(lambda: "clientb.default" not in _streams(server, loop), timeout=10)
    # clientb is no workload of this node any more: its connections go to their original destination (v1)
    assert eventually(lambda: _served_by(env, "clientb", host, SERVICE) == ["v1"] * 4, timeout=10)
    write_workloads_file(workloads, env.lab, WORKLOADS)  # back, for whatever runs next
    assert eventually(lambda: _served_by(env, "clientb", host, SERVICE) == ["v2"] * 4, timeout=20)


def test_the_servers_policy_holds_for_a_client_on_the_same_node(lab) -> None:
    """client and server are both pods of this node: the client's routes (v1 for it) and the server's inbound
    DENY policy apply to one connection, as the two sidecars would apply them in turn; a client on another
    node meets the same policy."""
    env, _server, _loop, _wl, host = lab
    deny = {"x-forbidden": "1"}
    for pod in ("client", "remote"):
        ns = env.lab.pod_ns(pod)
        assert eventually(lambda ns=ns: http_requests(ns, host, SERVICE, ["/p"], headers=deny).status == [403], 20)
    assert _served_by(env, "client", host, SERVICE) == ["v1"] * 4  # allowed requests: the client's route
    seen = http_requests(env.lab.pod_ns("remote"), host, SERVICE, ["/p"]).seen(0)  # the server's inbound chain
    assert seen["server"] == "v1" and seen["headers"].get("x-inbound-config") == "server-inbound", seen


def test_the_servers_inbound_route_applies_to_a_client_on_the_same_node(lab) -> None:
    """client and server are both pods of this node: after client's route (v1, the server's service port),
    the server's inbound *route* applies as its sidecar would: the request header it adds reaches the server,
    its response header reaches the client, over HTTP/1.1 and h2. Before, a same-node client got only the
    server's filters: the route's headers reached remote clients only."""
    env, _server, _loop, _wl, host = lab
    ns = env.lab.pod_ns("client")
    for http2 in (False, True):
        result = eventually(lambda h2=http2: (r := http_requests(ns, host, SERVICE, ["/client/route"], http2=h2))
                            .status == [200] and r, timeout=20)  # fmt: skip
        seen = result.seen(0)
        assert seen["server"] == "v1", seen  # the client's route still chose the cluster
        assert seen["headers"].get("x-inbound-config") == "server-inbound", (http2, seen)
        assert result.headers[0].get("x-inbound-route") == "server-inbound", (http2, result.headers[0])
    remote = http_requests(env.lab.pod_ns("remote"), host, SERVICE, ["/remote/route"])  # as a remote client gets
    assert remote.headers[0].get("x-inbound-route") == "server-inbound" and remote.seen(0)["server"] == "v1"


def test_a_path_the_servers_inbound_routes_do_not_match_is_404_from_the_same_node(lab) -> None:
    """The server's inbound routes do not match UNSERVED: 404 (NR) for a remote client (the server's chain)
    and for a same-node client (client's route, then the server's); before, the same-node client reached the
    server. clientb's route sends it to v2 (port 8082), where the server declares no inbound chain: no second
    stage, as the server's sidecar would pass it through."""
    env, _server, _loop, _wl, host = lab
    for pod in ("remote", "client"):
        ns = env.lab.pod_ns(pod)
        assert eventually(lambda ns=ns: http_requests(ns, host, SERVICE, [UNSERVED]).status == [404], 20), pod
    assert http_requests(env.lab.pod_ns("client"), host, SERVICE, [UNSERVED], http2=True).status == [404]
    assert eventually(lambda: (r := http_requests(env.lab.pod_ns("clientb"), host, SERVICE, [UNSERVED])).status
                      == [200] and r.seen(0)["server"] == "v2", timeout=20)  # fmt: skip


def test_the_server_stage_follows_the_endpoint_not_the_address_dialled(lab) -> None:
    """client dials serverb's address on VIP_SERVICE (as it would dial a service VIP); its own route sends the
    request to v1, the server pod's service port: the server's inbound stage there applies, its DENY policy
    (a filter) and its route's header, because the endpoint is the server, whatever address was dialled. Before,
    the server's filters were chosen by the address dialled: the forbidden request reached the server."""
    env, _server, _loop, _wl, _host = lab
    ns = env.lab.pod_ns("client")
    vip = env.lab.pod_addr("serverb", "oam", 4)  # no inbound chain of serverb's on this port
    result = eventually(lambda: (r := http_requests(ns, vip, VIP_SERVICE, ["/client/vip"])).status == [200] and r,
                        timeout=20)  # fmt: skip
    seen = result.seen(0)
    assert seen["server"] == "v1" and seen["headers"].get("x-inbound-config") == "server-inbound", seen
    assert http_requests(ns, vip, VIP_SERVICE, ["/p"], headers={"x-forbidden": "1"}).status == [403]
    assert http_requests(ns, vip, VIP_SERVICE, ["/p"], headers={"x-forbidden": "1"}, http2=True).status == [403]
    assert http_requests(ns, vip, VIP_SERVICE, [UNSERVED]).status == [404]


def _tcp_slots(env) -> tuple[int, int]:
    counters = env.planes()["oam"]["counters"]["bpf_packets"]
    return counters.get("bypass", 0), counters.get("sniff", 0)


def _quiet_slots(env) -> tuple[int, int]:
    """The counters once no packet moved them for 0.5 s."""
    last = _tcp_slots(env)
    for _ in range(20):
        time.sleep(0.5)
        now = _tcp_slots(env)
        if now == last:
            return now
        last = now
    return last


def test_tcp_chains_by_source(lab) -> None:
    """Two pods, one destination TCP port, two configurations: client's plain tcp_proxy stays a bypass in the
    kernel (the original destination answers, no packet of it reaches the proxy), clientb's chain (network
    RBAC, tcp_proxy to v2) goes through the proxy to v2. Before source scoping both got one chain."""
    env, _server, _loop, _wl, host = lab
    assert eventually(lambda: _served_by(env, "clientb", host, TCP_SERVICE) == ["v2"] * 4, timeout=20)
    bypass, sniff = _quiet_slots(env)  # clientb's last segments (FIN, ACK) counted before the baseline
    assert _served_by(env, "client", host, TCP_SERVICE) == ["tcp-original"] * 4
    after = _tcp_slots(env)
    assert after[0] > bypass and after[1] == sniff, (bypass, sniff, after)  # client's packets: the kernel only
    assert _served_by(env, "clientb", host, TCP_SERVICE) == ["v2"] * 4
    assert _tcp_slots(env)[1] > after[1]  # clientb's: intercepted
    # a client on no workload of this node: neither configuration, its connection goes where it was sent
    assert _served_by(env, "remote", host, TCP_SERVICE) == ["tcp-original"] * 4


def _hold(address: str, port: int, stop: threading.Event) -> tuple[list[str], int, BaseException | None]:
    """GET over ONE connection every 0.2 s (under the plane's 10 s idle timeout) until `stop`: the servers that
    answered, how many local ports were used, and the error that ended it (None: it lasted). auto_open off:
    http.client may not reconnect behind our back after the proxy closed the connection."""
    conn = http.client.HTTPConnection(address, port, timeout=10)
    conn.connect()
    conn.auto_open = 0
    ports, served = set(), []
    try:
        while not stop.is_set():
            conn.request("GET", f"/held/{len(served)}")
            resp = conn.getresponse()
            body = resp.read()
            served.append(json.loads(body)["server"] if resp.status == 200 else str(resp.status))
            if conn.sock is None:  # the proxy answered with Connection: close
                raise ConnectionError("the proxy closed the held connection")
            ports.add(conn.sock.getsockname()[1])
            time.sleep(0.2)
    except (OSError, http.client.HTTPException) as exc:
        return served, len(ports), exc
    finally:
        conn.close()
    return served, len(ports), None


def test_a_held_connection_survives_an_inspected_chain_leaving_and_arriving(lab) -> None:
    """clientb's TCP chain (network RBAC) is the only inspected chain on plane oam. Its pod leaving and
    returning changes oam's kernel rules (the sniffing listener's use), not oam's workers: a connection another
    pod holds through oam's proxy the whole time lasts. Before, the workers restarted both times and reset it."""
    env, server, loop, workloads, host = lab
    assert eventually(lambda: _served_by(env, "clientb", host, TCP_SERVICE) == ["v2"] * 4, timeout=20)
    stop = threading.Event()
    held: dict = {}
    thread = threading.Thread(target=lambda: held.update(r=call_in(env.lab.pod_ns("client"), _hold, host, SERVICE,
                                                                   stop)))  # fmt: skip
    thread.start()
    try:
        write_workloads_file(workloads, env.lab, ["client", "server", "serverb"])  # the inspected chain leaves
        assert eventually(lambda: "clientb.default" not in _streams(server, loop), timeout=10)
        assert eventually(lambda: _served_by(env, "clientb", host, TCP_SERVICE) == ["tcp-original"] * 4, 10)
        write_workloads_file(workloads, env.lab, WORKLOADS)  # ... and arrives again
        assert eventually(lambda: _served_by(env, "clientb", host, TCP_SERVICE) == ["v2"] * 4, timeout=20)
        time.sleep(1.0)  # a restart's drain would close the idle-between-requests connection by now
    finally:
        stop.set()
        thread.join(30)
    served, ports, error = held["r"]
    assert error is None and ports == 1, (error, ports, served[-5:])
    assert len(served) >= 5 and set(served) == {"v1"}, served  # client's own route the whole time


def test_the_servers_policy_by_principal_sees_the_same_node_clients_identity(lab) -> None:
    """The server's DENY policy refuses x-only-client requests from every identity but the client pod's
    (`notPrincipals: [cluster.local/ns/default/sa/client]`). client (service account `client` in the workloads
    file) and clientb (`clientb`) are pods of this node whose routes reach the server's service port: the
    agent gives the server's stage each client's SPIFFE ID from its pod table, so client is allowed and
    clientb refused 403, over HTTP/1.1 and h2; remote (no workload of the node, no certificate) is refused
    too. Before, a same-node client had no principal: client was refused as well."""
    env, _server, _loop, _wl, host = lab
    only = {ONLY_CLIENT: "1"}
    client, clientb = env.lab.pod_ns("client"), env.lab.pod_ns("clientb")
    assert eventually(lambda: http_requests(clientb, host, SERVICE, ["/to-v1/x"]).seen(0)["server"] == "v1", 20)
    for http2 in (False, True):
        allowed = http_requests(client, host, SERVICE, ["/p"], headers=only, http2=http2)
        assert allowed.status == [200] and allowed.seen(0)["server"] == "v1", (http2, allowed.status)
        assert http_requests(clientb, host, SERVICE, ["/to-v1/p"], headers=only, http2=http2).status == [403], http2
        assert http_requests(clientb, host, SERVICE, ["/to-v1/p"], http2=http2).status == [200], http2
    assert http_requests(env.lab.pod_ns("remote"), host, SERVICE, ["/p"], headers=only).status == [403]
    assert eventually(lambda: "spiffe://cluster.local/ns/default/sa/client" in env.access_log(), 5)
