"""How a client reaches an xDS server: the gRPC channel (plaintext, TLS with the server's CA, mTLS with a client
certificate) and the per-stream `authorization: Bearer <JWT>` istio-agent sends. One place for every stream the
node opens: the agent's ADS stream (xds/transport.py) and the HBONE node's WDS stream (agent/hbone/wds_client.py).
The channel is planemesh's own gRPC client (xds/grpc_channel.py): the agent never imports grpcio.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planemesh.model.config import ConfigError
from planemesh.xds.grpc_channel import Channel, tls_context
from planemesh.xds.grpc_wire import DEFAULT_MAX_RECEIVE

KEEPALIVE_S, KEEPALIVE_TIMEOUT_S = 30.0, 10.0  # HTTP/2 PINGs on an open stream; an unanswered one ends it


@dataclass(frozen=True, slots=True)
class TlsFiles:  # cert/key: a client certificate (mTLS); istiod's 15012 wants only the CA and a token
    ca: str
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None


class CredentialsError(Exception):
    """A credential file (CA, client cert/key, token) cannot be read: retried with backoff, reported."""


def tls_files_from_dict(raw: Any, path: str) -> TlsFiles:
    """A `tls: {ca, cert, key, server_name}` mapping (`path` names it in errors)."""
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"ca", "cert", "key", "server_name"})
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}", "unknown field (allowed: ca, cert, key, server_name)")
    if ("cert" in raw) != ("key" in raw):
        raise ConfigError(path, "cert and key go together")
    for key, value in raw.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}.{key}", f"expected a non-empty string, got {value!r}")
    if "ca" not in raw:
        raise ConfigError(f"{path}.ca", "missing")
    return TlsFiles(ca=raw["ca"], cert=raw.get("cert"), key=raw.get("key"), server_name=raw.get("server_name"))


def tls_files_dict(tls: TlsFiles) -> dict[str, str]:
    """TlsFiles as the `tls:` mapping tls_files_from_dict reads (how a bootstrap's server.tls is passed on)."""
    return {k: v for k in ("ca", "cert", "key", "server_name") if (v := getattr(tls, k)) is not None}


def check_token_file(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(path, f"expected an absolute path, got {value!r}")
    return value


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{field} {path}: cannot read: {exc.strerror}") from None


def bearer_metadata(token_file: str | None, field: str) -> tuple[tuple[str, str], ...] | None:
    """`authorization: Bearer <JWT>` as istio-agent sends it; read on every stream (Kubernetes rotates
    projected tokens)."""
    if token_file is None:
        return None
    token = _read(token_file, field).decode("utf-8", "replace").strip()
    if not token:
        raise CredentialsError(f"{field} {token_file}: empty")
    if any(c in token for c in "\r\n\0"):
        raise CredentialsError(f"{field} {token_file}: not a single-line token")
    return (("authorization", f"Bearer {token}"),)


def open_channel(server: str, tls: TlsFiles | None, field: str, max_receive: int = DEFAULT_MAX_RECEIVE) -> Channel:
    """A channel to `server`: plaintext without `tls`; `field` names the settings in errors (server.tls)."""
    context = None
    if tls is not None:
        ca = _read(tls.ca, f"{field}.ca")
        for name in ("cert", "key"):
            if (path := getattr(tls, name)) is not None:
                _read(path, f"{field}.{name}")
        try:
            context = tls_context(ca, tls.cert, tls.key)
        except (ssl.SSLError, ValueError) as exc:
            raise CredentialsError(f"{field}: the CA or the client certificate/key is not usable PEM: {exc}") from None
    return Channel(
        server,
        tls=context,
        server_name=tls.server_name if tls is not None else None,
        max_receive=max_receive,
        keepalive_s=KEEPALIVE_S,
        keepalive_timeout_s=KEEPALIVE_TIMEOUT_S,
    )
