"""HBONE's sans-IO parts: CONNECT heads, the destination's decision, routes, settings, capture rules, certificates."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
import yaml

from planemesh.agent.hbone.capture import PLANE, capture_rules
from planemesh.agent.hbone.certs import CaCertSource
from planemesh.agent.hbone.node import main as node_main
from planemesh.agent.hbone.protocol import (
    HboneError,
    connect_headers,
    decide,
    format_authority,
    parse_authority,
    parse_connect,
)
from planemesh.agent.hbone.routes import HboneConfigError, Peer, Routes, parse_routes
from planemesh.agent.hbone.settings import Capture, parse_rbac, parse_settings
from planemesh.agent.identity.ca import new_root, utcnow
from planemesh.ebpf.abi import Action
from planemesh.ebpf.policy import PolicyRule

AMF = "spiffe://cluster.local/ns/ran/sa/amf"
SMF = "spiffe://cluster.local/ns/ran/sa/smf"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10.1.2.3:8080", ("10.1.2.3", 8080)), ("[fd00::1]:443", ("fd00::1", 443)), ("[FD00:0::1]:1", ("fd00::1", 1))],
)
def test_parse_authority(text: str, expected: tuple[str, int]) -> None:
    assert parse_authority(text) == expected


@pytest.mark.parametrize(
    "text",
    ["example.com:80", "10.1.2.3", "10.1.2.3:0", "10.1.2.3:65536", "10.1.2.3:8x", "fd00::1:80", "[fd00::1]", ":80", ""],
)
def test_parse_authority_refuses_names_and_bad_ports(text: str) -> None:
    with pytest.raises(HboneError) as err:
        parse_authority(text)
    assert err.value.status == 400


def test_connect_headers_round_trip_and_forwarded() -> None:
    assert format_authority("::ffff:10.0.0.1", 80) == "10.0.0.1:80"
    headers = connect_headers("fd00::2", 8080, "fd00::1")
    assert headers == [(":method", "CONNECT"), (":authority", "[fd00::2]:8080"), ("forwarded", 'for="[fd00::1]"')]
    req = parse_connect([(k.encode(), v.encode()) for k, v in headers])
    assert (req.dst_ip, req.dst_port) == ("fd00::2", 8080)
    assert connect_headers("10.0.0.2", 1, "10.0.0.1")[2] == ("forwarded", 'for="10.0.0.1"')


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(":method", "GET"), (":authority", "10.0.0.1:80")], 405),
        ([(":method", "CONNECT")], 400),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), (":protocol", "websocket")], 400),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), (":path", "/")], 400),
        ([(":method", "CONNECT"), (":authority", "name:80")], 400),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("x", "y" * 9000)], 431),
    ],
)
def test_parse_connect_refusals(headers: list[tuple[str, str]], status: int) -> None:
    with pytest.raises(HboneError) as err:
        parse_connect(headers)
    assert err.value.status == status


def _policy(action: str, name: str, principal: str, perm: dict) -> dict:
    who = {"authenticated": {"principal_name": {"exact": principal}}}
    return {"rules": {"action": action, "policies": {name: {"permissions": [perm], "principals": [who]}}}}


def _deny(principal: str, port: int | None = None) -> dict:
    return _policy("DENY", "p", principal, {"destination_port": port} if port else {"any": True})


def test_decide_local_pods_only_then_rbac_by_source_identity() -> None:
    req = parse_connect([(":method", "CONNECT"), (":authority", "10.0.2.2:8080")])
    local = {"10.0.2.2": SMF}
    assert decide(req, AMF, "10.0.0.1", {}, ()).status == 404  # not this node's pod: never relayed
    assert decide(req, AMF, "10.0.0.1", local, ()).status == 200
    denied = decide(req, AMF, "10.0.0.1", local, parse_rbac([_deny(AMF)]))
    assert (denied.status, denied.reason, denied.policy) == (403, "rbac_denied", "p")
    assert decide(req, SMF, "10.0.0.1", local, parse_rbac([_deny(AMF)])).status == 200
    assert decide(req, AMF, "10.0.0.1", local, parse_rbac([_deny(AMF, port=9090)])).status == 200  # other port
    allow_smf = _policy("ALLOW", "smf", SMF, {"any": True})
    refused = decide(req, AMF, "10.0.0.1", local, parse_rbac([allow_smf]))
    assert (refused.status, refused.policy) == (403, "no ALLOW policy matched")


def test_routes_longest_prefix_and_identities() -> None:
    routes = parse_routes({
        "workloads": {"10.0.1.2": AMF},
        "peers": [{"name": "wide", "address": "192.0.2.1", "cidrs": ["10.0.0.0/16"]},
                  {"name": "narrow", "address": "[fd00::2]:15009", "cidrs": ["10.0.2.0/24", "fd00:2::/64"]}],
    })  # fmt: skip
    assert routes.peer_for("10.0.2.9").name == "narrow"  # type: ignore[union-attr]
    assert routes.peer_for("10.0.3.9").name == "wide"  # type: ignore[union-attr]
    assert routes.peer_for("::ffff:10.0.2.9").name == "narrow"  # type: ignore[union-attr]
    assert routes.peer_for("fd00:2::5").address == ("fd00::2", 15009)  # type: ignore[union-attr]
    assert routes.peer_for("10.1.0.1") is None and routes.peer_for("garbage") is None
    assert routes.peers[0].address == ("192.0.2.1", 15008)
    assert routes.identity_of("::ffff:10.0.1.2") == AMF and routes.identity_of("10.0.1.3") is None


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"workloads": {"10.0.0.x": AMF}}, "workloads[10.0.0.x]"),
        ({"workloads": {"10.0.0.1": "http://x"}}, "workloads[10.0.0.1]"),
        ({"peers": [{"address": "10.0.0.1", "cidrs": ["10.0.0.0/33"]}]}, "peers[0].cidrs[0]"),
        ({"peers": [{"address": "10.0.0.1"}]}, "peers[0].cidrs"),
        ({"peers": [{"cidrs": ["10.0.0.0/8"]}]}, "peers[0].address"),
        ({"peers": [{"address": "node-b", "cidrs": ["10.0.0.0/8"]}]}, "peers[0].address"),
        ({"peers": [{"address": "10.0.0.1:0", "cidrs": ["10.0.0.0/8"]}]}, "peers[0].address"),
        ({"peers": [{"address": "10.0.0.1", "cidrs": ["10.0.0.0/8"], "tunnel": "h2"}]}, "peers[0].tunnel"),
        ({"peers": [{"address": "10.0.0.1", "cidrs": ["10.0.0.0/8"], "identity": "x"}]}, "peers[0].identity"),
    ],
)
def test_parse_routes_errors_name_the_field(raw: dict, field: str) -> None:
    with pytest.raises(HboneConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_routes(raw)


BASE = {"node": {"identity": "spiffe://cluster.local/ns/planemesh/sa/node-a"}, "ca": "/etc/planemesh/ca"}


def test_parse_settings() -> None:
    s = parse_settings({**BASE, "capture": {"port": 15001, "interfaces": ["eth1"], "ports": [8080]},
                        "rbac": [_deny(AMF)], "listen": "10.0.0.1"})  # fmt: skip
    assert s.listen == ("10.0.0.1", 15008) and s.capture == Capture(15001, ("eth1",), (8080,))
    assert len(s.rbacs) == 1 and s.rbacs[0].action == "deny"
    assert parse_settings(BASE).listen == ("::", 15008)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"nodes": 1}, "nodes: unknown field"),
        ({"node": {}}, "node.identity"),
        ({"ca": None}, "ca:"),
        ({"cert_ttl_s": 5}, "cert_ttl_s"),
        ({"capture": {"interfaces": [], "ports": [1]}}, "capture.interfaces"),
        ({"capture": {"interfaces": ["e"], "ports": [70000]}}, r"capture.ports\[0\]"),
        ({"capture": {"interfaces": ["e"], "ports": [1], "mode": "x"}}, "capture.mode"),
        ({"rbac": [{"rules": {"action": "LOG"}}]}, r"rbac\[0\]"),
        (
            {
                "rbac": [
                    {"rules": {"policies": {"p": {"permissions": [{"any": True}], "principals": [{"metadata": {}}]}}}}
                ]
            },
            r"rbac\[0\].rules.policies\[p\].principals\[0\]",
        ),
        ({"rbac": {"rules": {}}}, "rbac: a list"),
    ],
)
def test_parse_settings_errors_name_the_field(extra: dict, field: str) -> None:
    with pytest.raises(HboneConfigError, match=field):
        parse_settings({**BASE, **extra})


def test_capture_rules_one_proxy_rule_per_port_and_peer_cidr() -> None:
    routes = Routes(peers=(Peer("b", ("10.9.0.2", 15008), (ipaddress.ip_network("10.0.2.0/24"),
                                                           ipaddress.ip_network("fd00:2::/64"))),))  # fmt: skip
    rules = capture_rules(Capture(15001, ("eth0",), (80, 8080)), routes)
    assert rules == {
        PolicyRule(PLANE, port, cidr): Action.PROXY for port in (80, 8080) for cidr in ("10.0.2.0/24", "fd00:2::/64")
    }


def test_workload_certificates_are_issued_per_identity_and_renewed_at_half_life() -> None:
    now = [utcnow()]
    ca = new_root("cluster.local", now=now[0]).intermediate("node-a", now=now[0])
    certs = CaCertSource(ca, "spiffe://cluster.local/ns/planemesh/sa/node-a", ttl_s=3600, clock=lambda: now[0])
    first = certs.client_context(AMF)
    assert certs.client_context(AMF) is first and certs.issued == 1
    assert certs.client_context(SMF) is not first and certs.issued == 2
    server = certs.server_context()
    now[0] += dt.timedelta(seconds=1800 - 120)  # notBefore is 60 s early: half of 3660 s is 1770 s after issue
    assert certs.client_context(AMF) is first and certs.server_context() is server
    now[0] += dt.timedelta(seconds=121)
    assert certs.client_context(AMF) is not first and certs.server_context() is not server
    with pytest.raises(ValueError):
        certs.client_context("spiffe://other.domain/ns/a/sa/b")  # not this CA's trust domain


def test_the_node_command_exits_2_naming_the_bad_field(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "hbone.yaml"
    config.write_text("node: {identity: spiffe://cluster.local/ns/a/sa/b}\nca: /nonexistent\n"
                      "peers: [{address: 10.0.0.1, cidrs: [10.0.0.0/33]}]\n")  # fmt: skip
    assert node_main(["--config", str(config)]) == 2
    assert "peers[0].cidrs[0]: '10.0.0.0/33' is not an IP prefix" in capsys.readouterr().err
    config.write_text("node: {identity: spiffe://cluster.local/ns/a/sa/b}\nca: /nonexistent\n")
    assert node_main(["--config", str(config)]) == 2
    assert "/nonexistent" in capsys.readouterr().err
    config.write_text("{unclosed")
    assert node_main(["--config", str(config)]) == 2
    assert str(config) in capsys.readouterr().err


def test_the_settings_example_in_the_docs_parses() -> None:
    text = (Path(__file__).parents[2] / "docs" / "hbone.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    settings = parse_settings(yaml.safe_load(block)["hbone"])  # the agent's `hbone:` section
    assert settings.capture == Capture(15006, ("hbpa1",), (8080, 8081))
    assert settings.routes.peer_for("10.81.2.2").identity == "spiffe://cluster.local/ns/planemesh/sa/node-b"  # type: ignore[union-attr]
    assert settings.rbacs[0].action == "deny"
