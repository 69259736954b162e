"""istio's workload discovery (WDS) messages, as ztunnel receives them over xDS, built here (no protoc step).

The wire contract (packages, names, field numbers) is istio's `workload.proto` and `authorization.proto`
(istio/ztunnel `proto/`); the descriptors are built in Python from that contract, as
agent/identity/istio_ca_proto.py does for CreateCertificate. Only the fields planemesh reads are declared:
any other field a control plane sends is kept by protobuf as an unknown field, and a consumer that must not
ignore it (an Authorization whose matches it cannot read fully, a Workload behind a waypoint) checks for it.

    istio.workload.Address   { oneof type { Workload workload = 1; Service service = 2; } }
    istio.workload.Workload  { string uid = 20; name = 1; namespace = 2; repeated bytes addresses = 3;
                               string hostname = 21; network = 4; TunnelProtocol tunnel_protocol = 5;
                               string trust_domain = 6; service_account = 7; GatewayAddress waypoint = 8;
                               string node = 9; canonical_name = 10; repeated string authorization_policies = 16;
                               WorkloadStatus status = 17; string cluster_id = 18; }
    istio.workload.Service   { string name = 1; namespace = 2; hostname = 3; }
    istio.workload.GatewayAddress { uint32 hbone_mtls_port = 3; }
    enum TunnelProtocol { NONE = 0; HBONE = 1; }   enum WorkloadStatus { HEALTHY = 0; UNHEALTHY = 1; }
    istio.security.Authorization { string name = 1; namespace = 2; Scope scope = 3; Action action = 4;
                                   repeated Rule rules = 5; }
    Rule { repeated Clause clauses = 1; }   Clause { repeated Match matches = 2; }
    Match { repeated StringMatch namespaces = 1, not_namespaces = 2, principals = 3, not_principals = 4;
            repeated Address source_ips = 5, not_source_ips = 6, destination_ips = 7, not_destination_ips = 8;
            repeated uint32 destination_ports = 9, not_destination_ports = 10; }
    Address { bytes address = 1; uint32 length = 2; }
    StringMatch { oneof match_type { string exact = 1; prefix = 2; suffix = 3; google.protobuf.Empty presence = 4; } }
    enum Scope { GLOBAL = 0; NAMESPACE = 1; WORKLOAD_SELECTOR = 2; }   enum Action { ALLOW = 0; DENY = 1; }

Resource names (ztunnel's xDS keys): an Address is its workload's `uid` (a service's `namespace/hostname`),
an Authorization `namespace/name`. Importing this module registers the messages in protobuf's default pool,
so the management server reads them from resource files like any other type.
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf import descriptor_pb2, descriptor_pool, empty_pb2, message, message_factory

from planemesh.agent.identity.istio_ca_proto import field_proto

WORKLOAD_PKG, SECURITY_PKG = "istio.workload", "istio.security"
ADDRESS_TYPE = f"type.googleapis.com/{WORKLOAD_PKG}.Address"
AUTHORIZATION_TYPE = f"type.googleapis.com/{SECURITY_PKG}.Authorization"
HBONE = 1  # TunnelProtocol
ALLOW, DENY = 0, 1  # Action
GLOBAL, NAMESPACE, WORKLOAD_SELECTOR = 0, 1, 2  # Scope

_F = descriptor_pb2.FieldDescriptorProto
_S, _B, _U32, _E, _M = _F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_UINT32, _F.TYPE_ENUM, _F.TYPE_MESSAGE


def _msg(proto: descriptor_pb2.FileDescriptorProto, name: str, fields: list[tuple], oneof: str = "") -> None:
    """fields: (name, number, type[, type_name[, repeated]]); `oneof`: every field is in that oneof."""
    msg = proto.message_type.add(name=name)
    if oneof:
        msg.oneof_decl.add(name=oneof)
    for fname, number, kind, *rest in fields:
        type_name = rest[0] if rest else ""
        repeated = len(rest) > 1 and rest[1]
        f = msg.field.add()
        f.CopyFrom(field_proto(fname, number, kind, repeated=bool(repeated), type_name=type_name))
        if oneof:
            f.oneof_index = 0


def _enum(proto: descriptor_pb2.FileDescriptorProto, name: str, values: list[str]) -> None:
    enum = proto.enum_type.add(name=name)
    for number, value in enumerate(values):
        enum.value.add(name=value, number=number)


def _workload_file() -> descriptor_pb2.FileDescriptorProto:
    p = descriptor_pb2.FileDescriptorProto(name="planemesh/istio/workload.proto", package=WORKLOAD_PKG,
                                           syntax="proto3")  # fmt: skip
    w = f".{WORKLOAD_PKG}."
    _msg(p, "Address", [("workload", 1, _M, w + "Workload"), ("service", 2, _M, w + "Service")], oneof="type")
    _msg(p, "Service", [("name", 1, _S), ("namespace", 2, _S), ("hostname", 3, _S)])
    _msg(p, "GatewayAddress", [("hbone_mtls_port", 3, _U32)])
    _msg(p, "Workload", [
        ("uid", 20, _S), ("name", 1, _S), ("namespace", 2, _S), ("addresses", 3, _B, "", True),
        ("hostname", 21, _S), ("network", 4, _S), ("tunnel_protocol", 5, _E, w + "TunnelProtocol"),
        ("trust_domain", 6, _S), ("service_account", 7, _S), ("waypoint", 8, _M, w + "GatewayAddress"),
        ("node", 9, _S), ("canonical_name", 10, _S), ("authorization_policies", 16, _S, "", True),
        ("status", 17, _E, w + "WorkloadStatus"), ("cluster_id", 18, _S),
    ])  # fmt: skip
    _enum(p, "TunnelProtocol", ["NONE", "HBONE"])
    _enum(p, "WorkloadStatus", ["HEALTHY", "UNHEALTHY"])
    return p


def _authorization_file() -> descriptor_pb2.FileDescriptorProto:
    p = descriptor_pb2.FileDescriptorProto(name="planemesh/istio/authorization.proto", package=SECURITY_PKG,
                                           syntax="proto3", dependency=["google/protobuf/empty.proto"])  # fmt: skip
    s = f".{SECURITY_PKG}."
    _msg(p, "Authorization", [("name", 1, _S), ("namespace", 2, _S), ("scope", 3, _E, s + "Scope"),
                              ("action", 4, _E, s + "Action"), ("rules", 5, _M, s + "Rule", True)])  # fmt: skip
    _msg(p, "Rule", [("clauses", 1, _M, s + "Clause", True)])
    _msg(p, "Clause", [("matches", 2, _M, s + "Match", True)])
    fields: list[tuple] = []
    for i, (name, kind, type_name) in enumerate([
        ("namespaces", _M, s + "StringMatch"), ("principals", _M, s + "StringMatch"),
        ("source_ips", _M, s + "Address"), ("destination_ips", _M, s + "Address"), ("destination_ports", _U32, ""),
    ]):  # fmt: skip
        fields += [(name, 2 * i + 1, kind, type_name, True), (f"not_{name}", 2 * i + 2, kind, type_name, True)]
    _msg(p, "Match", fields)
    _msg(p, "Address", [("address", 1, _B), ("length", 2, _U32)])
    _msg(p, "StringMatch", [("exact", 1, _S), ("prefix", 2, _S), ("suffix", 3, _S),
                            ("presence", 4, _M, ".google.protobuf.Empty")], oneof="match_type")  # fmt: skip
    _enum(p, "Scope", ["GLOBAL", "NAMESPACE", "WORKLOAD_SELECTOR"])
    _enum(p, "Action", ["ALLOW", "DENY"])
    return p


def _register() -> dict[str, type[message.Message]]:
    pool = descriptor_pool.Default()
    try:
        pool.FindMessageTypeByName(f"{WORKLOAD_PKG}.Address")
    except KeyError:
        pool.FindFileByName(empty_pb2.DESCRIPTOR.name)  # the dependency is in the default pool already
        pool.Add(_workload_file())
        pool.Add(_authorization_file())
    names = [f"{WORKLOAD_PKG}.{n}" for n in ("Address", "Workload", "Service")]
    names += [f"{SECURITY_PKG}.{n}" for n in ("Authorization", "Match", "StringMatch")]
    return {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[1]: message_factory.GetMessageClass(
        pool.FindMessageTypeByName(n)) for n in names}  # fmt: skip


_CLASSES = _register()
Address = _CLASSES["workload.Address"]
Workload = _CLASSES["workload.Workload"]
Authorization = _CLASSES["security.Authorization"]


def address_name(msg: message.Message) -> str:
    """ztunnel's key: the workload's uid, a service's namespace/hostname."""
    kind = msg.WhichOneof("type")  # type: ignore[attr-defined]
    if kind == "workload":
        return msg.workload.uid  # type: ignore[attr-defined]
    if kind == "service":
        return f"{msg.service.namespace}/{msg.service.hostname}"  # type: ignore[attr-defined]
    return ""


def authorization_name(msg: message.Message) -> str:
    return f"{msg.namespace}/{msg.name}"  # type: ignore[attr-defined]


# message full name -> its resource name (xds/resources.py resource_name)
RESOURCE_NAMES: dict[str, Callable[[message.Message], str]] = {
    f"{WORKLOAD_PKG}.Address": address_name,
    f"{SECURITY_PKG}.Authorization": authorization_name,
}
