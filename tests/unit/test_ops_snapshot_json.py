"""The generic dataclass <-> JSON codec behind /config_dump."""

from __future__ import annotations

import dataclasses
import json

import pytest

from planemesh.model.config import (
    Cluster,
    ClusterKind,
    DirectResponse,
    Endpoint,
    FaultFilter,
    HeaderMatch,
    Listener,
    ListenerProtocol,
    LocalRateLimit,
    RetryPolicy,
    Route,
    RouteAction,
    RouteConfig,
    RouteMatch,
    Snapshot,
    VirtualHost,
)
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import SLA
from planemesh.model.snapshot_json import DecodeError, from_jsonable, to_jsonable
from planemesh.model.static_config import load_default_config


def _rich_snapshot() -> Snapshot:
    base = load_default_config()
    routes = RouteConfig("r", (VirtualHost("v", ("a.example", "*"), (
        Route(RouteMatch(prefix=None, path="/x", headers=(HeaderMatch("x-a", exact="1", invert=True),)),
              RouteAction(cluster="c", retry=RetryPolicy(retry_on=frozenset({"5xx", "reset"}),
                                                         retriable_status_codes=frozenset({503, 502})))),
        Route(action=None, direct_response=DirectResponse(404, b"\xff\x00 not utf-8")),
        Route(action=None, direct_response=DirectResponse(200, b"hello")),
    )),))  # fmt: skip
    listener = Listener("x", "oam", 8443, ListenerProtocol.HTTP, (IPNetwork("198.18.1.0/25"),), "r",
                        (FaultFilter(delay_s=0.5, delay_percent=10), LocalRateLimit(10, 5, 1.0)))  # fmt: skip
    cluster = Cluster("c", ClusterKind.STATIC, (Endpoint("fd00:18:1::5", 80, weight=3),), http2=True, plane="oam")
    planes = (dataclasses.replace(base.planes[0], sla=SLA(rate_limit_rps=float("inf"))), *base.planes[1:])
    return dataclasses.replace(base, planes=planes, listeners=(*base.listeners, listener),
                               routes={"r": routes}, clusters={"c": cluster})  # fmt: skip


@pytest.mark.parametrize("snapshot", [load_default_config(), _rich_snapshot()], ids=["default", "rich"])
def test_round_trip_through_json_text(snapshot):
    text = json.dumps(to_jsonable(snapshot), allow_nan=False)
    assert from_jsonable(Snapshot, json.loads(text)) == snapshot


def test_encoding_is_readable():
    dumped = to_jsonable(_rich_snapshot())
    assert dumped["planes"][0]["cidrs"] == ["198.18.1.0/24", "fd00:18:1::/64"]
    assert dumped["planes"][0]["undeclared"] == "bypass"
    assert dumped["planes"][0]["sla"]["retry_on"] == ["connect-failure"]
    assert dumped["planes"][0]["sla"]["rate_limit_rps"] == "inf"
    routes = dumped["routes"]["r"]["virtual_hosts"][0]["routes"]
    assert routes[0]["action"]["retry"]["retriable_status_codes"] == [502, 503]
    assert routes[1]["direct_response"]["body"] == {"base64": "/wAgbm90IHV0Zi04"}
    assert routes[2]["direct_response"]["body"] == "hello"


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda d: d["planes"][0].update(plane_id="one"), "planes[0].plane_id"),
        (lambda d: d["planes"][1]["cidrs"].__setitem__(0, "not-a-cidr"), "planes[1].cidrs[0]"),
        (lambda d: d["listeners"][0].update(protocol="udp"), "listeners[0].protocol"),
        (lambda d: d["listeners"][0].update(surprise=1), "listeners[0].surprise"),
        (lambda d: d.update(planes={"oam": {}}), "planes"),
        (lambda d: d["planes"][0].pop("name"), "planes[0]"),
    ],
)
def test_bad_json_names_the_field(mutate, path):
    data = to_jsonable(load_default_config())
    mutate(data)
    with pytest.raises(DecodeError) as err:
        from_jsonable(Snapshot, data)
    assert err.value.path == path


def test_unknown_types_are_refused_clearly():
    with pytest.raises(TypeError, match="cannot convert object"):
        to_jsonable(object())
