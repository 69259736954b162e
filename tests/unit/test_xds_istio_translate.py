"""Translation of the shapes istiod sends (table-driven): accepted with their meaning, accepted without effect
(noted with a reason), or refused by name when ignoring them would be unsafe."""

from __future__ import annotations

import copy
import datetime as dt

import pytest

from planemesh.agent.identity.ca import new_root
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.agent.rbac import RbacFilter
from planemesh.model.config import ConfigError, ListenerProtocol
from planemesh.model.ip import IPNetwork
from planemesh.xds.translate import translate
from planemesh.xds.translate_common import collect_ignored, stop_collecting
from tests.unit.test_xds_translate import HCM, PASS, PLANES, ROUTER, T, to_resources

RAW = {"name": "raw", "typed_config": {"@type": T + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}
_NOW = dt.datetime.now(dt.UTC)
_ISSUED = new_root("cluster.local", now=_NOW).issue(parse_spiffe_id("spiffe://cluster.local/ns/a/sa/b"), now=_NOW)
# An inline certificate: TLS is terminated now (xds/translate_tls.py), so a TLS chain needs one.
TLS_DOWN = {
    "name": "tls",
    "typed_config": {
        "@type": T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": {
            "tls_certificates": [
                {
                    "certificate_chain": {"inline_string": _ISSUED.cert_chain_pem().decode()},
                    "private_key": {"inline_string": _ISSUED.key_pem().decode()},
                }
            ]
        },
    },
}
TLS_UP = {"name": "tls", "typed_config": {"@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"}}
STATS = {"name": "istio.stats", "typed_config": {"@type": T + "stats.PluginConfig"}}
MX_STRUCT = {
    "name": "istio.metadata_exchange",
    "typed_config": {
        "@type": T + "udpa.type.v1.TypedStruct",
        "type_url": T + "envoy.tcp.metadataexchange.config.MetadataExchange",
        "value": {"protocol": "istio-peer-exchange"},
    },
}


def tcp(cluster="pass"):
    return {
        "name": "tcp",
        "typed_config": {
            "@type": T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": cluster,
            "cluster": cluster,
        },
    }


def hcm(filters=(), **fields):
    rc = {
        "name": "r",
        "virtual_hosts": [
            {"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "pass"}}]}
        ],
    }
    return {
        "name": "hcm",
        "typed_config": {
            "@type": HCM,
            "stat_prefix": "s",
            "route_config": rc,
            "http_filters": [*filters, ROUTER],
            **fields,
        },
    }


def listener(chains, name="l", address="0.0.0.0", port=9080, default=None, **extra):
    doc = {
        "@type": T + "envoy.config.listener.v3.Listener",
        "name": name,
        "address": {"socket_address": {"address": address, "port_value": port}},
        "filter_chains": chains,
        **extra,
    }
    if default is not None:
        doc["default_filter_chain"] = default
    return doc


def cluster(**fields):
    return {"@type": T + "envoy.config.cluster.v3.Cluster", "name": "c", "type": "STATIC", **fields}


def run(docs):
    notes, token = collect_ignored()
    try:
        return translate(to_resources([*docs, PASS]), PLANES), notes
    finally:
        stop_collecting(token)


ORIGINAL_DST_LF = {
    "name": "envoy.filters.listener.original_dst",
    "typed_config": {"@type": T + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"},
}

ACCEPTED = [
    (
        "vip-listener-not-bound-serves-every-plane-for-its-vip",
        [listener([{"filters": [STATS, MX_STRUCT, tcp()]}], address="10.96.0.10", port=53, bind_to_port=False)],
        lambda s: (
            {(x.plane, x.port, x.prefixes) for x in s.listeners}
            == {(p.name, 53, (IPNetwork("10.96.0.10/32"),)) for p in PLANES}
        ),
    ),
    (
        "two-vips-on-one-port",
        [
            listener([{"filters": [tcp()]}], name="a", address="10.96.0.1", port=443, bind_to_port=False),
            listener([{"filters": [tcp()]}], name="b", address="10.96.0.2", port=443, bind_to_port=False),
        ],
        lambda s: len(s.listeners) == 2 * len(PLANES),
    ),
    (
        "http-chain-with-tcp-default-is-sniffed",
        [
            listener(
                [{"filter_chain_match": {"application_protocols": ["http/1.1", "h2c"]}, "filters": [hcm()]}],
                default={"filters": [tcp()]},
                bind_to_port=False,
            )
        ],
        lambda s: all(x.protocol is ListenerProtocol.HTTP and x.sniff for x in s.listeners),
    ),
    (
        "registry-only-http-port-is-not-sniffed",  # non-HTTP bytes must not pass where istio blackholes them
        [
            listener(
                [{"filter_chain_match": {"application_protocols": ["http/1.1"]}, "filters": [hcm()]}],
                default={"filters": [tcp("BlackHoleCluster")]},
                bind_to_port=False,
            ),
            cluster(name="BlackHoleCluster"),
        ],
        lambda s: all(x.protocol is ListenerProtocol.HTTP and not x.sniff for x in s.listeners),
    ),
    (
        "use-original-dst-dispatcher-declares-nothing",
        [listener([{"filters": [STATS, tcp()]}], name="virtualOutbound", port=15001, use_original_dst=True)],
        lambda s: s.listeners == (),
    ),
    (
        "virtual-inbound-port-chains-permissive",
        [
            listener(
                [
                    {"filter_chain_match": {"destination_port": 15006}, "filters": [tcp()]},
                    {"filter_chain_match": {"transport_protocol": "raw_buffer"}, "filters": [tcp()]},
                    {
                        "filter_chain_match": {"destination_port": 9080, "transport_protocol": "tls"},
                        "filters": [hcm()],
                        "transport_socket": TLS_DOWN,
                    },
                    {
                        "filter_chain_match": {"destination_port": 9080, "transport_protocol": "raw_buffer"},
                        "filters": [hcm()],
                    },
                ],
                name="virtualInbound",
                port=15006,
                listener_filters=[ORIGINAL_DST_LF],
            )
        ],
        # TLS is terminated now: the mTLS chain is a TLS listener, its raw_buffer twin the plaintext one
        lambda s: (
            {(x.port, x.protocol, x.sniff, x.transport_protocol, x.tls is not None) for x in s.listeners}
            == {
                (9080, ListenerProtocol.HTTP, False, "tls", True),
                (9080, ListenerProtocol.HTTP, False, "raw_buffer", False),
            }
        ),
    ),
    (
        "strict-mtls-http-chain-terminates-tls",  # refused before TLS existed ("terminates no TLS yet")
        [
            listener(
                [
                    {
                        "filter_chain_match": {"transport_protocol": "tls"},
                        "filters": [hcm()],
                        "transport_socket": TLS_DOWN,
                    }
                ]
            )
        ],
        lambda s: (
            [(x.protocol, x.transport_protocol, x.tls is not None) for x in s.listeners]
            == [(ListenerProtocol.HTTP, "tls", True)] * len(PLANES)
        ),
    ),
    (
        "permissive-tcp-over-tls-chain-is-terminated-next-to-its-plaintext-twin",  # agent/proxy/tcp_tls.py
        [
            listener(
                [
                    {
                        "filter_chain_match": {"transport_protocol": "tls"},
                        "filters": [tcp()],
                        "transport_socket": TLS_DOWN,
                    },
                    {"filter_chain_match": {"transport_protocol": "raw_buffer"}, "filters": [tcp()]},
                ]
            )
        ],
        lambda s: {(x.protocol, x.tls is not None, x.transport_protocol) for x in s.listeners}
        == {(ListenerProtocol.TCP, False, "raw_buffer"), (ListenerProtocol.TCP, True, "tls")},
    ),
    (
        "strict-mtls-only-tls-tcp-chain-is-terminated",  # before tcp_tls.py: refused (no TLS for TCP)
        [
            listener(
                [
                    {
                        "filter_chain_match": {"transport_protocol": "tls"},
                        "filters": [tcp()],
                        "transport_socket": TLS_DOWN,
                    }
                ]
            )
        ],
        lambda s: {(x.protocol, x.tls is not None) for x in s.listeners} == {(ListenerProtocol.TCP, True)},
    ),
    (
        "tls-upstream-with-http2-is-originated",  # before: refused (TLS origination spoke HTTP/1.1 only)
        [cluster(transport_socket=TLS_UP, http2_protocol_options={})],
        lambda s: s.clusters["c"].http2 and s.clusters["c"].tls is not None,
    ),
    (
        "enforcing-rbac-is-enforced",  # refused before HTTP RBAC existed (xds/translate_rbac.py)
        [
            listener(
                [
                    {
                        "filters": [
                            hcm(
                                [
                                    {
                                        "name": "rbac",
                                        "typed_config": {
                                            "@type": T + "envoy.extensions.filters.http.rbac.v3.RBAC",
                                            "rules": {},
                                        },
                                    }
                                ]
                            )
                        ]
                    }
                ]
            )
        ],
        lambda s: all(
            [f for f in x.http_filters if isinstance(f, RbacFilter)] == [RbacFilter("allow", ())] for x in s.listeners
        ),
    ),
    (
        "tls-upstream-originates-tls",  # refused before TLS origination existed
        [cluster(transport_socket=TLS_UP)],
        lambda s: s.clusters["c"].tls is not None,
    ),
    (
        "tls-only-transport-socket-matches-originate-tls-for-every-endpoint",
        [cluster(transport_socket_matches=[{"name": "tls", "match": {}, "transport_socket": TLS_UP}])],
        lambda s: s.clusters["c"].tls is not None and s.clusters["c"].tls_matches == (),
    ),
    (
        "hcm-fields-istiod-sets",
        [
            listener(
                [
                    {
                        "filters": [
                            hcm(
                                request_id_extension={
                                    "typed_config": {
                                        "@type": T + "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig"
                                    }
                                },
                                stream_idle_timeout="0s",
                                normalize_path=True,
                                use_remote_address=False,
                                forward_client_cert_details="APPEND_FORWARD",
                                set_current_client_cert_details={"subject": True, "uri": True},
                                upgrade_configs=[{"upgrade_type": "websocket"}],
                            )
                        ]
                    }
                ]
            )
        ],
        lambda s: s.listeners[0].upgrades[0].upgrade_type == "websocket",
    ),
    (
        "hcm-without-tracing-adds-no-trace-context",  # Envoy: no tracer, the client's trace headers pass as they are
        [listener([{"filters": [hcm()]}])],
        lambda s: s.listeners[0].trace_sampling is None,
    ),
    (
        "hcm-tracing-as-istiod-sets-it",  # random_sampling x overall_sampling; the decorations are accepted
        [
            listener(
                [
                    {
                        "filters": [
                            hcm(
                                tracing={
                                    "client_sampling": {"value": 100},
                                    "random_sampling": {"value": 1},
                                    "overall_sampling": {"value": 50},
                                    "custom_tags": [{"tag": "istio.mesh_id", "literal": {"value": "m"}}],
                                }
                            )
                        ]
                    }
                ]
            )
        ],
        lambda s: s.listeners[0].trace_sampling == 0.5,
    ),
    (
        "hcm-tracing-defaults-sample-every-new-trace",
        [listener([{"filters": [hcm(tracing={})]}])],
        lambda s: s.listeners[0].trace_sampling == 100.0,
    ),
    (
        "istio-http-filters-and-stats-only-filters",
        [
            listener(
                [
                    {
                        "filters": [
                            hcm(
                                [
                                    {
                                        "name": "istio.metadata_exchange",
                                        "typed_config": {"@type": T + "io.istio.http.peer_metadata.Config"},
                                    },
                                    {
                                        "name": "istio_authn",
                                        "typed_config": {
                                            "@type": T + "xds.type.v3.TypedStruct",
                                            "type_url": T + "io.istio.network.authn.Config",
                                        },
                                    },
                                    {
                                        "name": "grpc_stats",
                                        "typed_config": {
                                            "@type": T + "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"
                                        },
                                    },
                                    {
                                        "name": "cors",
                                        "typed_config": {"@type": T + "envoy.extensions.filters.http.cors.v3.Cors"},
                                    },
                                    {
                                        "name": "fault",
                                        "typed_config": {
                                            "@type": T + "envoy.extensions.filters.http.fault.v3.HTTPFault"
                                        },
                                    },
                                    {
                                        "name": "rbac",
                                        "typed_config": {
                                            "@type": T + "envoy.extensions.filters.http.rbac.v3.RBAC",
                                            "shadow_rules": {},
                                        },
                                    },
                                    STATS,
                                ]
                            )
                        ]
                    }
                ]
            )
        ],
        lambda s: len(s.listeners[0].http_filters) == 1,  # the (empty) fault filter
    ),
    (
        "static-cluster-without-endpoints-blackhole",
        [cluster(name="BlackHoleCluster")],
        lambda s: s.clusters["BlackHoleCluster"].endpoints == (),
    ),
    (
        "transport-socket-matches-with-plaintext-twin",
        [
            cluster(
                transport_socket_matches=[
                    {"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": TLS_UP},
                    {"name": "tlsMode-disabled", "match": {}, "transport_socket": RAW},
                ],
                upstream_bind_config={"source_address": {"address": "127.0.0.6", "port_value": 0}},
                filters=[MX_STRUCT],
                load_assignment={"cluster_name": "c"},
            )
        ],
        lambda s: "c" in s.clusters,
    ),
    (
        "downstream-protocol-options",
        [
            cluster(
                typed_extension_protocol_options={
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "use_downstream_protocol_config": {"http_protocol_options": {}, "http2_protocol_options": {}},
                    }
                }
            )
        ],
        lambda s: not s.clusters["c"].http2 and s.clusters["c"].downstream_protocol,
    ),
]


@pytest.mark.parametrize(("docs", "check"), [a[1:] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_istiod_shapes_are_accepted(docs, check):
    snap, _notes = run(copy.deepcopy(docs))
    assert check(snap)


def test_istiod_retry_policy_keeps_what_planemesh_can_do():
    rc = {
        "@type": T + "envoy.config.route.v3.RouteConfiguration",
        "name": "r",
        "ignore_port_in_host_matching": True,
        "virtual_hosts": [
            {
                "name": "v",
                "domains": ["*"],
                "include_request_attempt_count": True,
                "routes": [
                    {
                        "match": {"prefix": "/"},
                        "route": {
                            "cluster": "pass",
                            "max_grpc_timeout": "0s",
                            "max_stream_duration": {"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"},
                            "retry_policy": {
                                "retry_on": "connect-failure,refused-stream,unavailable,cancelled,"
                                "retriable-status-codes",
                                "num_retries": 2,
                                "retry_host_predicate": [
                                    {
                                        "name": "envoy.retry_host_predicates.previous_hosts",
                                        "typed_config": {
                                            "@type": T
                                            + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                                        },
                                    }
                                ],
                                "host_selection_retry_max_attempts": "5",
                                "retriable_status_codes": [503],
                            },
                        },
                    }
                ],
            }
        ],
    }
    docs = [listener([{"filters": [hcm()]}], port=80), rc]
    docs[0]["filter_chains"][0]["filters"][0]["typed_config"].pop("route_config")
    docs[0]["filter_chains"][0]["filters"][0]["typed_config"]["rds"] = {
        "route_config_name": "r",
        "config_source": {"ads": {}},
    }
    snap, notes = run(docs)
    retry = snap.routes["r"].virtual_hosts[0].routes[0].action.retry
    assert retry.retry_on == {"connect-failure", "reset", "retriable-status-codes"} and retry.num_retries == 2
    noted = {path.rsplit(".", 1)[-1] for path, _why in notes}
    assert {"unavailable", "cancelled", "retry_host_predicate", "max_stream_duration", "max_grpc_timeout"} <= noted
    assert {"include_request_attempt_count", "ignore_port_in_host_matching"} <= noted


REFUSED = [
    (
        "registry-only-virtual-outbound",  # ignoring it would open egress istio blocks
        [
            listener(
                [
                    {"filter_chain_match": {"destination_port": 15001}, "filters": [tcp("BlackHoleCluster")]},
                    {"filters": [tcp("BlackHoleCluster")]},
                ],
                name="virtualOutbound",
                port=15001,
                use_original_dst=True,
            ),
            cluster(name="BlackHoleCluster"),
        ],
        "filter_chains[1]",
        "REGISTRY_ONLY",
    ),
    (
        "enforcing-network-rbac-on-http-chain",  # enforced on tcp_proxy chains (tests/unit/test_network_rbac.py)
        [
            listener(
                [
                    {
                        "filters": [
                            {
                                "name": "rbac",
                                "typed_config": {
                                    "@type": T + "envoy.extensions.filters.network.rbac.v3.RBAC",
                                    "stat_prefix": "x",
                                    "rules": {},
                                },
                            },
                            hcm(),
                        ]
                    }
                ]
            )
        ],
        "filters[0]",
        "RBAC enforcement",
    ),
    (
        "unknown-typed-struct",
        [
            listener(
                [
                    {
                        "filters": [
                            {
                                "name": "x",
                                "typed_config": {
                                    "@type": T + "udpa.type.v1.TypedStruct",
                                    "type_url": T + "acme.Filter",
                                },
                            },
                            tcp(),
                        ]
                    }
                ]
            )
        ],
        "filters[0]",
        "not supported",
    ),
    (
        "user-wasm-not-istio",
        [
            listener(
                [
                    {
                        "filters": [
                            hcm(
                                [
                                    {
                                        "name": "mine",
                                        "typed_config": {
                                            "@type": T + "udpa.type.v1.TypedStruct",
                                            "type_url": T + "envoy.extensions.filters.http.wasm.v3.Wasm",
                                        },
                                    }
                                ]
                            )
                        ]
                    }
                ]
            )
        ],
        "http_filters[0]",
        "not supported",
    ),
    ("upstream-filter-not-istio", [cluster(filters=[tcp()])], "filters[0]", "not supported"),
    (
        "tracing-sampling-over-100-percent",
        [listener([{"filters": [hcm(tracing={"random_sampling": {"value": 150}})]}])],
        "tracing.random_sampling",
        "not a percentage",
    ),
    (
        "success-rate-ejection",
        [cluster(outlier_detection={"enforcing_success_rate": 100})],
        "enforcing_success_rate",
        "success-rate",
    ),
    (
        "http-chains-differing-only-by-alpn-with-other-routes",
        [
            listener(
                [
                    {"filter_chain_match": {"application_protocols": ["h2c"]}, "filters": [hcm()]},
                    {
                        "filter_chain_match": {"application_protocols": ["http/1.1"]},
                        "filters": [hcm(generate_request_id=False, upgrade_configs=[{"upgrade_type": "websocket"}])],
                    },
                ]
            )
        ],
        "filter_chains[1]",
        "cannot choose",
    ),
]


@pytest.mark.parametrize(("docs", "where", "reason"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_unsafe_to_ignore_is_refused_by_name(docs, where, reason):
    with pytest.raises(ConfigError) as err:
        run(copy.deepcopy(docs))
    assert where in str(err.value) and reason in str(err.value)


def _auto_mtls_cluster() -> dict:
    """istiod's auto-mTLS cluster: tlsMode=istio endpoints over mTLS (SDS `default`/`ROOTCA`), others plaintext."""
    sds = {"ads": {}, "resource_api_version": "V3"}
    tls = {
        "name": "tls",
        "typed_config": {
            "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds}],
                "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": sds},
            },
        },
    }
    lbe = {
        "endpoint": {"address": {"socket_address": {"address": "10.0.0.9", "port_value": 80}}},
        "metadata": {"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}},
    }
    return cluster(
        load_assignment={"cluster_name": "c", "endpoints": [{"lb_endpoints": [lbe]}]},
        transport_socket_matches=[
            {"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": tls},
            {"name": "tlsMode-disabled", "match": {}, "transport_socket": RAW},
        ],
    )


@pytest.mark.parametrize("served", [True, False], ids=["secrets-served", "no-secrets"])
def test_auto_mtls_originates_tls_when_its_secrets_are_served_else_keeps_the_plaintext_match(served):
    from planemesh.xds.per_resource import translate_update
    from planemesh.xds.sds import root_secret, tls_certificate_secret

    root = new_root("cluster.local", now=_NOW)
    issued = root.issue(parse_spiffe_id("spiffe://cluster.local/ns/a/sa/b"), now=_NOW)
    received = {"default": tls_certificate_secret(issued), "ROOTCA": root_secret(root.root_pem())} if served else {}
    res = to_resources([_auto_mtls_cluster(), PASS])
    res = type(res)(res.listeners, res.routes, res.clusters, res.endpoints, res.versions, received)
    for snap in (translate(res, PLANES), translate_update(res, PLANES).snapshot):  # whole and per resource
        c = snap.clusters["c"]
        if served:
            assert [m.labels for m in c.tls_matches] == [(("tlsMode", "istio"),)] and c.endpoints[0].tls_socket == 0
            assert set(snap.secrets) == {"default", "ROOTCA"}
        else:  # istiod without istio-agent's SDS: plaintext, as before TLS existed (noted), not a NACK
            assert c.tls is None and c.tls_matches == () and c.endpoints[0].tls_socket == -1
            assert dict(snap.secrets) == {}
