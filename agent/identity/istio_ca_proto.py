"""istio's certificate-signing API (`istio.v1.auth.IstioCertificateService`), its messages built here.

The wire contract (package, names, field numbers) is istio's `security/v1alpha1/ca.proto`; the descriptor is
built in Python from that contract instead of generated code, so no protoc step and no copied source:

    IstioCertificateRequest  { string csr = 1; int64 validity_duration = 3; google.protobuf.Struct metadata = 4; }
    IstioCertificateResponse { repeated string cert_chain = 1; Roots root_cert = 2; }
    Roots                    { repeated string ca_cert = 1; }
    service IstioCertificateService {
        rpc CreateCertificate(IstioCertificateRequest) returns (IstioCertificateResponse); }

`cert_chain` is [leaf, intermediates..., root] when `root_cert` is unset (older istiod, and planemesh),
else [leaf, intermediates...] with the trusted roots in `root_cert.ca_cert`.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

PACKAGE = "istio.v1.auth"
SERVICE = f"{PACKAGE}.IstioCertificateService"
METHOD = f"/{SERVICE}/CreateCertificate"  # the gRPC path istio-agent calls

_F = descriptor_pb2.FieldDescriptorProto


def field_proto(name: str, number: int, kind: int, *, repeated: bool = False, type_name: str = "") -> _F:
    """One field of a message descriptor built in Python (also xds/istio_wds.py's WDS messages)."""
    label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    field = _F(name=name, number=number, type=kind, label=label, json_name=_camel(name))
    if type_name:
        field.type_name = type_name
    return field


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def _file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(
        name="planemesh/istio/security/v1alpha1/ca.proto",
        package=PACKAGE,
        syntax="proto3",
        dependency=["google/protobuf/struct.proto"],
    )
    proto.message_type.add(
        name="IstioCertificateRequest",
        field=[
            field_proto("csr", 1, _F.TYPE_STRING),
            field_proto("validity_duration", 3, _F.TYPE_INT64),
            field_proto("metadata", 4, _F.TYPE_MESSAGE, type_name=".google.protobuf.Struct"),
        ],
    )
    proto.message_type.add(
        name="IstioCertificateResponse",
        field=[
            field_proto("cert_chain", 1, _F.TYPE_STRING, repeated=True),
            field_proto("root_cert", 2, _F.TYPE_MESSAGE, type_name=f".{PACKAGE}.Roots"),
        ],
    )
    proto.message_type.add(name="Roots", field=[field_proto("ca_cert", 1, _F.TYPE_STRING, repeated=True)])
    service = proto.service.add(name="IstioCertificateService")
    service.method.add(
        name="CreateCertificate",
        input_type=f".{PACKAGE}.IstioCertificateRequest",
        output_type=f".{PACKAGE}.IstioCertificateResponse",
    )
    return proto


def _messages() -> dict[str, type]:
    pool = descriptor_pool.DescriptorPool()
    struct_file = descriptor_pb2.FileDescriptorProto()
    struct_pb2.DESCRIPTOR.CopyToProto(struct_file)
    pool.Add(struct_file)
    pool.Add(_file())
    names = ("IstioCertificateRequest", "IstioCertificateResponse", "Roots")
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{n}")) for n in names}


_CLASSES = _messages()
IstioCertificateRequest = _CLASSES["IstioCertificateRequest"]
IstioCertificateResponse = _CLASSES["IstioCertificateResponse"]
Roots = _CLASSES["Roots"]

__all__ = ["METHOD", "SERVICE", "IstioCertificateRequest", "IstioCertificateResponse", "Roots", "field_proto"]
