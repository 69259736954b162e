"""RBAC (what Istio's AuthorizationPolicy compiles to): translation of envoy.filters.http.rbac, refusal of what
planemesh cannot enforce, and evaluation over request facts (SPIFFE peer, source, method, path, port)."""

from __future__ import annotations

import pytest
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from google.protobuf import json_format

from planemesh.agent.rbac import RequestFacts, evaluate
from planemesh.model.config import ConfigError
from planemesh.xds.resources import pack
from planemesh.xds.translate_rbac import translate_rbac

pytestmark = pytest.mark.unit
AMF = "spiffe://cluster.local/ns/ran/sa/amf"

ISTIO_LIKE = {  # AuthorizationPolicy: ALLOW from sa amf (or 10/8) GET /api/* on port 8443
    "rules": {
        "action": "ALLOW",
        "policies": {
            "ns[ran]-policy[amf-only]-rule[0]": {
                "permissions": [{"and_rules": {"rules": [
                    {"or_rules": {"rules": [{"header": {"name": ":method", "string_match": {"exact": "GET"}}}]}},
                    {"or_rules": {"rules": [{"url_path": {"path": {"prefix": "/api/"}}}]}},
                    {"destination_port": 8443}]}}],
                "principals": [{"or_ids": {"ids": [
                    {"authenticated": {"principal_name": {"exact": AMF}}},
                    {"direct_remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}]}}],
            }
        },
    }
}  # fmt: skip


def rbac(doc: dict):
    return translate_rbac(pack(json_format.ParseDict(doc, rbac_pb2.RBAC())), "rbac")


def facts(method="GET", path="/api/x", port=8443, src="198.18.1.5", peer: str | None = AMF) -> RequestFacts:
    return RequestFacts({":method": method, ":path": path}, path, "198.18.1.10", port, src, peer)


@pytest.mark.parametrize(
    ("req", "allowed"),
    [
        (facts(), True),
        (facts(peer=None, src="10.1.2.3"), True),  # no certificate, but from 10/8
        (facts(method="POST"), False),
        (facts(path="/admin"), False),
        (facts(port=80), False),
        (facts(peer="spiffe://cluster.local/ns/ran/sa/smf"), False),
        (facts(peer=None), False),  # plaintext from elsewhere
    ],
)
def test_istio_like_allow_policy(req, allowed):
    decision, policy = evaluate(rbac(ISTIO_LIKE), req)
    assert decision is allowed
    assert (policy is not None) is allowed


def test_deny_action_and_not_rules():
    deny = rbac({"rules": {"action": "DENY", "policies": {"no-admin": {
        "permissions": [{"url_path": {"path": {"prefix": "/admin"}}}],
        "principals": [{"not_id": {"authenticated": {"principal_name": {"suffix": "/sa/ops"}}}}]}}}})  # fmt: skip
    assert evaluate(deny, facts(path="/admin/x")) == (False, "no-admin")
    assert evaluate(deny, facts(path="/admin/x", peer="spiffe://cluster.local/ns/ran/sa/ops"))[0] is True
    assert evaluate(deny, facts(path="/api"))[0] is True
    assert translate_rbac(pack(rbac_pb2.RBAC()), "rbac") is None  # no rules: no enforcement (Envoy)


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        ({"rules": {"action": "LOG"}}, "rules.action"),
        ({"shadow_rules": {"action": "ALLOW"}}, "rbac.shadow_rules"),
        ({"rules": {"policies": {"p": {"permissions": [{"metadata": {}}], "principals": [{"any": True}]}}}},
         "permissions[0].metadata"),
        ({"rules": {"policies": {"p": {"permissions": [{"any": True}], "principals": [
            {"header": {"name": "x", "safe_regex_match": {"regex": "a.*"}}}]}}}}, "principals[0].header"),
        ({"rules": {"policies": {"p": {"permissions": [{"any": True}]}}}}, "policies[p]"),
        ({"rules": {"policies": {"p": {"permissions": [{"any": True}],
                                       "principals": [{"source_ip": {"address_prefix": "nope"}}]}}}},
         "source_ip.address_prefix"),
    ],
)  # fmt: skip
def test_what_cannot_be_enforced_is_refused(doc, where):
    with pytest.raises(ConfigError) as err:
        rbac(doc)
    assert where in str(err.value)


def test_rbac_http_filter_translates_from_a_listener_file():
    from planemesh.agent.rbac import RbacFilter
    from planemesh.xds.translate import translate
    from tests.unit.test_xds_translate import PASS, PLANES, http_listener, to_resources

    flt = {"name": "envoy.filters.http.rbac",
           "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC", **ISTIO_LIKE}}
    snap = translate(to_resources([http_listener(filters=[flt]), PASS]), PLANES)  # fmt: skip
    filters = snap.listeners[0].http_filters
    assert len(filters) == 1 and isinstance(filters[0], RbacFilter) and filters[0].action == "allow"
