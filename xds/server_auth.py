"""Who an ADS stream is, as istiod decides it on its TLS port 15012 (pilot/pkg/xds/auth.go). Pure.

`authenticate`: the stream's `authorization: Bearer <JWT>` must be the server's one token, or one of the tokens
it knows with their identity (namespace, service account), the way istiod's TokenReview answers for a
service-account JWT. `identity_mismatch`: once the stream's node is known, a token's identity must be that
node's (istiod's checkConnectionIdentity): a token of another namespace or service account is refused with
PERMISSION_DENIED, which is why a node agent needs each pod's own token there (docs/install-istio.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from planemesh.agent.identity.ca_service import read_token_lines
from planemesh.model.config import ConfigError
from planemesh.model.defaults import option

Identity = tuple[str, str]  # (namespace, service account)


def authenticate(
    authorization: str | None, bearer_token: str | None, identities: Mapping[str, Identity | None] | None
) -> tuple[Identity | None, str | None]:
    """(the token's identity or None: any, None) when the stream may go on; (None, why) when it is refused."""
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


def _identity(who: str) -> Identity:
    namespace, slash, account = who.partition("/")
    if not (slash and namespace and account and "/" not in account):
        raise ValueError("expected `TOKEN NAMESPACE/SERVICE_ACCOUNT` or `TOKEN *`")
    return namespace, account


def read_identity_tokens(path: Path) -> dict[str, Identity | None]:
    """Lines `TOKEN NAMESPACE/SERVICE_ACCOUNT` (or `TOKEN *`: any identity), `#` comments, as --ca-tokens.
    ConfigError naming the file and line."""
    return read_token_lines(path, _identity)


def add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--xds-tokens", **option("xds-server", "--xds-tokens"))


def identities_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> dict[str, Identity | None] | None:
    try:
        return read_identity_tokens(Path(args.xds_tokens)) if args.xds_tokens else None
    except ConfigError as exc:
        parser.error(str(exc))


__all__ = ["Identity", "authenticate", "identities_from_args", "identity_mismatch", "read_identity_tokens"]
