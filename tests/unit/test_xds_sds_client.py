"""SDS in the client without I/O: secrets that listeners and clusters name are subscribed over the same ADS
stream, an update waits (warming) until they arrive, a rotated secret alone is applied, unreferenced ones
leave; translation turns Downstream/UpstreamTlsContext + secrets into the snapshot's TLS model, and a
malformed PEM (or a missing / wrong-kind secret) is a ConfigError naming it, which the client NACKs."""

from __future__ import annotations

import copy
import datetime as dt

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from google.protobuf import json_format

from planemesh.agent.identity.ca import new_root
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.model.config import ConfigError
from planemesh.model.tls_config import CertSecret, SanMatch, TrustSecret, san_accepts
from planemesh.xds.client_state import Mode
from planemesh.xds.resources import CLUSTER, LISTENER, SECRET, pack
from planemesh.xds.sds import root_secret, tls_certificate_secret
from planemesh.xds.translate import translate
from tests.unit.test_xds_client_state import applies, requests, sotw, started
from tests.unit.test_xds_translate import PLANES, http_listener, static_cluster, to_resources

pytestmark = pytest.mark.unit
T = "type.googleapis.com/"
NOW = dt.datetime.now(dt.UTC)
ROOT = new_root("cluster.local", now=NOW)
ISSUED = ROOT.issue(parse_spiffe_id("spiffe://cluster.local/ns/ran/sa/amf"), now=NOW)
SDS = {"ads": {}, "resource_api_version": "V3"}


def downstream(require=True, **common):
    ctx = {
        "@type": T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": require,
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": SDS}],
            "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": SDS},
            "alpn_protocols": ["h2", "http/1.1"],
            **common,
        },
    }
    return {"name": "envoy.transport_sockets.tls", "typed_config": ctx}


def tls_listener(transport=None, name="in", **kw) -> dict:
    doc = http_listener(name=name, address="198.18.1.10", port=8443, route_config={"name": f"{name}-r"})
    chain = doc["filter_chains"][0]
    chain["transport_socket"] = downstream(**kw)
    if transport:
        chain["filter_chain_match"] = {"transport_protocol": transport}
    return doc


def secrets(**overrides) -> dict[str, secret_pb2.Secret]:
    out = {"default": tls_certificate_secret(ISSUED), "ROOTCA": root_secret(ROOT.root_pem())}
    out.update(overrides)
    return out


def with_secrets(docs, received):
    res = to_resources(docs)
    return type(res)(res.listeners, res.routes, res.clusters, res.endpoints, res.versions, received)


def test_downstream_tls_translates_with_sds_secrets():
    snap = translate(with_secrets([tls_listener()], secrets()), PLANES)
    [lsn] = snap.listeners
    assert lsn.tls is not None and (lsn.tls.cert, lsn.tls.trust) == ("default", "ROOTCA")
    assert lsn.tls.require_client_cert and lsn.tls.alpn == ("h2", "http/1.1")
    assert (lsn.tls.min_version, lsn.tls.max_version) == ("TLSv1_2", "TLSv1_3")
    assert isinstance(snap.secrets["default"], CertSecret) and isinstance(snap.secrets["ROOTCA"], TrustSecret)
    assert snap.secrets["default"].chain_pem == ISSUED.cert_chain_pem()


def test_permissive_port_has_a_tls_and_a_plaintext_chain():
    doc = tls_listener("tls")
    plain = copy.deepcopy(doc["filter_chains"][0])
    plain["filter_chain_match"] = {"transport_protocol": "raw_buffer"}
    del plain["transport_socket"]
    plain["filters"][0]["typed_config"]["route_config"]["name"] = "plain-r"
    doc["filter_chains"].append(plain)
    doc["filter_chains"][1]["name"] = "plain"
    doc["filter_chains"][0]["name"] = "mtls"
    snap = translate(with_secrets([doc], secrets()), PLANES)
    by = {lsn.name: lsn for lsn in snap.listeners}
    assert by["mtls"].transport_protocol == "tls" and by["mtls"].tls is not None
    assert by["plain"].transport_protocol == "raw_buffer" and by["plain"].tls is None


def _pem_error(received, docs=None) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        translate(with_secrets(docs or [tls_listener()], received), PLANES)
    return err.value


def test_malformed_pem_names_the_secret():
    broken = tls_certificate_secret(ISSUED)
    broken.tls_certificate.certificate_chain.inline_bytes = (
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    err = _pem_error(secrets(default=broken))
    assert "secret[default].tls_certificate.certificate_chain" in str(err)
    other = ROOT.issue(parse_spiffe_id("spiffe://cluster.local/ns/a/sa/b"), now=NOW)
    mismatched = tls_certificate_secret(ISSUED)
    mismatched.tls_certificate.private_key.inline_bytes = other.key_pem()
    assert "secret[default].tls_certificate.private_key: does not belong" in str(
        _pem_error(secrets(default=mismatched))
    )
    bad_root = root_secret(b"not pem")
    assert "secret[ROOTCA].validation_context.trusted_ca" in str(_pem_error(secrets(ROOTCA=bad_root)))


def test_missing_or_wrong_kind_secret_is_named_at_its_user():
    err = _pem_error({"default": tls_certificate_secret(ISSUED)})
    assert "secret 'ROOTCA' has not arrived" in str(err) and "listener[in].filter_chains[0].transport_socket" in str(
        err
    )
    err = _pem_error(secrets(default=root_secret(ROOT.root_pem(), name="default")))
    assert "secret 'default' is not a tls_certificate" in str(err)


def test_refusals():
    for common, where in (
        ({"tls_params": {"ecdh_curves": ["P-256"]}}, "tls_params.ecdh_curves"),
        ({"tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_2"}},
         "tls_params"),
        ({"tls_certificates": [{"certificate_chain": {"filename": "/etc/k"}, "private_key": {"filename": "/k"}}]},
         "tls_certificates[0].certificate_chain"),
    ):  # fmt: skip
        assert where in str(_pem_error(secrets(), [tls_listener(**common)]))
    doc = tls_listener()
    doc["filter_chains"][0]["filter_chain_match"] = {"transport_protocol": "quic"}
    assert "expected tls or raw_buffer" in str(_pem_error(secrets(), [doc]))


def test_upstream_tls_with_spiffe_san():
    cluster = static_cluster()
    ctx = tls_pb2.UpstreamTlsContext(sni="amf.ran.svc")
    common = ctx.common_tls_context
    common.tls_certificate_sds_secret_configs.add(name="default").sds_config.ads.SetInParent()
    common.alpn_protocols.extend(["istio-peer-exchange", "istio"])
    combined = common.combined_validation_context
    combined.validation_context_sds_secret_config.name = "ROOTCA"
    combined.default_validation_context.match_typed_subject_alt_names.add(
        san_type=common_pb2.SubjectAltNameMatcher.URI
    ).matcher.exact = "spiffe://cluster.local/ns/ran/sa/amf"
    cluster["transport_socket"] = {"name": "tls", "typed_config": dict(json_format.MessageToDict(pack(ctx)))}
    snap = translate(with_secrets([cluster], secrets()), PLANES)
    tls = snap.clusters["web"].tls
    assert tls.sni == "amf.ran.svc" and tls.alpn == ("istio-peer-exchange", "istio")
    assert tls.san == (SanMatch("uri", exact="spiffe://cluster.local/ns/ran/sa/amf"),)
    assert san_accepts(tls.san, ["spiffe://cluster.local/ns/ran/sa/amf"], [])
    assert not san_accepts(tls.san, ["spiffe://cluster.local/ns/ran/sa/smf"], [])
    assert set(snap.secrets) == {"default", "ROOTCA"}


def _listener_msg():
    from planemesh.xds.resources import MESSAGE_OF_TYPE

    doc = tls_listener()
    doc.pop("@type", None)
    return json_format.ParseDict(doc, MESSAGE_OF_TYPE[LISTENER](), ignore_unknown_fields=False)


@pytest.mark.parametrize("mode", [Mode.SOTW])
def test_client_subscribes_waits_for_secrets_and_applies_a_rotation_alone(mode):
    st = started(mode)
    [apply] = applies(st.response_received(sotw(CLUSTER, "1", "c1"), 0.0))
    st.apply_result(apply.token, None, 0.0)
    actions = st.response_received(sotw(LISTENER, "1", "l1", _listener_msg()), 1.0)
    assert applies(actions) == []  # warming: the listener's secrets have not arrived
    [sub] = requests(actions, SECRET)
    assert sorted(sub.resource_names) == ["ROOTCA", "default"]
    first = secrets()
    [apply] = applies(st.response_received(sotw(SECRET, "1", "s1", *first.values()), 1.5))
    assert set(apply.resources.secrets) == {"default", "ROOTCA"} and set(apply.resources.listeners) == {"in"}
    snap = translate(apply.resources, PLANES)  # the consumer translates; it works
    assert snap.listeners[0].tls.cert == "default"
    acks = requests(st.apply_result(apply.token, None, 1.5))
    assert {r.type_url for r in acks} == {LISTENER, SECRET}
    rotated = ROOT.issue(parse_spiffe_id("spiffe://cluster.local/ns/ran/sa/amf"), now=NOW)
    [apply] = applies(st.response_received(sotw(SECRET, "2", "s2", tls_certificate_secret(rotated)), 2.0))
    new = translate(apply.resources, PLANES)
    assert new.secrets["default"].chain_pem == rotated.cert_chain_pem() and "ROOTCA" in new.secrets  # SotW SDS adds
    requests(st.apply_result(apply.token, None, 2.0))
    bad = tls_certificate_secret(rotated)
    bad.tls_certificate.private_key.inline_bytes = b"garbage"
    [apply] = applies(st.response_received(sotw(SECRET, "3", "s3", bad), 3.0))
    with pytest.raises(ConfigError) as err:
        translate(apply.resources, PLANES)
    [nack] = requests(st.apply_result(apply.token, err.value, 3.0))
    assert nack.type_url == SECRET and nack.version_info == "2" and nack.response_nonce == "s3"
    assert "secret[default].tls_certificate.private_key" in nack.error_detail.message
    gone = st.response_received(sotw(LISTENER, "2", "l2"), 4.0)  # the listener leaves: so do its secrets
    [apply] = applies(gone)
    assert translate(apply.resources, PLANES).secrets == {}  # unreferenced secrets are not in the snapshot
    after = requests(st.apply_result(apply.token, None, 4.0), SECRET)
    assert [list(r.resource_names) for r in after] == [[]] and st.types[SECRET].cache == {}  # unsubscribed


def test_cluster_secrets_are_subscribed_too():
    c = cluster_pb2.Cluster(name="up", type=cluster_pb2.Cluster.ORIGINAL_DST)
    ctx = tls_pb2.UpstreamTlsContext()
    ctx.common_tls_context.validation_context_sds_secret_config.name = "ROOTCA"
    c.transport_socket.name = "tls"
    c.transport_socket.typed_config.CopyFrom(pack(ctx))
    st = started()
    actions = st.response_received(sotw(CLUSTER, "1", "c1", c), 0.0)
    assert applies(actions) == [] and [list(r.resource_names) for r in requests(actions, SECRET)] == [["ROOTCA"]]


def test_private_keys_are_redacted_in_dumps_and_reprs():
    from planemesh.model.snapshot_json import to_jsonable

    snap = translate(with_secrets([tls_listener()], secrets()), PLANES)
    dumped = str(to_jsonable(snap))
    assert "PRIVATE KEY" not in dumped and "[redacted]" in dumped and "BEGIN CERTIFICATE" in dumped
    assert "PRIVATE KEY" not in repr(snap)


def test_xfcc_settings_translate_and_always_forward_is_refused():
    doc = tls_listener()
    hcm = doc["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["forward_client_cert_details"] = "APPEND_FORWARD"
    hcm["set_current_client_cert_details"] = {"uri": True, "subject": True}
    [lsn] = translate(with_secrets([doc], secrets()), PLANES).listeners
    assert (lsn.forward_client_cert, lsn.client_cert_details) == ("append_forward", ("subject", "uri"))
    [plain] = translate(with_secrets([tls_listener()], secrets()), PLANES).listeners
    assert (plain.forward_client_cert, plain.client_cert_details) == ("sanitize", ())  # Envoy's default
    hcm["forward_client_cert_details"] = "ALWAYS_FORWARD_ONLY"
    assert "forward_client_cert_details: ALWAYS_FORWARD_ONLY is not supported" in str(_pem_error(secrets(), [doc]))
    hcm["forward_client_cert_details"] = "SANITIZE_SET"
    hcm["set_current_client_cert_details"] = {"cert": True}
    assert "set_current_client_cert_details.cert" in str(_pem_error(secrets(), [doc]))


def test_unknown_ciphers_and_bad_alpn_are_refused_at_translation():
    err = _pem_error(secrets(), [tls_listener(tls_params={"cipher_suites": ["NOT-A-CIPHER"]})])
    assert "tls_params.cipher_suites: none of ['NOT-A-CIPHER']" in str(err)
    err = _pem_error(secrets(), [tls_listener(alpn_protocols=["h2", "caf\u00e9"])])
    assert "alpn_protocols[1]" in str(err)
    ok = translate(with_secrets([tls_listener(tls_params={"cipher_suites": ["ECDHE-ECDSA-AES128-GCM-SHA256"]})],
                                secrets()), PLANES)  # fmt: skip
    assert ok.listeners[0].tls.ciphers == ("ECDHE-ECDSA-AES128-GCM-SHA256",)


ISTIO_SDS = {  # how istiod points Envoy at istio-agent's SDS server (fetched over ADS by planemesh)
    "api_config_source": {"api_type": "GRPC", "set_node_on_first_message_only": True, "transport_api_version": "V3",
                          "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]},
    "initial_fetch_timeout": "0s", "resource_api_version": "V3",
}  # fmt: skip


def test_istio_shaped_inbound_mtls_chain_translates():
    """The DownstreamTlsContext istiod writes for a STRICT/PERMISSIVE inbound chain (istio's
    pilot/pkg/security authn builder, structurally): TLS params and cipher list, ALPN, SDS `default` and
    `ROOTCA` through sds-grpc, SAN prefix of the trust domain."""
    doc = tls_listener("tls", require=True)
    doc["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"] = {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3",
                       "cipher_suites": ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
                                         "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
                                         "AES256-GCM-SHA384", "AES128-GCM-SHA256"]},
        "alpn_protocols": ["h2", "http/1.1"],
        "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": ISTIO_SDS}],
        "combined_validation_context": {
            "default_validation_context": {"match_subject_alt_names": [{"prefix": "spiffe://cluster.local/"}]},
            "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": ISTIO_SDS}},
    }  # fmt: skip
    doc["filter_chains"][0]["filter_chain_match"]["application_protocols"] = ["istio-peer-exchange", "istio"]
    snap = translate(with_secrets([doc], secrets()), PLANES)
    tls = snap.listeners[0].tls
    assert (tls.cert, tls.trust, tls.require_client_cert) == ("default", "ROOTCA", True)
    assert tls.san == (SanMatch("any", prefix="spiffe://cluster.local/"),) and len(tls.ciphers) == 6
    assert san_accepts(tls.san, ["spiffe://cluster.local/ns/ran/sa/amf"], [])
    assert not san_accepts(tls.san, ["spiffe://evil.org/ns/ran/sa/amf"], [])


def istio_outbound_cluster() -> dict:
    """An Istio outbound cluster's auto-mTLS: endpoints labelled tlsMode=istio get mTLS, others plaintext."""
    ctx = {
        "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": "outbound_.8080_._.udm.ran.svc.cluster.local",
        "common_tls_context": {
            "alpn_protocols": ["istio-peer-exchange", "istio"],
            "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": ISTIO_SDS}],
            "combined_validation_context": {
                "default_validation_context": {"match_subject_alt_names": [{"exact": "spiffe://cluster.local/ns/ran/sa/udm"}]},
                "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": ISTIO_SDS}}},
    }  # fmt: skip
    doc = static_cluster(name="udm")
    doc["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["metadata"] = {
        "filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}
    }
    doc["load_assignment"]["endpoints"][0]["lb_endpoints"].append(
        {"endpoint": {"address": {"socket_address": {"address": "198.18.1.21", "port_value": 8080}}}}
    )
    doc["transport_socket_matches"] = [
        {"name": "tlsMode-istio", "match": {"tlsMode": "istio"},
         "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": ctx}},
        {"name": "tlsMode-disabled", "match": {},
         "transport_socket": {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {
             "@type": T + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}},
    ]  # fmt: skip
    return doc


def test_istio_transport_socket_matches_pick_tls_per_endpoint():
    from planemesh.model.tls_config import endpoint_tls

    snap = translate(with_secrets([istio_outbound_cluster()], secrets()), PLANES)
    c = snap.clusters["udm"]
    labelled, plain = c.endpoints
    assert labelled.tls_labels == (("tlsMode", "istio"),) and labelled.tls_socket == 0 and plain.tls_socket == -1
    assert c.tls is None and c.tls_matches[0].tls.sni == "outbound_.8080_._.udm.ran.svc.cluster.local"
    assert endpoint_tls(c, labelled, ("198.18.1.20", 8080)).alpn == ("istio-peer-exchange", "istio")
    assert endpoint_tls(c, plain, ("198.18.1.21", 8080)) is None
    assert endpoint_tls(c, None, ("198.18.1.20", 8080)) is c.tls_matches[0].tls  # a retry's fallback address
    assert set(snap.secrets) == {"default", "ROOTCA"}
