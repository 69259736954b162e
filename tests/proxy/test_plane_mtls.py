"""Per-plane mTLS from the SLA, through real proxies and real clients: plane `ran` is strict with its own
certificate and trust domain, plane `media` permissive with another CA and trust domain, plane `oam`
disables TLS even where a listener terminates it. Every listener here is plain HTTP in xDS terms: the
plane's SLA alone decides."""

from __future__ import annotations

import socket
import ssl
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest

from planemesh.agent.identity.ca import key_pem, new_root, utcnow
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.agent.proxy.server import PlaneProxy
from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.model.config import TrafficDirection
from planemesh.model.planes import SLA
from planemesh.model.tls_config import CertSecret, TlsContext, TrustSecret
from tests.proxy.proxy_harness import Backend, ServingProxy, make_snapshot
from tests.proxy.test_tls_termination import get, refused

NOW = utcnow()
RAN_CA = new_root("ran.operator", now=NOW)
MEDIA_CA = new_root("media.operator", now=NOW)
RAN_GW = parse_spiffe_id("spiffe://ran.operator/ns/ran/sa/gw")
MEDIA_GW = parse_spiffe_id("spiffe://media.operator/ns/media/sa/gw")


@pytest.fixture(scope="module")
def clients(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("plane-certs")
    for name, ca, who in (("amf", RAN_CA, "spiffe://ran.operator/ns/ran/sa/amf"),
                          ("upf", MEDIA_CA, "spiffe://media.operator/ns/media/sa/upf")):  # fmt: skip
        issued = ca.issue(parse_spiffe_id(who), now=NOW)
        (d / f"{name}.pem").write_bytes(issued.cert_chain_pem())
        (d / f"{name}.key").write_bytes(key_pem(issued.key))
        (d / f"{name}-root.pem").write_bytes(ca.root_pem())
    return d


def ctx(clients: Path, who: str, root: str) -> ssl.SSLContext:
    c = ssl.create_default_context(cafile=str(clients / f"{root}-root.pem"))
    c.check_hostname = False
    c.load_cert_chain(clients / f"{who}.pem", clients / f"{who}.key")
    return c


def plane_proxy(plane: str, sla: SLA, backend: int, secrets: dict, tls_listener: bool = False,
                direction: TrafficDirection = TrafficDirection.UNSPECIFIED) -> ServingProxy:  # fmt: skip
    sock = make_listener_socket(0, transparent=False, host="127.0.0.1")
    base = make_snapshot(sock.getsockname()[1], [("127.0.0.1", backend)], sla=sla)
    [lsn] = base.listeners
    planes = (replace(base.planes[0], name=plane),)
    lsn = replace(lsn, plane=plane, direction=direction)
    if tls_listener:  # xDS says TLS only here
        lsn = replace(lsn, tls=TlsContext(cert="default", trust="ROOTCA", require_client_cert=True))
    snap = replace(base, planes=planes, listeners=(lsn,), secrets=MappingProxyType(secrets))
    return ServingProxy(PlaneProxy(snap, plane), sock)


def secrets_of(ca, who, cert: str = "default", trust: str = "ROOTCA") -> dict:
    issued = ca.issue(who, now=NOW)
    return {cert: CertSecret(issued.cert_chain_pem(), issued.key_pem()), trust: TrustSecret(ca.root_pem())}


def served_by(port: int, c: ssl.SSLContext) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, c.wrap_socket(raw) as s:
        return dict(x for x in s.getpeercert()["subjectAltName"])["URI"]


def test_each_plane_has_its_mode_certificate_and_trust_domain(clients: Path) -> None:
    ran_sla = SLA(mtls="strict", mtls_cert="ran-cert", mtls_trust="ran-roots", mtls_trust_domain="ran.operator")
    media_sla = SLA(mtls="permissive", mtls_trust_domain="media.operator")
    with Backend() as backend, \
            plane_proxy("ran", ran_sla, backend.port, secrets_of(RAN_CA, RAN_GW, "ran-cert", "ran-roots")) as ran, \
            plane_proxy("media", media_sla, backend.port, secrets_of(MEDIA_CA, MEDIA_GW)) as media:  # fmt: skip
        # ran: strict, its own certificate; a client of its trust domain is served, plaintext and media's are not
        assert get(ran.port, ctx(clients, "amf", "amf"), "/ran").startswith(b"HTTP/1.1 200")
        assert served_by(ran.port, ctx(clients, "amf", "amf")) == str(RAN_GW)
        assert refused(ran.port, None)
        assert refused(ran.port, ctx(clients, "upf", "amf"))  # media's CA: not ran's roots
        # media: permissive, another CA and trust domain; plaintext is served too
        assert get(media.port, ctx(clients, "upf", "upf"), "/media").startswith(b"HTTP/1.1 200")
        assert served_by(media.port, ctx(clients, "upf", "upf")) == str(MEDIA_GW)
        assert get(media.port, None, "/media-plain").startswith(b"HTTP/1.1 200")
        assert refused(media.port, ctx(clients, "amf", "upf"))  # ran's client: another CA
    assert ran.proxy.tls_stats.plaintext_refused == 1 and ran.proxy.tls_stats.peer_cert_refused == 1
    assert media.proxy.tls_stats.plaintext_accepted == 1
    seen = [p for _m, p, _h in backend.seen]
    assert seen.count("/ran") == 1 and "/media" in seen and "/media-plain" in seen


def test_trust_domain_is_enforced_with_shared_roots(clients: Path) -> None:
    """Same CA, other trust domain in the SAN: refused by the plane's trust-domain matcher."""
    both = new_root("ran.operator", now=NOW)
    outsider = both.issue(parse_spiffe_id("spiffe://ran.operator/ns/x/sa/y"), now=NOW)
    sla = SLA(mtls="strict", mtls_trust_domain="other.operator")
    with Backend() as backend, plane_proxy("ran", sla, backend.port, secrets_of(both, RAN_GW)) as px:
        d = clients / "td"
        d.mkdir(exist_ok=True)
        (d / "o.pem").write_bytes(outsider.cert_chain_pem())
        (d / "o.key").write_bytes(key_pem(outsider.key))
        c = ssl.create_default_context(cafile=None)
        c.check_hostname, c.verify_mode = False, ssl.CERT_NONE
        c.load_cert_chain(d / "o.pem", d / "o.key")
        assert refused(px.port, c)
        assert backend.seen == []
    assert px.proxy.tls_stats.san_refused == 1


def test_disable_serves_plaintext_where_xds_terminates_tls(clients: Path) -> None:
    with Backend() as backend, plane_proxy("oam", SLA(mtls="disable"), backend.port, secrets_of(RAN_CA, RAN_GW),
                                           tls_listener=True) as px:  # fmt: skip
        assert get(px.port, None, "/oam").startswith(b"HTTP/1.1 200")
    assert [p for _m, p, _h in backend.seen] == ["/oam"]
