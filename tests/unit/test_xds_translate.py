"""Translation tables: Envoy resources (YAML, as a control plane writes them) -> Snapshot pieces or errors."""

from __future__ import annotations

import copy
from importlib import resources as importlib_resources
from types import MappingProxyType

import pytest
import yaml

from planemesh.model.config import (
    ClusterKind,
    ConfigError,
    FaultFilter,
    HeaderMatch,
    LbPolicy,
    ListenerProtocol,
    LocalRateLimit,
)
from planemesh.model.ip import IPNetwork
from planemesh.model.static_config import load_default_config
from planemesh.xds.client_state import XdsResources
from planemesh.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, parse_resource_text, unpack
from planemesh.xds.translate import translate

PLANES = load_default_config().planes  # oam 198.18.1.0/24 + fd00:18:1::/64, media 198.18.2.0/24 + ...
T = "type.googleapis.com/"
HCM = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "router", "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"}}


def to_resources(docs: list[dict]) -> XdsResources:
    by_type: dict[str, dict] = {LISTENER: {}, ROUTE: {}, CLUSTER: {}, ENDPOINT: {}}
    for packed in parse_resource_text(yaml.safe_dump(docs), "test"):
        msg = unpack(packed, packed.type_url)
        by_type[packed.type_url][getattr(msg, "name", "") or msg.cluster_name] = msg
    return XdsResources(
        listeners=MappingProxyType(by_type[LISTENER]),
        routes=MappingProxyType(by_type[ROUTE]),
        clusters=MappingProxyType(by_type[CLUSTER]),
        endpoints=MappingProxyType(by_type[ENDPOINT]),
        versions=MappingProxyType({"LDS": "1"}),
    )


def http_listener(name="l1", address="0.0.0.0", port=80, rds=None, route_config=None, filters=(), meta=None, **hcm):
    cfg = {"@type": HCM, "stat_prefix": name, "http_filters": [*filters, ROUTER], **hcm}
    if rds:
        cfg["rds"] = {"route_config_name": rds, "config_source": {"ads": {}}}
    else:
        cfg["route_config"] = route_config or {
            "name": f"{name}_inline",
            "virtual_hosts": [
                {"name": "any", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "pass"}}]}
            ],
        }
    doc = {
        "@type": T + "envoy.config.listener.v3.Listener",
        "name": name,
        "address": {"socket_address": {"address": address, "port_value": port}},
        "filter_chains": [{"filters": [{"name": "hcm", "typed_config": cfg}]}],
    }
    if meta:
        doc["metadata"] = {"filter_metadata": {"planemesh": meta}}
    return doc


def tcp_listener(name="t1", address="198.18.2.10", port=5432, cluster="pass", **chain):
    return {
        "@type": T + "envoy.config.listener.v3.Listener",
        "name": name,
        "address": {"socket_address": {"address": address, "port_value": port}},
        "filter_chains": [
            {
                **chain,
                "filters": [
                    {
                        "name": "tcp",
                        "typed_config": {
                            "@type": T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                            "stat_prefix": name,
                            "cluster": cluster,
                        },
                    }
                ],
            }
        ],
    }


PASS = {
    "@type": T + "envoy.config.cluster.v3.Cluster",
    "name": "pass",
    "type": "ORIGINAL_DST",
    "lb_policy": "CLUSTER_PROVIDED",
}


def static_cluster(name="web", address="198.18.1.20", port=8080, **extra):
    return {
        "@type": T + "envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "STATIC",
        **extra,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": address, "port_value": port}}}}
                    ]
                }
            ],
        },
    }


def routes(name="r1", **route):
    return {
        "@type": T + "envoy.config.route.v3.RouteConfiguration",
        "name": name,
        "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **route}]}],
    }


def only_route(snap, name="r1"):
    return snap.routes[name].virtual_hosts[0].routes[0]


# ---- good input -> expected Snapshot pieces --------------------------------------------------------


def test_example_file_translates():
    text = importlib_resources.files("planemesh.xds").joinpath("examples/two-planes.yaml").read_text()
    snap = translate(to_resources(yaml.safe_load(text)), PLANES)
    assert {(x.name, x.plane, x.port, x.protocol) for x in snap.listeners} == {
        ("oam_http", "oam", 80, ListenerProtocol.HTTP),
        ("media_db", "media", 5432, ListenerProtocol.TCP),
    }
    assert snap.plane("oam").sla.request_timeout_s == 15 and snap.plane("oam").sla.rate_limit_rps == 500
    assert snap.clusters["api_v2"].lb_policy is LbPolicy.LEAST_REQUEST


@pytest.mark.parametrize(
    ("docs", "expect"),
    [
        # plane from metadata; from the bind address's CIDR; 0.0.0.0 -> every plane
        ([http_listener(meta={"plane": "media"}), PASS], {("l1", "media", 80)}),
        ([http_listener(address="198.18.1.5", port=8080), PASS], {("l1", "oam", 8080)}),
        ([http_listener(address="fd00:18:2::5"), PASS], {("l1", "media", 80)}),
        ([http_listener(), PASS], {("l1@oam", "oam", 80), ("l1@media", "media", 80)}),
        ([tcp_listener(), PASS], {("t1", "media", 5432)}),
        ([tcp_listener(filter_chain_match={"destination_port": 6000}), PASS], {("t1", "media", 6000)}),
    ],
    ids=["metadata", "cidr-v4", "cidr-v6", "wildcard", "tcp", "destination-port"],
)
def test_listener_plane_and_port(docs, expect):
    snap = translate(to_resources(docs), PLANES)
    assert {(x.name, x.plane, x.port) for x in snap.listeners} == expect


def test_filter_chain_match_and_http_filters():
    fault = {
        "name": "fault",
        "typed_config": {
            "@type": T + "envoy.extensions.filters.http.fault.v3.HTTPFault",
            "abort": {"http_status": 503, "percentage": {"numerator": 25}},
        },
    }
    rl = {
        "name": "rl",
        "typed_config": {
            "@type": T + "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "rl",
            "token_bucket": {"max_tokens": 10, "tokens_per_fill": 5, "fill_interval": "0.5s"},
        },
    }
    opt = {
        "name": "unknown-but-optional",
        "is_optional": True,
        "typed_config": {"@type": T + "envoy.extensions.filters.http.cors.v3.Cors"},
    }
    doc = http_listener(filters=[fault, rl])
    doc["filter_chains"][0]["filter_chain_match"] = {
        "prefix_ranges": [{"address_prefix": "198.18.1.0", "prefix_len": 25}]
    }
    snap = translate(to_resources([doc, PASS]), PLANES)
    lsn = snap.listeners_of("oam")[0]
    assert lsn.prefixes == (IPNetwork("198.18.1.0/25"),)
    assert lsn.http_filters == (
        FaultFilter(abort_status=503, abort_percent=25.0),
        LocalRateLimit(max_tokens=10, tokens_per_fill=5, fill_interval_s=0.5),
    )
    assert translate(to_resources([http_listener(filters=[opt]), PASS]), PLANES).listeners[0].http_filters == ()


def test_per_route_local_rate_limit():
    per_route = {
        "rl": {
            "@type": T + "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "route",
            "token_bucket": {"max_tokens": 3, "tokens_per_fill": 1, "fill_interval": "2s"},
        }
    }
    docs = [http_listener(rds="r1"), routes(route={"cluster": "pass"}, typed_per_filter_config=per_route), PASS]
    route = only_route(translate(to_resources(docs), PLANES))
    assert route.rate_limit == LocalRateLimit(max_tokens=3, tokens_per_fill=1, fill_interval_s=2.0)
    other = {"f": {"@type": T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"}}
    docs[1] = routes(route={"cluster": "pass"}, typed_per_filter_config=other)
    with pytest.raises(ConfigError) as err:
        translate(to_resources(docs), PLANES)
    assert "typed_per_filter_config[f]" in err.value.path and "not supported" in str(err.value)


def test_route_action_fields():
    route = {
        "route": {
            "weighted_clusters": {"clusters": [{"name": "web", "weight": 3}, {"name": "pass", "weight": 1}]},
            "timeout": "2.5s",
            "idle_timeout": "60s",
            "prefix_rewrite": "/v2/",
            "host_rewrite_literal": "web.oam",
            "retry_policy": {
                "retry_on": "5xx,refused-stream",
                "num_retries": 4,
                "per_try_timeout": "0.5s",
                "retry_back_off": {"base_interval": "0.1s"},
            },
            "hash_policy": [{"header": {"header_name": "X-User"}}, {"connection_properties": {"source_ip": True}}],
            "request_mirror_policies": [{"cluster": "web", "runtime_fraction": {"default_value": {"numerator": 50}}}],
        }
    }
    snap = translate(to_resources([http_listener(rds="r1"), routes(**route), static_cluster(), PASS]), PLANES)
    act = only_route(snap).action
    assert [(w.name, w.weight) for w in act.weighted] == [("web", 3), ("pass", 1)]
    assert (act.timeout_s, act.idle_timeout_s, act.prefix_rewrite, act.host_rewrite) == (2.5, 60, "/v2/", "web.oam")
    assert act.retry.retry_on == {"5xx", "reset"} and act.retry.num_retries == 4 and act.retry.per_try_timeout_s == 0.5
    assert (act.retry.backoff_base_s, act.retry.backoff_max_s) == (0.1, pytest.approx(1.0))
    assert [(h.header, h.source_ip) for h in act.hash_policy] == [("x-user", False), (None, True)]
    assert [(m.cluster, m.fraction) for m in act.mirrors] == [("web", 0.5)]


def test_route_matches_redirect_direct_response_and_headers():
    rc = {
        "@type": T + "envoy.config.route.v3.RouteConfiguration",
        "name": "r1",
        "request_headers_to_add": [{"header": {"key": "X-Node", "value": "n1"}}],
        "virtual_hosts": [
            {
                "name": "vh",
                "domains": ["a.example", "*.b.example"],
                "response_headers_to_remove": ["server"],
                "routes": [
                    {
                        "match": {
                            "path": "/exact",
                            "headers": [
                                {"name": "X-Env", "string_match": {"exact": "prod"}},
                                {"name": "x-debug", "present_match": True, "invert_match": True},
                            ],
                            "query_parameters": [{"name": "v", "string_match": {"safe_regex": {"regex": "[0-9]+"}}}],
                        },
                        "route": {"cluster": "pass"},
                        "request_headers_to_add": [
                            {"header": {"key": "x-r", "value": "1"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                        ],
                    },
                    {
                        "match": {"safe_regex": {"regex": "/img/.*"}, "grpc": {}},
                        "redirect": {"host_redirect": "cdn", "response_code": "FOUND"},
                    },
                    {"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": "nope"}}},
                ],
            }
        ],
    }
    snap = translate(to_resources([http_listener(rds="r1"), rc, PASS]), PLANES)
    vh = snap.routes["r1"].virtual_hosts[0]
    assert vh.domains == ("a.example", "*.b.example")
    exact, redirect, direct = vh.routes
    assert exact.match.path == "/exact" and exact.match.prefix is None
    assert exact.match.headers == (
        HeaderMatch("x-env", exact="prod"),
        HeaderMatch("x-debug", present=True, invert=True),
    )
    assert exact.match.query[0].regex == "[0-9]+"
    assert [(h.name, h.value, h.append) for h in exact.request_headers_to_add] == [
        ("x-r", "1", False),
        ("x-node", "n1", True),
    ]
    assert exact.response_headers_to_remove == ("server",)
    assert redirect.redirect.host == "cdn" and redirect.redirect.code == 302 and redirect.action is None
    assert redirect.match.headers[-1] == HeaderMatch("content-type", prefix="application/grpc")
    assert direct.direct_response.status == 404 and direct.direct_response.body == b"nope"


def test_clusters_eds_static_and_options():
    eds = {
        "@type": T + "envoy.config.cluster.v3.Cluster",
        "name": "api",
        "type": "EDS",
        "lb_policy": "RING_HASH",
        "eds_cluster_config": {"service_name": "api-svc", "eds_config": {"ads": {}}},
        "connect_timeout": "0.25s",
        "circuit_breakers": {
            "thresholds": [{"max_connections": 7, "max_retries": 1}, {"priority": "HIGH", "max_connections": 99}]
        },
        "outlier_detection": {"consecutive_5xx": 2, "base_ejection_time": "10s"},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "metadata": {"filter_metadata": {"planemesh": {"plane": "oam"}}},
    }
    cla = {
        "@type": T + "envoy.config.endpoint.v3.ClusterLoadAssignment",
        "cluster_name": "api-svc",
        "endpoints": [
            {
                "locality": {"region": "eu", "zone": "z1"},
                "priority": 1,
                "lb_endpoints": [
                    {
                        "endpoint": {"address": {"socket_address": {"address": "198.18.1.7", "port_value": 80}}},
                        "load_balancing_weight": 5,
                        "health_status": "DRAINING",
                    }
                ],
            }
        ],
    }
    snap = translate(to_resources([eds, cla, static_cluster()]), PLANES)
    api = snap.clusters["api"]
    assert (api.kind, api.lb_policy, api.connect_timeout_s, api.http2, api.plane) == (
        ClusterKind.EDS,
        LbPolicy.RING_HASH,
        0.25,
        True,
        "oam",
    )
    assert (api.circuit_breakers.max_connections, api.circuit_breakers.max_retries) == (7, 1)
    assert api.outlier.consecutive_5xx == 2 and api.outlier.base_ejection_time_s == 10
    [ep] = api.endpoints
    assert (ep.address, ep.port, ep.weight, ep.priority, ep.locality, ep.healthy) == (
        "198.18.1.7",
        80,
        5,
        1,
        "eu/z1",
        False,
    )
    assert snap.clusters["web"].kind is ClusterKind.STATIC and snap.clusters["web"].endpoints[0].port == 8080


# ---- bad input -> ConfigError naming the resource ---------------------------------------------------


def _bad_port():
    return [tcp_listener(port=0), PASS]


def _tls_chain():
    doc = tcp_listener()
    doc["filter_chains"][0]["transport_socket"] = {
        "name": "tls",
        "typed_config": {"@type": T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"},
    }
    return [doc, PASS]


def _extra_network_filter():
    doc = tcp_listener()
    doc["filter_chains"][0]["filters"].insert(0, copy.deepcopy(doc["filter_chains"][0]["filters"][0]))
    return [doc, PASS]


BAD = [
    ("invalid-listener-ip", [tcp_listener(address="300.1.1.1"), PASS], "listener[t1].address", "not an IP"),
    ("invalid-port", _bad_port(), "listener[t1].address", "not a TCP port"),
    ("address-in-no-plane", [tcp_listener(address="10.9.9.9"), PASS], "listener[t1].address", "no plane"),
    ("unknown-plane", [http_listener(meta={"plane": "nope"}), PASS], "listener[l1].metadata", "unknown plane"),
    ("router-not-last", [http_listener(filters=[ROUTER]), PASS], "listener[l1]", "router filter must"),
    (
        "unknown-http-filter",
        [
            http_listener(
                filters=[
                    {
                        "name": "authz",
                        "typed_config": {"@type": T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"},
                    },
                ]
            ),
            PASS,
        ],
        "listener[l1].filter_chains[0].filters[0].http_filters[0]",
        "HTTP filter 'authz'",
    ),
    (
        "tls-without-certificate",
        _tls_chain(),
        "listener[t1].filter_chains[0].transport_socket.typed_config.common_tls_context",
        "needs a certificate",
    ),
    ("extra-network-filter", _extra_network_filter(), "listener[t1].filter_chains[0].filters[0]", "not supported"),
    (
        "unknown-listener-filter",
        [
            dict(
                tcp_listener(),
                listener_filters=[
                    {
                        "name": "pp",
                        "typed_config": {
                            "@type": T + "envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol"
                        },
                    }
                ],
            ),
            PASS,
        ],
        "listener[t1].listener_filters[0]",
        "not supported",
    ),
    (
        "route-to-unknown-cluster",
        [http_listener(rds="r1"), routes(route={"cluster": "ghost"}), PASS],
        "routes[r1]",
        "unknown cluster 'ghost'",
    ),
    ("tcp-to-unknown-cluster", [tcp_listener(cluster="ghost")], "listener[t1]", "unknown cluster 'ghost'"),
    ("missing-route-config", [http_listener(rds="r9"), PASS], "listeners[", "unknown route configuration 'r9'"),
    (
        "eds-without-assignment",
        [{"@type": T + "envoy.config.cluster.v3.Cluster", "name": "api", "type": "EDS"}],
        "cluster[api].eds_cluster_config",
        "ClusterLoadAssignment 'api'",
    ),
    ("endpoint-hostname", [static_cluster(address="web.example")], "cluster[web].load_assignment", "not an IP"),
    ("endpoint-port", [static_cluster(port=70000)], "cluster[web]", "not a TCP port"),
    (
        "dns-cluster-bad-name",
        [dict(static_cluster(address="-bad-.example"), type="STRICT_DNS")],
        "cluster[web].load_assignment",
        "valid DNS name",
    ),
    (
        "cluster-provided-on-static",
        [static_cluster(lb_policy="CLUSTER_PROVIDED")],
        "cluster[web].lb_policy",
        "ORIGINAL_DST",
    ),
    (
        "upstream-tls-without-context",
        [dict(static_cluster(), transport_socket={"name": "tls"})],
        "cluster[web].transport_socket.typed_config",
        "expected type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
    ),
    (
        "unsupported-retry-on",
        [
            http_listener(rds="r1"),
            routes(route={"cluster": "pass", "retry_policy": {"retry_on": "retriable-4xx"}}),
            PASS,
        ],
        "route_config[r1]",
        "retriable-4xx",
    ),
    (
        "bad-regex",
        [http_listener(rds="r1"), routes(match={"safe_regex": {"regex": "(["}}, route={"cluster": "pass"}), PASS],
        "route_config[r1].virtual_hosts[0].routes[0].match",
        "invalid regex",
    ),
    ("duplicate-port", [tcp_listener(name="a"), tcp_listener(name="b"), PASS], "listeners[1]", "already declared"),
    ("sla-field", [http_listener(meta={"plane": "oam", "sla": {"warp": 9}}), PASS], "listener[l1].metadata", "warp"),
    *(
        (
            f"sla-cpus-{name}",
            [http_listener(meta={"plane": "oam", "sla": {"cpus": cpus}}), PASS],
            "listener[l1].metadata.planemesh.sla.cpus",
            reason,
        )
        for name, cpus, reason in [
            ("syntax", "0-a", "not a CPU number or range"),
            ("offline", "4000", "not online on this node"),
            ("number", 1, "expected a string"),
        ]
    ),
]


def test_sla_cpus_from_listener_metadata():
    snap = translate(to_resources([http_listener(meta={"plane": "oam", "sla": {"cpus": "0"}}), PASS]), PLANES)
    assert snap.plane("oam").sla.cpus == "0"


@pytest.mark.parametrize(("docs", "path", "reason"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_config_error_naming_it(docs, path, reason):
    with pytest.raises(ConfigError) as err:
        translate(to_resources(docs), PLANES)
    assert path in str(err.value) and reason in str(err.value)


def test_every_bad_resource_is_named_in_one_error():
    docs = [tcp_listener(name="a", address="300.0.0.1"), static_cluster(name="b", address="x"), PASS]
    with pytest.raises(ConfigError) as err:
        translate(to_resources(docs), PLANES)
    assert "listener[a]" in str(err.value) and "cluster[b]" in str(err.value)


# ---- locality-weighted clusters (EDS LocalityLbEndpoints.load_balancing_weight) ---------------------


def locality_cluster(lb="ROUND_ROBIN", common=None, localities=None, policy=None):
    common = {"locality_weighted_lb_config": {}} if common is None else common
    localities = localities or [
        ("eu", "a", 3, "198.18.1.7"),
        ("eu", "b", 1, "198.18.1.8"),
        ("us", "", None, "198.18.1.9"),
    ]
    endpoints = []
    for region, zone, weight, address in localities:
        lle = {
            "locality": {"region": region, "zone": zone},
            "lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": address, "port_value": 80}}}}],
        }
        if weight is not None:
            lle["load_balancing_weight"] = weight
        endpoints.append(lle)
    doc = {"@type": T + "envoy.config.cluster.v3.Cluster", "name": "loc", "type": "STATIC", "lb_policy": lb,
           "common_lb_config": common, "load_assignment": {"cluster_name": "loc", "endpoints": endpoints}}  # fmt: skip
    if policy is not None:
        doc["load_assignment"]["policy"] = policy
    return doc


def test_locality_weights_translate():
    common = {"locality_weighted_lb_config": {}, "healthy_panic_threshold": {"value": 0}}
    snap = translate(to_resources([locality_cluster(common=common)]), PLANES)
    loc = snap.clusters["loc"]
    assert loc.locality_weighted
    assert [(ep.locality, ep.locality_weight) for ep in loc.endpoints] == [("eu/a", 3), ("eu/b", 1), ("us", 0)]
    plain = translate(to_resources([locality_cluster(common={}, policy={"overprovisioning_factor": 140})]), PLANES)
    assert not plain.clusters["loc"].locality_weighted  # weights kept, unused without locality_weighted_lb_config


LOCALITY_BAD = [
    ("with-ring-hash", locality_cluster(lb="RING_HASH"), "common_lb_config.locality_weighted_lb_config", "RING_HASH"),
    ("zone-aware", locality_cluster(common={"zone_aware_lb_config": {}}), "common_lb_config.zone_aware", "not supp"),
    (
        "two-weights-one-locality",
        locality_cluster(localities=[("eu", "a", 3, "198.18.1.7"), ("eu", "a", 2, "198.18.1.8")]),
        "endpoints[1].load_balancing_weight",
        "another weight",
    ),
    ("zero-weight", locality_cluster(localities=[("eu", "a", 0, "198.18.1.7")]), "load_balancing_weight", ">= 1"),
    ("overprovisioning", locality_cluster(policy={"overprovisioning_factor": 100}), "overprovisioning", "140"),
    ("drop-overloads", locality_cluster(policy={"drop_overloads": [{"category": "x"}]}), "drop_overloads", "not"),
]


@pytest.mark.parametrize(("doc", "path", "reason"), [b[1:] for b in LOCALITY_BAD], ids=[b[0] for b in LOCALITY_BAD])
def test_unsupported_locality_config_is_refused(doc, path, reason):
    with pytest.raises(ConfigError) as err:
        translate(to_resources([doc]), PLANES)
    assert path in str(err.value) and reason in str(err.value)


def test_hcm_http2_protocol_options_set_the_planes_h2_limits():
    h2 = {"max_concurrent_streams": 50, "max_outbound_control_frames": 500,
          "max_inbound_priority_frames_per_stream": 10, "initial_stream_window_size": 65536}  # fmt: skip
    snap = translate(to_resources([http_listener(http2_protocol_options=h2), PASS]), PLANES)
    sla = snap.plane("oam").sla
    assert (sla.h2_max_concurrent_streams, sla.h2_max_outbound_control_frames) == (50, 500)
    assert sla.h2_max_inbound_priority_frames_per_stream == 10
    assert sla.h2_max_consecutive_inbound_frames_with_empty_payload == 1  # not given: the default
    bad = http_listener(http2_protocol_options={"max_concurrent_streams": 0})
    with pytest.raises(ConfigError) as err:
        translate(to_resources([bad, PASS]), PLANES)
    assert err.value.path.endswith("http2_protocol_options.max_concurrent_streams")
