"""Who an ADS stream is, as istiod decides it on its TLS port 15012 (pilot/pkg/xds/auth.go). Pure.

`authenticate`: the stream's `authorization: Bearer <JWT>` must be the server's one token, or one of the tokens
it knows with their identity (namespace, service account), the way istiod's TokenReview answers for a
service-account JWT. `identity_mismatch`: once the stream's node is known, a token's identity must be that
node's (istiod's checkConnectionIdentity): a token of another namespace or service account is refused with
PERMISSION_DENIED, which is why a node agent needs each pod's own token there (docs/install-istio.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Identity = tuple[str, str]  # (namespace, service account)


def authenticate(
    authorization: str | None, bearer_token: str | None, identities: Mapping[str, Identity] | None
) -> tuple[Identity | None, str | None]:
    """(the token's identity or None, None) when the stream may go on; (None, why) when it is refused."""
    token = authorization[7:] if authorization is not None and authorization.startswith("Bearer ") else None
    if token is not None and identities and token in identities:
        return identities[token], None
    if token is not None and token == bearer_token:
        return None, None
    return None, "no authorization metadata" if authorization is None else "wrong bearer token"


def identity_mismatch(node: Any, identity: Identity) -> str | None:
    """Why a stream's node is not the token's identity, None when it is: a sidecar's namespace is its NAMESPACE
    metadata, else its node id's `<ns>.svc...` part; an empty SERVICE_ACCOUNT matches any (as istiod)."""
    fields = node.metadata.fields
    namespace = fields["NAMESPACE"].string_value if "NAMESPACE" in fields else ""
    if not namespace:
        parts = node.id.split("~")
        namespace = parts[3].split(".", 1)[0] if len(parts) == 4 else ""
    account = fields["SERVICE_ACCOUNT"].string_value if "SERVICE_ACCOUNT" in fields else ""
    if (namespace and namespace != identity[0]) or (account and account != identity[1]):
        return f"no identities ([{identity[0]}/{identity[1]}]) matched {namespace}/{account}"
    return None


__all__ = ["Identity", "authenticate", "identity_mismatch"]
