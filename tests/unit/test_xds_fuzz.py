"""Malformed input never crashes: random bytes as resources -> a NACK or a ConfigError, nothing else."""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planemesh.model.config import ConfigError
from planemesh.model.static_config import load_default_config
from planemesh.xds.client_state import AdsClientState, ApplyConfig, Mode, SendRequest
from planemesh.xds.per_resource import translate_update
from planemesh.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from planemesh.xds.translate import translate

PLANES = load_default_config().planes
TYPES = [CLUSTER, ENDPOINT, LISTENER, ROUTE]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    response_type=st.sampled_from([*TYPES, "type.googleapis.com/bogus", ""]),
    delta=st.booleans(),
    items=st.lists(st.tuples(st.sampled_from([*TYPES, "junk"]), st.binary(max_size=80)), max_size=4),
)
def test_random_resources_never_crash_the_client(response_type, delta, items):
    state = AdsClientState(discovery_pb2.DiscoveryRequest().node, Mode.DELTA if delta else Mode.SOTW)
    state.stream_started(0.0)
    packed = [any_pb2.Any(type_url=t, value=v) for t, v in items]
    if delta:
        resp = discovery_pb2.DeltaDiscoveryResponse(type_url=response_type, nonce="n")
        for i, p in enumerate(packed):
            resp.resources.add(name=f"r{i}", resource=p)
    else:
        resp = discovery_pb2.DiscoveryResponse(type_url=response_type, version_info="1", nonce="n", resources=packed)
    actions = state.response_received(resp, 0.0)
    # Warming may hold an update back: fire the timeout so it reaches translation too.
    actions += state.timer_fired(100.0)
    for action in actions:
        if isinstance(action, ApplyConfig):
            try:
                translate(action.resources, PLANES)
            except ConfigError:
                pass
            rejected: dict = {}
            try:  # per resource, as the client does: a Translation, or one ConfigError
                got = translate_update(action.resources, PLANES, None, action.accepted)
                rejected = {t: dict(r) for t, r in got.rejected.items()}
                assert set(rejected) <= set(TYPES)
                error = None
            except ConfigError as exc:
                error = exc
            answers = state.apply_result(action.token, error, 100.0, rejected)
            assert all(isinstance(a, SendRequest) for a in answers)
        else:
            assert isinstance(action, SendRequest)


def _example_resources():
    from importlib import resources as importlib_resources

    from planemesh.xds.resources import parse_resource_text

    text = importlib_resources.files("planemesh.xds").joinpath("examples/two-planes.yaml").read_text()
    return parse_resource_text(text, "two-planes.yaml")


EXAMPLES = _example_resources()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(min_value=0, max_value=len(EXAMPLES) - 1),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=10_000), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_mutated_example_resources_translate_or_fail_with_config_error(which, flips):
    from types import MappingProxyType

    from google.protobuf.message import DecodeError

    from planemesh.xds.client_state import XdsResources
    from planemesh.xds.resources import resource_name, unpack

    by_type = {t: {} for t in TYPES}
    for i, p in enumerate(EXAMPLES):
        data = bytearray(p.value)
        if i == which:
            for pos, byte in flips:
                data[pos % len(data)] = byte
        try:
            msg = unpack(any_pb2.Any(type_url=p.type_url, value=bytes(data)), p.type_url)
        except Exception as exc:  # only the resource decoder's own error is allowed
            assert type(exc).__name__ == "ResourceError" or isinstance(exc, DecodeError), exc
            return
        by_type[p.type_url][resource_name(msg)] = msg
    res = XdsResources(
        *(MappingProxyType(by_type[t]) for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT)), versions=MappingProxyType({})
    )
    try:
        translate(res, PLANES)
    except ConfigError:
        pass
    accepted = {t: {} for t in TYPES}  # the unmutated set as the previously accepted one (the fallback)
    for p in EXAMPLES:
        msg = unpack(p, p.type_url)
        accepted[p.type_url][resource_name(msg)] = msg
    old = XdsResources(
        *(MappingProxyType(accepted[t]) for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT)), versions=MappingProxyType({})
    )
    try:
        got = translate_update(res, PLANES, None, old)
    except ConfigError:
        return
    for type_url, bad in got.rejected.items():
        assert type_url in TYPES and set(bad) <= set(by_type[type_url]) | set(accepted[type_url])
