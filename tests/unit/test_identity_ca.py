"""The built-in CA: chains that verify (cryptography's RFC 5280 verifier and openssl), SPIFFE SANs, validity,
and refusals (wrong trust domain, expired CA, foreign CSR, bad IDs); the `planemesh ca` command's files."""

from __future__ import annotations

import datetime as dt
import os
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from planemesh.agent.cli import main as cli_main
from planemesh.agent.identity.ca import (
    BACKDATE_S,
    CertError,
    key_pem,
    load_ca,
    load_certs,
    new_key,
    new_root,
    spiffe_ids,
    verify_workload,
)
from planemesh.agent.identity.spiffe import SpiffeError, istio_identity, parse_spiffe_id

pytestmark = pytest.mark.unit
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
WEB = parse_spiffe_id("spiffe://cluster.local/ns/default/sa/web")


@pytest.fixture(scope="module")
def root():
    return new_root("cluster.local", now=NOW)


@pytest.fixture(scope="module")
def inter(root):
    return root.intermediate("node-1", now=NOW)


def test_spiffe_ids_parse_and_refuse():
    sid = istio_identity("cluster.local", "default", "web")
    assert str(sid) == "spiffe://cluster.local/ns/default/sa/web"
    assert (sid.namespace, sid.service_account) == ("default", "web")
    for bad in (
        "http://x/ns/a",
        "spiffe://UPPER/ns/a",
        "spiffe://td/ns//sa/b",
        "spiffe://td/a/../b",
        "spiffe://td:80/a",
        "spiffe://td/a?b",
        "spiffe://",
        "spiffe://td/" + "a" * 3000,
    ):
        with pytest.raises(SpiffeError):
            parse_spiffe_id(bad)


def test_workload_chain_verifies_with_spiffe_san(root, inter):
    issued = inter.issue(WEB, now=NOW, ttl_s=3600)
    assert verify_workload(issued.cert, issued.chain, [root.cert], NOW + dt.timedelta(minutes=1)) == WEB
    cert = issued.cert
    assert spiffe_ids(cert) == [str(WEB)]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and len(cert.subject) == 0  # Istio's shape: empty subject, critical SAN
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(seconds=3600 + BACKDATE_S)
    assert [c.subject for c in issued.chain] == [inter.cert.subject, root.cert.subject]


def test_validity_is_enforced(root, inter):
    issued = inter.issue(WEB, now=NOW, ttl_s=600)
    with pytest.raises(CertError, match="does not verify"):
        verify_workload(issued.cert, issued.chain, [root.cert], NOW + dt.timedelta(seconds=601))  # expired
    with pytest.raises(CertError, match="does not verify"):
        verify_workload(issued.cert, issued.chain, [root.cert], NOW - dt.timedelta(hours=1))  # not yet valid


def test_wrong_root_and_missing_intermediate_are_refused(root, inter):
    other = new_root("cluster.local", now=NOW)
    issued = inter.issue(WEB, now=NOW)
    with pytest.raises(CertError):
        verify_workload(issued.cert, issued.chain, [other.cert], NOW)
    with pytest.raises(CertError):
        verify_workload(issued.cert, [], [root.cert], NOW)


def test_refusals(root, inter):
    with pytest.raises(CertError, match="trust domain"):
        inter.issue(parse_spiffe_id("spiffe://other.td/ns/a/sa/b"), now=NOW)
    with pytest.raises(CertError, match="expired"):
        inter.issue(WEB, now=NOW + dt.timedelta(days=400))
    with pytest.raises(CertError, match="maximum"):
        inter.issue(WEB, now=NOW, ttl_s=200 * 86400)
    with pytest.raises(SpiffeError):
        new_root("Not A Domain", now=NOW)


def test_nothing_outlives_its_ca(root):
    short = root.intermediate("short", now=NOW, ttl_s=3600)
    issued = short.issue(WEB, now=NOW, ttl_s=86400)
    assert issued.not_after == short.cert.not_valid_after_utc


def test_csr_keeps_the_key_with_its_owner(root, inter):
    key = new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(WEB))]), critical=True)
        .sign(key, hashes.SHA256())
    )
    issued = inter.issue_for_csr(csr.public_bytes(Encoding.PEM), now=NOW)
    assert issued.key is None and issued.cert.public_key() == key.public_key()
    with pytest.raises(CertError, match="stays with the requester"):
        issued.key_pem()
    with pytest.raises(CertError, match="not a PEM"):
        inter.issue_for_csr(b"garbage", now=NOW)


def test_pem_round_trip_and_bad_pem(inter):
    loaded = load_ca(inter.chain_pem(), key_pem(inter.key))
    assert loaded.cert == inter.cert and loaded.parents == inter.parents and loaded.trust_domain == "cluster.local"
    with pytest.raises(CertError, match="not a PEM"):
        load_certs(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", "x")
    with pytest.raises(CertError, match=r"^x: "):
        load_certs(b"", "x")


def test_cli_writes_an_istio_cacerts_layout_that_openssl_verifies(tmp_path, capsys):
    assert cli_main(["ca", "init", "--out", str(tmp_path / "root"), "--trust-domain", "example.org"]) == 0
    assert cli_main(["ca", "intermediate", "--ca", str(tmp_path / "root"), "--out", str(tmp_path / "int")]) == 0
    spiffe = "spiffe://example.org/ns/ran/sa/amf"
    args = ["ca", "issue", "--ca", str(tmp_path / "int"), "--spiffe", spiffe, "--ttl", "2h"]
    assert cli_main([*args, "--out", str(tmp_path / "amf")]) == 0
    for key in ("root/root-key.pem", "int/ca-key.pem", "amf/key.pem"):
        assert os.stat(tmp_path / key).st_mode & 0o777 == 0o600
    out = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            tmp_path / "root/root-cert.pem",
            "-untrusted",
            tmp_path / "int/ca-cert.pem",
            tmp_path / "amf/cert-chain.pem",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    capsys.readouterr()
    assert cli_main(args) == 0  # no --out: PEM on stdout, nothing written
    printed = capsys.readouterr().out
    assert printed.count("BEGIN CERTIFICATE") == 3 and "BEGIN PRIVATE KEY" in printed
    assert cli_main(["ca", "init", "--out", str(tmp_path / "root")]) == 2  # never overwrites a key
    assert cli_main(["ca", "issue", "--ca", str(tmp_path / "int"), "--spiffe", "spiffe://x.org/a"]) == 2
    assert cli_main(["ca", "issue", "--ca", str(tmp_path / "nowhere"), "--spiffe", spiffe]) == 2
