"""x-forwarded-client-cert (XFCC), Envoy's header for the client certificate of an mTLS connection. Pure.

The HTTP connection manager's `forward_client_cert_details` decides (Envoy's semantics; the default sanitizes):
  sanitize        the header never goes upstream (whatever the client sent)
  forward_only    kept on mTLS connections, removed on others
  append_forward  kept on mTLS connections, and this proxy's element appended; removed on others
  sanitize_set    the client's removed; on mTLS connections this proxy's element set
Element: `By=<our URI SAN>;Hash=<sha256 of the client certificate, hex>;URI=<client URI SAN>` plus `DNS=...` and
`Subject="..."` when `set_current_client_cert_details` asks (Envoy's order: By, Hash, Cert, Chain, Subject,
URI, DNS).
"""

from __future__ import annotations

from planemesh.agent.lazy_modules import load
from planemesh.agent.proxy.http1 import HOP_BY_HOP
from planemesh.model.config import XFCC_DETAILS, XFCC_MODES

XFCC = b"x-forwarded-client-cert"
DROP_WITH_XFCC = HOP_BY_HOP | {XFCC}
MODES = XFCC_MODES
DETAILS = XFCC_DETAILS


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def element(
    by: str | None, peer_der: bytes, subject: str, uris: list[str], dns: list[str], details: tuple[str, ...]
) -> bytes:
    parts = []
    if by:
        parts.append(f"By={by}")
    parts.append(f"Hash={load('hashlib').sha256(peer_der).hexdigest()}")  # mTLS only: no libcrypto at rest
    if "subject" in details:
        parts.append(f"Subject={_quote(subject)}")
    if "uri" in details:
        parts += [f"URI={u}" for u in uris]
    if "dns" in details:
        parts += [f"DNS={d}" for d in dns]
    return ";".join(parts).encode("latin-1", "replace")


def combined(transport, prior: list[bytes]) -> bytes | None:
    """The x-forwarded-client-cert value to send upstream for a request on `transport`, given the client's
    values (`prior`); None: send none. Plaintext connections sanitize."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    decided = getattr(ssl_object, "planemesh_xfcc", None) if ssl_object is not None else None
    if decided is None:
        return None
    keep, ours = decided
    values = (prior if keep else []) + ([ours] if ours is not None else [])
    return b", ".join(values) if values else None


def connection_xfcc(mode: str, mtls: bool, make_element) -> tuple[bool, bytes | None]:
    """(keep the client's header, our element or None) for one connection."""
    if not mtls:
        return False, None
    keep = mode in ("forward_only", "append_forward")
    value = make_element() if mode in ("append_forward", "sanitize_set") else None
    return keep, value
