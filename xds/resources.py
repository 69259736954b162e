"""Envoy resource types: type URLs, decoding `Any`, and reading resources from YAML/JSON.

Pure (protobuf only). Importing this module registers every extension message planemesh understands
in protobuf's default pool, so `json_format` can read `typed_config` blocks that name them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib
import json
import pkgutil
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2  # noqa: F401  (registers the type)
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2  # noqa: F401
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2  # noqa: F401
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2  # noqa: F401
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,  # noqa: F401
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, descriptor_pool, json_format, message, message_factory

from planemesh.xds.istio_wds import RESOURCE_NAMES as WDS_RESOURCE_NAMES
from xds.type.v3 import typed_struct_pb2

_PREFIX = "type.googleapis.com/"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
RESOURCE_WRAPPER = _PREFIX + "envoy.service.discovery.v3.Resource"

MESSAGE_OF_TYPE: dict[str, type[message.Message]] = {
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    SECRET: secret_pb2.Secret,
}
SHORT_NAME = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS", SECRET: "SDS"}
# The order Envoy subscribes in and the order in which updates must become active (warming):
# clusters and their endpoints before the listeners and routes that use them.
TYPE_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)
# State-of-the-world: a resource of these types absent from a response has been deleted.
FULL_STATE_TYPES = frozenset({LISTENER, CLUSTER})


class ResourceError(ValueError):
    """A resource could not be read: `where` names it (file, index, type, name)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


def resource_name(msg: message.Message) -> str:
    """The name a resource is known by: ClusterLoadAssignment calls it cluster_name."""
    if isinstance(msg, endpoint_pb2.ClusterLoadAssignment):
        return msg.cluster_name
    named = WDS_RESOURCE_NAMES.get(msg.DESCRIPTOR.full_name)  # istio's WDS: ztunnel's keys (xds/istio_wds.py)
    return named(msg) if named is not None else getattr(msg, "name", "")


def unpack(packed: any_pb2.Any, expected_type: str) -> message.Message:
    """Decode one resource. Raises ResourceError (not protobuf's exceptions) on any problem."""
    if packed.type_url != expected_type:
        raise ResourceError(
            packed.type_url or "<no type>", f"resource type {packed.type_url!r} in a {expected_type} response"
        )
    cls = MESSAGE_OF_TYPE.get(expected_type)
    if cls is None:
        raise ResourceError(expected_type, "unknown resource type URL")
    msg = cls()
    try:
        msg.ParseFromString(packed.value)
    except message.DecodeError as exc:
        raise ResourceError(expected_type, f"cannot decode: {exc}") from None
    return msg


def pack(msg: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg, type_url_prefix="type.googleapis.com/")
    return packed


@dataclass(frozen=True, slots=True)
class Wrapped:
    """A resource as carried in a response: the message (None for a TTL heartbeat) and its TTL."""

    name: str
    msg: message.Message | None
    version: str = ""
    ttl_s: float | None = None


def unwrap_sotw(packed: any_pb2.Any, type_url: str) -> Wrapped:
    """SotW resources may come wrapped in discovery.v3.Resource to carry a TTL (heartbeat: no body)."""
    if packed.type_url == RESOURCE_WRAPPER:
        wrapper = discovery_pb2.Resource()
        try:
            wrapper.ParseFromString(packed.value)
        except message.DecodeError as exc:
            raise ResourceError(RESOURCE_WRAPPER, f"cannot decode: {exc}") from None
        return from_delta_resource(wrapper, type_url)
    msg = unpack(packed, type_url)
    return Wrapped(resource_name(msg), msg)


def from_delta_resource(res: discovery_pb2.Resource, type_url: str) -> Wrapped:
    ttl = res.ttl.ToTimedelta().total_seconds() if res.HasField("ttl") else None
    if not res.HasField("resource"):
        if not res.name:
            raise ResourceError(type_url, "a heartbeat (resource without body) must have a name")
        return Wrapped(res.name, None, res.version, ttl)
    msg = unpack(res.resource, type_url)
    name = resource_name(msg)
    if res.name and res.name != name:
        raise ResourceError(
            f"{SHORT_NAME.get(type_url, type_url)} {res.name!r}", f"wrapper name differs from resource name {name!r}"
        )
    return Wrapped(name, msg, res.version, ttl)


# ---- reading resources from files (the management server's format, the examples) ----------------


TYPED_STRUCT = _PREFIX + typed_struct_pb2.TypedStruct.DESCRIPTOR.full_name
OPAQUE_VALUE = "@value_base64"  # {"@type": URL, "@name": NAME, "@value_base64": serialized bytes}


def message_class(type_url: str) -> type[message.Message] | None:
    """The message class of a type URL: the xDS types, else any message protobuf can find or import."""
    cls = MESSAGE_OF_TYPE.get(type_url)
    if cls is not None:
        return cls
    if not type_url.startswith(_PREFIX):
        return None
    full_name = type_url[len(_PREFIX) :]
    for _ in range(2):
        try:
            return message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(full_name))
        except KeyError:
            if not _register_package_of(full_name):
                return None
    return None


def _opaque_typed_configs(raw: Any) -> Any:
    """Nested `@type`s nobody here knows become xds.type.v3.TypedStruct {type_url, value: the fields}:
    the form Envoy (and istiod) use for extension configs whose schema the sender does not have, which
    Envoy converts back for the extensions it knows. An `@value_base64` Any is kept as raw bytes later."""
    if isinstance(raw, list):
        return [_opaque_typed_configs(v) for v in raw]
    if not isinstance(raw, dict):
        return raw
    out = {k: _opaque_typed_configs(v) for k, v in raw.items()}
    url = out.get("@type")
    if isinstance(url, str) and OPAQUE_VALUE not in out and message_class(url) is None:
        return {"@type": TYPED_STRUCT, "type_url": url, "value": {k: v for k, v in out.items() if k != "@type"}}
    return out


def _opaque_any(raw: dict, where: str) -> any_pb2.Any:
    if set(raw) - {"@type", "@name", OPAQUE_VALUE}:
        raise ResourceError(where, f"an {OPAQUE_VALUE} resource has only @type, @name and {OPAQUE_VALUE}")
    try:
        value = base64.b64decode(str(raw[OPAQUE_VALUE]), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ResourceError(where, f"{OPAQUE_VALUE}: not base64: {exc}") from None
    return any_pb2.Any(type_url=str(raw["@type"]), value=value)


def parse_resource_dict(raw: Any, where: str) -> any_pb2.Any:
    """One resource written as JSON/YAML with an `@type` (json_format's Any form). Any message type
    protobuf can find is accepted (the server serves what it is given); nested extension configs of
    unknown types become TypedStruct; `{"@type", "@name", "@value_base64"}` is an opaque resource."""
    if not isinstance(raw, dict) or "@type" not in raw:
        raise ResourceError(where, "a resource must be a mapping with an '@type'")
    type_url = raw["@type"]
    if not isinstance(type_url, str):
        raise ResourceError(where, "'@type' must be a string")
    if OPAQUE_VALUE in raw:
        return _opaque_any(raw, where)
    if message_class(type_url) is None:
        raise ResourceError(
            where, f"unknown resource type {type_url!r}: give it as {{'@type', '@name', '{OPAQUE_VALUE}'}}"
        )
    raw = _opaque_typed_configs(raw)
    for _ in range(8):  # each round may register one more extension package
        packed = any_pb2.Any()
        try:
            json_format.ParseDict(raw, packed)
            return packed
        except (json_format.ParseError, TypeError, ValueError) as exc:
            missing = _MISSING_TYPE.search(str(exc))
            if missing is None or not _register_package_of(missing.group(1)):
                raise ResourceError(where, str(exc)) from None
    raise ResourceError(where, "too many nested extension types")


_MISSING_TYPE = re.compile(r"Can not find message descriptor by type_url: type\.googleapis\.com/([\w.]+)")
_TRIED_PACKAGES: set[str] = set()


def _register_package_of(full_name: str) -> bool:
    """Import every *_pb2 module of a message's package (xds-protos has them all), once per package."""
    package = full_name.rsplit(".", 1)[0]
    if package in _TRIED_PACKAGES:
        return False
    _TRIED_PACKAGES.add(package)
    try:
        pkg = importlib.import_module(package)
    except ImportError:
        return False
    for info in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
        if info.name.endswith("_pb2"):
            with contextlib.suppress(ImportError):
                importlib.import_module(f"{package}.{info.name}")
    return True


def parse_resource_text(text: str, where: str) -> list[any_pb2.Any]:
    """A file: a YAML/JSON list of resources, or a mapping with a `resources:` list."""
    return [parse_resource_dict(item, f"{where}[{i}]") for i, item in enumerate(_documents(text, where))]


def _documents(text: str, where: str) -> list:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ResourceError(where, f"not valid YAML/JSON: {exc}") from None
    if doc is None:
        return []
    if isinstance(doc, dict) and set(doc) == {"resources"}:
        doc = doc["resources"]
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise ResourceError(where, "expected a list of resources")
    return doc


RESOURCE_SUFFIXES = (".yaml", ".yml", ".json")


def _name_of(packed: any_pb2.Any, doc: Any, where: str) -> str:
    if isinstance(doc, dict) and OPAQUE_VALUE in doc:
        name = doc.get("@name")
        if not isinstance(name, str) or not name:
            raise ResourceError(where, f"an {OPAQUE_VALUE} resource needs an '@name'")
        return name
    cls = message_class(packed.type_url)
    if cls is None:
        raise ResourceError(where, f"unknown resource type {packed.type_url!r}")
    msg = cls()
    msg.ParseFromString(packed.value)
    return resource_name(msg)


def load_resource_dir(directory: str | Path) -> dict[str, dict[str, any_pb2.Any]]:
    """Every resource file of a directory -> {type_url: {name: Any}}. Duplicate names are errors.

    Types other than the five xDS ones are kept (served to whoever subscribes to their type URL)."""
    result: dict[str, dict[str, any_pb2.Any]] = {t: {} for t in MESSAGE_OF_TYPE}
    seen: dict[tuple[str, str], str] = {}
    for path in sorted(Path(directory).iterdir()):
        if path.suffix not in RESOURCE_SUFFIXES or path.name.startswith("."):
            continue
        try:
            text = path.read_text()
        except OSError as exc:
            raise ResourceError(path.name, f"cannot read: {exc.strerror}") from None
        docs = _documents(text, path.name)
        for i, doc in enumerate(docs):
            where = f"{path.name}[{i}]"
            packed = parse_resource_dict(doc, where)
            name = _name_of(packed, doc, where)
            kind = SHORT_NAME.get(packed.type_url, packed.type_url)
            if not name:
                raise ResourceError(where, f"{kind} resource has no name")
            key = (packed.type_url, name)
            if key in seen:
                raise ResourceError(where, f"duplicate {kind} name {name!r} (also in {seen[key]})")
            seen[key] = where
            result.setdefault(packed.type_url, {})[name] = packed
    return result


def to_json(msg: message.Message) -> str:
    return json.dumps(json_format.MessageToDict(msg), sort_keys=True)


def messages(packed: Iterable[any_pb2.Any], type_url: str) -> dict[str, message.Message]:
    out: dict[str, message.Message] = {}
    for p in packed:
        msg = unpack(p, type_url)
        out[resource_name(msg)] = msg
    return out
