"""DownstreamTlsContext / UpstreamTlsContext / Secret -> planemesh's TLS model (model/tls_config.py). Pure.

Certificates and keys come from SDS secrets (by name, over the ADS stream whatever `sds_config` says) or
inline in the context (`inline_bytes` / `inline_string`); planemesh reads no key file named by xDS.
Every PEM is parsed here (chain, key, key matches the leaf, trust bundle), so a malformed secret is a
ConfigError naming it, e.g. `secret[default].tls_certificate.private_key: ...`, and the update is NACKed.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Mapping
from typing import Any

from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from google.protobuf import message

from planemesh.agent import lazy_modules
from planemesh.agent.identity.cert_types import CertError
from planemesh.model.config import Cluster, ConfigError
from planemesh.model.tls_config import CertSecret, SanMatch, Secret, TlsContext, TlsMatch, TrustSecret
from planemesh.xds.tls_refs import DOWNSTREAM_TLS, UPSTREAM_TLS
from planemesh.xds.translate_common import only

_VERSIONS = {1: "TLSv1_0", 2: "TLSv1_1", 3: "TLSv1_2", 4: "TLSv1_3"}  # TLS_AUTO (0): Envoy's default
_SAN_KINDS = {common_pb2.SubjectAltNameMatcher.URI: "uri", common_pb2.SubjectAltNameMatcher.DNS: "dns"}
_STRING_MATCH = ("exact", "prefix", "suffix", "contains")


def _data(source, path: str) -> bytes:
    kind = source.WhichOneof("specifier")
    if kind == "inline_bytes":
        return source.inline_bytes
    if kind == "inline_string":
        return source.inline_string.encode()
    raise ConfigError(path, f"{kind or 'an empty data source'}: planemesh takes certificates inline or over SDS")


def _san(matcher, kind: str, path: str) -> SanMatch:
    only(matcher, (*_STRING_MATCH, "ignore_case"), path)
    if matcher.ignore_case:
        raise ConfigError(f"{path}.ignore_case", "case-insensitive SAN matching is not supported")
    which = matcher.WhichOneof("match_pattern")
    if which not in _STRING_MATCH:
        raise ConfigError(path, "a SAN matcher needs exact, prefix, suffix or contains")
    return SanMatch(kind, **{which: getattr(matcher, which)})


def san_matchers(vc: common_pb2.CertificateValidationContext, path: str) -> tuple[SanMatch, ...]:
    out = []
    for i, typed in enumerate(vc.match_typed_subject_alt_names):
        kind = _SAN_KINDS.get(typed.san_type)
        if kind is None:
            raise ConfigError(f"{path}.match_typed_subject_alt_names[{i}].san_type", "only URI and DNS are supported")
        out.append(_san(typed.matcher, kind, f"{path}.match_typed_subject_alt_names[{i}].matcher"))
    for i, legacy in enumerate(vc.match_subject_alt_names):  # deprecated: any SAN type
        out.append(_san(legacy, "any", f"{path}.match_subject_alt_names[{i}]"))
    return tuple(out)


def _validation(vc: common_pb2.CertificateValidationContext, path: str, need_ca: bool) -> TrustSecret:
    only(vc, {"trusted_ca", "match_typed_subject_alt_names", "match_subject_alt_names"}, path)
    ca = b""
    if vc.HasField("trusted_ca"):
        ca = _data(vc.trusted_ca, f"{path}.trusted_ca")
        _certs(ca, f"{path}.trusted_ca")
    elif need_ca:
        raise ConfigError(f"{path}.trusted_ca", "a validation context needs trusted_ca")
    return TrustSecret(ca, san_matchers(vc, path))


def _ca() -> Any:
    """agent/identity/ca.py, imported with `cryptography` when the first PEM is checked (issue #15: an agent
    whose configuration has no certificate never loads it)."""
    return lazy_modules.load("planemesh.agent.identity.ca")


def _certs(pem: bytes, path: str) -> None:
    try:
        _ca().load_certs(pem, "PEM")
    except CertError as exc:
        raise ConfigError(path, str(exc)) from None


def _cert_secret(tc: common_pb2.TlsCertificate, path: str) -> CertSecret:
    only(tc, {"certificate_chain", "private_key"}, path)
    chain = _data(tc.certificate_chain, f"{path}.certificate_chain")
    key_pem = _data(tc.private_key, f"{path}.private_key")
    try:
        leaf = _ca().load_certs(chain, "PEM")[0]
    except CertError as exc:
        raise ConfigError(f"{path}.certificate_chain", str(exc)) from None
    try:
        key = _ca().load_key(key_pem, "PEM")
    except CertError as exc:
        raise ConfigError(f"{path}.private_key", str(exc)) from None
    if key.public_key().public_numbers() != leaf.public_key().public_numbers():  # type: ignore[union-attr]
        raise ConfigError(f"{path}.private_key", "does not belong to the first certificate of certificate_chain")
    return CertSecret(chain, key_pem)


def translate_secret(secret: secret_pb2.Secret, path: str) -> Secret:
    """One SDS Secret -> CertSecret / TrustSecret, every PEM parsed (ConfigError naming the field)."""
    kind = secret.WhichOneof("type")
    if kind == "tls_certificate":
        return _cert_secret(secret.tls_certificate, f"{path}.tls_certificate")
    if kind == "validation_context":
        return _validation(secret.validation_context, f"{path}.validation_context", need_ca=True)
    raise ConfigError(path, f"{kind or 'an empty secret'}: planemesh uses tls_certificate and validation_context")


def _common(common: tls_pb2.CommonTlsContext, path: str) -> TlsContext:
    inline: dict[str, Secret] = {}
    only(
        common,
        {
            "tls_params",
            "tls_certificates",
            "tls_certificate_sds_secret_configs",
            "validation_context",
            "validation_context_sds_secret_config",
            "combined_validation_context",
            "alpn_protocols",
        },
        path,
    )
    certs = [c.name for c in common.tls_certificate_sds_secret_configs]
    for i, tc in enumerate(common.tls_certificates):
        name = f"inline:{path}.tls_certificates[{i}]"
        inline[name] = _cert_secret(tc, name.removeprefix("inline:"))
        certs.append(name)
    if len(certs) > 1:
        raise ConfigError(path, "one certificate per context (planemesh picks none by key type or SNI)")
    if any(not n for n in certs):
        raise ConfigError(f"{path}.tls_certificate_sds_secret_configs", "a secret config needs a name")
    trust, san = None, ()
    which = common.WhichOneof("validation_context_type")
    if which == "validation_context":
        trust = f"inline:{path}.validation_context"
        inline[trust] = _validation(common.validation_context, f"{path}.validation_context", need_ca=True)
    elif which == "validation_context_sds_secret_config":
        trust = common.validation_context_sds_secret_config.name
    elif which == "combined_validation_context":
        combined = common.combined_validation_context
        cpath = f"{path}.combined_validation_context"
        only(combined, {"default_validation_context", "validation_context_sds_secret_config"}, cpath)
        trust = combined.validation_context_sds_secret_config.name
        default = _validation(combined.default_validation_context, f"{cpath}.default_validation_context", False)
        if default.ca_pem:
            raise ConfigError(f"{cpath}.default_validation_context.trusted_ca", "the roots come from the SDS secret")
        san = default.san
    elif which is not None:
        raise ConfigError(f"{path}.{which}", "not supported by planemesh")
    if which in ("validation_context_sds_secret_config", "combined_validation_context") and not trust:
        raise ConfigError(f"{path}.{which}", "a secret config needs a name")
    params = common.tls_params
    versions = {"tls_minimum_protocol_version", "tls_maximum_protocol_version"}
    only(params, {*versions, "cipher_suites"}, f"{path}.tls_params")
    low = _VERSIONS.get(params.tls_minimum_protocol_version, "TLSv1_2")
    high = _VERSIONS.get(params.tls_maximum_protocol_version, "TLSv1_3")
    if low > high:
        raise ConfigError(f"{path}.tls_params", f"minimum {low} is above maximum {high}")
    for i, proto in enumerate(common.alpn_protocols):
        if not proto or len(proto) > 255 or not proto.isascii() or not proto.isprintable():
            raise ConfigError(f"{path}.alpn_protocols[{i}]", "an ALPN name is 1..255 printable ASCII bytes")
    if params.cipher_suites:
        _check_ciphers(params.cipher_suites, f"{path}.tls_params.cipher_suites")
    return TlsContext(
        cert=certs[0] if certs else None,
        trust=trust,
        san=san,
        alpn=tuple(common.alpn_protocols),
        min_version=low,
        max_version=high,
        ciphers=tuple(params.cipher_suites),
        inline=tuple(inline.items()),
    )


RAW_BUFFER = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"


def socket_tls(parent, path: str, upstream: bool) -> TlsContext | None:
    """The TLS context of a filter chain's / cluster's `transport_socket`; None without one or for raw_buffer."""
    if not parent.HasField("transport_socket"):
        return None
    socket = parent.transport_socket
    untyped_raw = not socket.HasField("typed_config") and "raw_buffer" in socket.name
    if socket.typed_config.type_url == RAW_BUFFER or untyped_raw:
        return None
    spath = f"{path}.transport_socket"
    return upstream_tls(socket, spath) if upstream else downstream_tls(socket, spath)


def _check_ciphers(names, path: str) -> None:
    """OpenSSL must know at least one of them (as set_ciphers demands), else the proxy could build no context."""
    for i, name in enumerate(names):
        if not name or not name.isascii() or not name.isprintable() or ":" in name:
            raise ConfigError(f"{path}[{i}]", f"{name!r} is not a cipher suite name")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(":".join(names))
    except ssl.SSLError:
        raise ConfigError(path, f"none of {list(names)} is a cipher suite OpenSSL knows") from None


MATCH_KEY = "envoy.transport_socket_match"  # Envoy's endpoint metadata namespace for transport_socket_matches


def tls_labels(metadata) -> tuple[tuple[str, str], ...]:
    """An endpoint's `envoy.transport_socket_match` metadata, as sorted (key, value) strings."""
    fields = metadata.filter_metadata.get(MATCH_KEY)
    return () if fields is None else tls_labels_of_struct(fields)


def with_socket_matches(cluster, path: str, base: Cluster) -> Cluster:
    """transport_socket_matches: each endpoint gets the first match whose labels its metadata holds; a match
    without labels is the cluster's default (Envoy: it matches every endpoint, and ORIGINAL_DST connections)."""
    if not cluster.transport_socket_matches:
        return base
    matches: list[TlsMatch] = []
    default: TlsMatch | None = None
    for i, m in enumerate(cluster.transport_socket_matches):
        mpath = f"{path}.transport_socket_matches[{i}]"
        only(m, {"name", "match", "transport_socket"}, mpath)
        labels = tls_labels_of_struct(m.match)
        tls = socket_tls(m, mpath, upstream=True)
        entry = TlsMatch(m.name, labels, tls)
        if not labels:
            default = default or entry
            break  # Envoy: later entries can never match
        matches.append(entry)
    fallback = default.tls if default is not None else base.tls
    eps = tuple(dataclasses.replace(e, tls_socket=_first(matches, e.tls_labels)) for e in base.endpoints)
    return dataclasses.replace(base, endpoints=eps, tls=fallback, tls_matches=tuple(matches))


def tls_labels_of_struct(struct) -> tuple[tuple[str, str], ...]:
    out = []
    for key, value in struct.fields.items():
        kind = value.WhichOneof("kind")
        out.append((key, value.string_value if kind == "string_value" else str(getattr(value, kind)) if kind else ""))
    return tuple(sorted(out))


def _first(matches: list[TlsMatch], labels: tuple[tuple[str, str], ...]) -> int:
    have = set(labels)
    for i, m in enumerate(matches):
        if set(m.labels) <= have:
            return i
    return -1


def _unpack(socket, expected: str, cls: type[message.Message], path: str):
    only(socket, {"name", "typed_config"}, path)
    if socket.typed_config.type_url != expected:
        kind = socket.typed_config.type_url or socket.name or "none"
        raise ConfigError(f"{path}.typed_config", f"{kind} is not supported: expected {expected} (or raw_buffer)")
    ctx = cls()
    socket.typed_config.Unpack(ctx)
    return ctx


def downstream_tls(socket, path: str) -> TlsContext:
    """A filter chain's transport_socket (DownstreamTlsContext) -> TlsContext."""
    ctx = _unpack(socket, DOWNSTREAM_TLS, tls_pb2.DownstreamTlsContext, path)
    cpath = f"{path}.typed_config"
    only(ctx, {"common_tls_context", "require_client_certificate", "disable_stateless_session_resumption"}, cpath)
    tls = _common(ctx.common_tls_context, f"{cpath}.common_tls_context")
    if tls.cert is None:
        raise ConfigError(f"{cpath}.common_tls_context", "a TLS listener needs a certificate")
    require = ctx.require_client_certificate.value if ctx.HasField("require_client_certificate") else False
    if require and tls.trust is None:
        raise ConfigError(f"{cpath}.require_client_certificate", "needs a validation context (the trusted roots)")
    return _replace(tls, require_client_cert=require, session_tickets=not ctx.disable_stateless_session_resumption)


def upstream_tls(socket, path: str) -> TlsContext:
    """A cluster's transport_socket (UpstreamTlsContext) -> TlsContext."""
    ctx = _unpack(socket, UPSTREAM_TLS, tls_pb2.UpstreamTlsContext, path)
    cpath = f"{path}.typed_config"
    only(ctx, {"common_tls_context", "sni", "allow_renegotiation", "max_session_keys"}, cpath)
    if ctx.allow_renegotiation:
        raise ConfigError(f"{cpath}.allow_renegotiation", "renegotiation is not supported")
    tls = _common(ctx.common_tls_context, f"{cpath}.common_tls_context")
    return _replace(tls, sni=ctx.sni)


def _replace(tls: TlsContext, **changes) -> TlsContext:
    return dataclasses.replace(tls, **changes)


def secret_uses(tls: TlsContext, path: str, used: dict[str, tuple[str, type]], inline: dict[str, Secret]) -> None:
    """Record the secrets a context names: (first user's path, the kind it needs), and its inline ones."""
    inline.update(tls.inline)
    if tls.cert is not None:
        used.setdefault(tls.cert, (path, CertSecret))
    if tls.trust is not None:
        used.setdefault(tls.trust, (path, TrustSecret))


def resolve_secrets(
    used: Mapping[str, tuple[str, type]],
    received: Mapping[str, secret_pb2.Secret],
    inline: Mapping[str, Secret],
    errors,
) -> dict[str, Secret]:
    """The snapshot's secrets: every name a context uses, translated. A name that has not arrived is an error
    at its first user (the update already waited for it: warming); so is a secret of the wrong kind."""
    out: dict[str, Secret] = {}
    for name, (user, kind) in sorted(used.items()):
        if name in inline:
            out[name] = inline[name]
            continue
        msg = received.get(name)
        if msg is None:
            errors.add(ConfigError(user, f"secret {name!r} has not arrived over SDS"))
            continue
        try:
            out[name] = translate_secret(msg, f"secret[{name}]")
        except ConfigError as exc:
            errors.add(exc)
            continue
        if not isinstance(out[name], kind):
            need = "tls_certificate" if kind is CertSecret else "validation_context"
            errors.add(ConfigError(user, f"secret {name!r} is not a {need}"))
            del out[name]
    return out
