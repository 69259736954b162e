"""istio's CSR flow without I/O: the CSR a workload makes, the built-in CA's CreateCertificate answer,
and what the workload accepts back (agent/identity/csr.py, ca_service.py, istio_ca_proto.py)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from planemesh.agent.identity.ca import MAX_WORKLOAD_TTL_S, CertError, new_root, spiffe_ids, utcnow
from planemesh.agent.identity.ca_service import CsrRefused, CsrSigner, read_token_file
from planemesh.agent.identity.csr import accept_chain, new_csr
from planemesh.agent.identity.istio_ca_proto import IstioCertificateRequest, IstioCertificateResponse, Roots
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.model.config import ConfigError
from planemesh.xds.grpc_wire import StatusCode

AMF = parse_spiffe_id("spiffe://cluster.local/ns/ran/sa/amf")
SMF = parse_spiffe_id("spiffe://cluster.local/ns/ran/sa/smf")
NOW = utcnow()


def _signer(ca=None, tokens=None) -> CsrSigner:
    root = ca or new_root("cluster.local", now=NOW - dt.timedelta(hours=1))
    return CsrSigner(root, tokens or {"t-amf": AMF, "t-any": None}, ttl_s=3600, clock=lambda: NOW)


def _request(spiffe_id=AMF, ttl=0):
    key, csr = new_csr(spiffe_id)
    return key, IstioCertificateRequest(csr=csr.decode(), validity_duration=ttl)


def test_wire_format_is_istios_field_numbers() -> None:
    req = IstioCertificateRequest(csr="C", validity_duration=7)
    req.metadata.update({"ClusterID": "k"})
    # csr = 1 (tag 0x0a), validity_duration = 3 (0x18), metadata = 4 (0x22)
    assert req.SerializeToString()[:6] == b"\n\x01C\x18\x07\x22"
    resp = IstioCertificateResponse(cert_chain=["a"], root_cert=Roots(ca_cert=["r"]))
    assert resp.SerializeToString() == b"\n\x01a\x12\x03\n\x01r"  # cert_chain = 1, root_cert = 2 { ca_cert = 1 }


def test_csr_is_istio_agents_shape() -> None:
    key, csr_pem = new_csr(AMF)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid and csr.subject == x509.Name([])
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(AMF)]
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()


def test_signed_chain_is_accepted_with_half_life_rotation() -> None:
    signer = _signer()
    key, req = _request(ttl=600)
    resp = signer.sign(req, "Bearer t-amf")
    cert = accept_chain(list(resp.cert_chain), [], key, AMF, NOW)
    assert spiffe_ids(cert.leaf) == [str(AMF)] and signer.signed == 1
    life = cert.not_after - cert.leaf.not_valid_before_utc
    assert cert.rotate_at == cert.leaf.not_valid_before_utc + life / 2
    assert dt.timedelta(seconds=600) <= life <= dt.timedelta(seconds=660)  # asked 600 s (+ 60 s backdating)
    assert b"PRIVATE KEY" in cert.key_pem() and "PRIVATE" not in repr(cert)


def test_intermediate_ca_chain_and_root_cert_field() -> None:
    root = new_root("cluster.local", now=NOW - dt.timedelta(hours=1))
    inter = root.intermediate("node-1", now=NOW - dt.timedelta(hours=1))
    key, req = _request()
    resp = _signer(inter).sign(req, "Bearer t-any")
    assert len(resp.cert_chain) == 3  # leaf, intermediate, root (istiod's shape without root_cert)
    cert = accept_chain(list(resp.cert_chain), [], key, AMF, NOW)
    assert cert.intermediates == (inter.cert,) and cert.roots == (root.cert,)
    # the newer shape: roots in root_cert, cert_chain without them
    cert2 = accept_chain(list(resp.cert_chain[:2]), [resp.cert_chain[2]], key, AMF, NOW)
    assert cert2.roots == (root.cert,)


@pytest.mark.parametrize(
    ("auth", "why"),
    [(None, "no `authorization"), ("t-amf", "not `Bearer"), ("Bearer nope", "unknown bearer token")],
)
def test_bad_token_is_unauthenticated(auth, why) -> None:
    signer = _signer()
    with pytest.raises(CsrRefused, match=why) as err:
        signer.sign(_request()[1], auth)
    assert err.value.code is StatusCode.UNAUTHENTICATED and signer.refused == {"UNAUTHENTICATED": 1}


def _csr_without_san() -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return builder.sign(new_csr(AMF)[0], hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_bad_csr_is_invalid_argument() -> None:
    signer = _signer()
    _, good = _request()
    lines = good.csr.splitlines()
    tampered = "\n".join([*lines[:-2], lines[-2][:-8] + "AAAAAAA=", lines[-1]]) + "\n"
    cases = {
        "not a PEM certificate request": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----",
        "expected exactly one URI SAN": _csr_without_san(),
        "bytes, at most": "x" * 20000,
    }
    for why, csr in cases.items():
        with pytest.raises(CsrRefused, match=why) as err:
            signer.sign(IstioCertificateRequest(csr=csr), "Bearer t-amf")
        assert err.value.code is StatusCode.INVALID_ARGUMENT, why
    with pytest.raises(CsrRefused) as err:  # a flipped signature: unparseable or not verifying, never signed
        signer.sign(IstioCertificateRequest(csr=tampered), "Bearer t-amf")
    assert err.value.code is StatusCode.INVALID_ARGUMENT
    with pytest.raises(CsrRefused, match="validity_duration"):
        signer.sign(_request(ttl=MAX_WORKLOAD_TTL_S + 1)[1], "Bearer t-amf")
    assert signer.refused == {"INVALID_ARGUMENT": len(cases) + 2} and signer.signed == 0


def test_token_asks_only_for_its_identity() -> None:
    signer = _signer()
    with pytest.raises(CsrRefused, match=r"may ask for .*amf, the CSR asks for .*smf") as err:
        signer.sign(_request(SMF)[1], "Bearer t-amf")
    assert err.value.code is StatusCode.PERMISSION_DENIED
    _, req = _request(parse_spiffe_id("spiffe://other.domain/ns/a/sa/b"))
    with pytest.raises(CsrRefused, match="trust domain") as err:
        _signer(tokens={"t": None}).sign(req, "Bearer t")
    assert err.value.code is StatusCode.INVALID_ARGUMENT


def test_workload_refuses_a_bad_answer() -> None:
    signer = _signer()
    key, req = _request()
    good = list(signer.sign(req, "Bearer t-amf").cert_chain)
    not_ours = list(signer.sign(_request()[1], "Bearer t-amf").cert_chain)
    foreign_root = new_root("cluster.local", now=NOW).root_pem().decode()
    cases = {
        "not for our key": not_ours,
        "does not verify": [*good[:1], foreign_root],
        "cert_chain is empty": [],
        "no root": good[:1],
        "not a PEM certificate bundle": ["garbage", "garbage"],
    }
    for why, chain in cases.items():
        with pytest.raises(CertError, match=why):
            accept_chain(chain, [], key, AMF, NOW)
    with pytest.raises(CertError, match="we asked for"):
        accept_chain(good, [], key, SMF, NOW)
    with pytest.raises(CertError, match="does not verify"):  # expired by the time it is checked
        accept_chain(good, [], key, AMF, NOW + dt.timedelta(days=2))


def test_token_file(tmp_path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# lab tokens\nt-amf ran/amf\nt-all *   # any identity\n")
    assert read_token_file(path, "cluster.local") == {"t-amf": AMF, "t-all": None}
    bad = (("t-amf", "expected `TOKEN"), ("t ran/sa/x", "one path segment"), ("t ran", "NAMESPACE/"), ("", "no token"))
    for text, why in bad:
        path.write_text(text + "\n")
        with pytest.raises(ConfigError, match=why):
            read_token_file(path, "cluster.local")


def test_bootstrap_ca_section() -> None:
    from planemesh.xds.bootstrap import bootstrap_from_dict

    base = {
        "node": {"id": "n", "metadata": {"NAMESPACE": "ran", "SERVICE_ACCOUNT": "amf"}},
        "server": {"address": "127.0.0.1:15012", "tls": {"ca": "/r.pem", "server_name": "istiod"}, "token_file": "/t"},
        "planes": [{"name": "oam", "id": 1, "interfaces": ["eth0"], "cidrs": ["10.0.0.0/24"]}],
    }
    boot = bootstrap_from_dict({**base, "ca": {}})
    assert boot.identity == AMF  # istio-agent's defaults: the discovery address, root, name and token
    assert (boot.ca.address, boot.ca.root_cert, boot.ca.server_name, boot.ca.token_file) == (
        "127.0.0.1:15012",
        "/r.pem",
        "istiod",
        "/t",
    )
    assert bootstrap_from_dict(base).ca is None
    bad = [
        ({"ttl_s": 5}, "ca.ttl_s"),
        ({"token_file": "relative"}, "ca.token_file"),
        ({"address": "nowhere"}, "ca.address"),
        ({"colour": 1}, "ca.colour"),
    ]
    for ca, where in bad:
        with pytest.raises(ConfigError, match=where):
            bootstrap_from_dict({**base, "ca": ca})
    with pytest.raises(ConfigError, match="SERVICE_ACCOUNT"):
        bootstrap_from_dict({**base, "node": {"id": "n"}, "ca": {}})
