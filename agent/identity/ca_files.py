"""The CA's files (Istio's plugged-in CA layout) and the `planemesh ca` command (agent/cli.py finds it).

    DIR/root-cert.pem, root-key.pem                      `planemesh ca init --out DIR`
    DIR/ca-cert.pem, ca-key.pem, cert-chain.pem,         `planemesh ca intermediate --ca ROOTDIR --out DIR`
        root-cert.pem                                    (istiod's `cacerts` secret takes exactly these)
    DIR/cert-chain.pem, key.pem, root-cert.pem           `planemesh ca issue --ca DIR --spiffe ID --out DIR`

Keys are written only where --out says, mode 0600, never over an existing file. Without --out, `issue`
prints the PEM (chain, then key) on stdout.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from planemesh.agent.identity.ca import (
    DEFAULT_INTERMEDIATE_TTL_S,
    DEFAULT_ROOT_TTL_S,
    DEFAULT_WORKLOAD_TTL_S,
    CertError,
    CertificateAuthority,
    key_pem,
    load_ca,
    new_root,
    utcnow,
)
from planemesh.agent.identity.spiffe import SpiffeError, parse_spiffe_id
from planemesh.model.config import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90s', '30m', '24h', '365d' or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration such as 3600, 30m, 24h, 365d")
    value = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def write_new(path: Path, data: bytes, secret: bool = False) -> None:
    """Create `path` (never replace one): a key is 0600 from its first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_all(out: Path, files: dict[str, tuple[bytes, bool]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    existing = [name for name in files if (out / name).exists()]
    if existing:
        raise ConfigError("--out", f"{out}: {', '.join(existing)} already exist(s); remove them or pick another dir")
    for name, (data, secret) in files.items():
        write_new(out / name, data, secret)


def write_root_ca(out: Path, root: CertificateAuthority) -> None:
    """A root CA directory as `ca init` writes it and read_ca reads it (root-cert.pem, root-key.pem 0600)."""
    _write_all(out, {"root-cert.pem": (root.root_pem(), False), "root-key.pem": (_key(root), True)})


def read_ca(directory: Path) -> CertificateAuthority:
    """The signing CA of a directory: an intermediate (ca-*.pem) if present, else the root."""
    try:
        if (directory / "ca-cert.pem").exists():
            chain = directory / "cert-chain.pem"
            return load_ca(
                (directory / "ca-cert.pem").read_bytes(),
                (directory / "ca-key.pem").read_bytes(),
                chain.read_bytes() if chain.exists() else b"",
            )
        return load_ca((directory / "root-cert.pem").read_bytes(), (directory / "root-key.pem").read_bytes())
    except OSError as exc:
        raise ConfigError("--ca", f"{directory}: {exc.strerror}: {exc.filename}") from None
    except CertError as exc:
        raise ConfigError("--ca", f"{directory}: {exc}") from None


def _cmd_init(args: argparse.Namespace) -> int:
    try:
        root = new_root(args.trust_domain, now=utcnow(), common_name=args.name, ttl_s=args.ttl)
    except (CertError, SpiffeError) as exc:
        raise ConfigError("--trust-domain", str(exc)) from None
    write_root_ca(Path(args.out), root)
    print(f"root CA for trust domain {args.trust_domain} in {args.out} (root-cert.pem, root-key.pem)")
    return 0


def _key(ca: CertificateAuthority) -> bytes:
    return key_pem(ca.key)


def _cmd_intermediate(args: argparse.Namespace) -> int:
    parent = read_ca(Path(args.ca))
    try:
        inter = parent.intermediate(args.name, now=utcnow(), ttl_s=args.ttl)
    except CertError as exc:
        raise ConfigError("--ca", str(exc)) from None
    _write_all(
        Path(args.out),
        {
            "ca-cert.pem": (inter.cert.public_bytes(Encoding.PEM), False),
            "ca-key.pem": (_key(inter), True),
            "cert-chain.pem": (inter.chain_pem(), False),
            "root-cert.pem": (inter.root_pem(), False),
        },
    )
    print(f"intermediate CA {args.name!r} in {args.out} (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem)")
    return 0


def _cmd_issue(args: argparse.Namespace) -> int:
    ca = read_ca(Path(args.ca))
    try:
        if args.csr:
            issued = ca.issue_for_csr(Path(args.csr).read_bytes(), now=utcnow(), ttl_s=args.ttl)
        else:
            issued = ca.issue(parse_spiffe_id(args.spiffe), now=utcnow(), ttl_s=args.ttl)
    except OSError as exc:
        raise ConfigError("--csr", f"{exc.strerror}: {exc.filename}") from None
    except (CertError, SpiffeError) as exc:
        raise ConfigError("--csr" if args.csr else "--spiffe", str(exc)) from None
    files = {"cert-chain.pem": (issued.cert_chain_pem(), False), "root-cert.pem": (ca.root_pem(), False)}
    if issued.key is not None:
        files["key.pem"] = (issued.key_pem(), True)
    if args.out:
        _write_all(Path(args.out), files)
        print(f"{issued.spiffe_id} until {issued.not_after.isoformat()} in {args.out} ({', '.join(files)})")
    else:
        sys.stdout.buffer.write(issued.cert_chain_pem() + (issued.key_pem() if issued.key is not None else b""))
    return 0


def add_ca_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("ca", help="the built-in CA: create a root or intermediate, issue SPIFFE certificates")
    verbs = parser.add_subparsers(dest="verb", required=True)
    init = verbs.add_parser("init", help="create a self-signed root CA (ECDSA P-256)")
    init.add_argument("--out", required=True, help="directory for root-cert.pem and root-key.pem (created)")
    init.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default %(default)s)")
    init.add_argument("--name", default="planemesh root CA", help="subject common name")
    init.add_argument("--ttl", type=parse_duration, default=DEFAULT_ROOT_TTL_S, help="validity (default 3650d)")
    init.set_defaults(func=_cmd_init)
    inter = verbs.add_parser("intermediate", help="create an intermediate CA signed by --ca")
    inter.add_argument("--ca", required=True, help="directory of the signing CA")
    inter.add_argument("--out", required=True, help="directory for ca-cert.pem, ca-key.pem, cert-chain.pem (created)")
    inter.add_argument("--name", default="planemesh intermediate CA", help="subject common name")
    inter.add_argument("--ttl", type=parse_duration, default=DEFAULT_INTERMEDIATE_TTL_S, help="validity (365d)")
    inter.set_defaults(func=_cmd_intermediate)
    issue = verbs.add_parser("issue", help="issue a short-lived SPIFFE workload certificate")
    issue.add_argument("--ca", required=True, help="directory of the signing CA")
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--spiffe", help="spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> (new key)")
    who.add_argument("--csr", help="PEM CSR with one SPIFFE URI SAN (the key stays with its owner)")
    issue.add_argument("--ttl", type=parse_duration, default=DEFAULT_WORKLOAD_TTL_S, help="validity (default 24h)")
    issue.add_argument("--out", help="directory for cert-chain.pem, key.pem, root-cert.pem; default: PEM on stdout")
    issue.set_defaults(func=_cmd_issue)
