"""The grpcio handler of istio's `IstioCertificateService` for CsrSigner (agent/identity/ca_service.py): the
server side, apart so that the agent's client side (cert_client.py) and the SDS issuer never import grpcio."""

from __future__ import annotations

import grpc

from planemesh.agent.identity.ca_service import CsrRefused, CsrSigner
from planemesh.agent.identity.istio_ca_proto import IstioCertificateRequest, IstioCertificateResponse


def certificate_service(signer: CsrSigner) -> grpc.GenericRpcHandler:
    """The gRPC handler of `istio.v1.auth.IstioCertificateService` (add to a grpc.aio server)."""

    async def create_certificate(request: IstioCertificateRequest, context: grpc.aio.ServicerContext):
        metadata = {m.key: m.value for m in context.invocation_metadata() or ()}
        try:
            return signer.sign(request, metadata.get("authorization"))
        except CsrRefused as exc:
            await context.abort(grpc.StatusCode[exc.code.name], str(exc))

    return grpc.method_handlers_generic_handler(
        "istio.v1.auth.IstioCertificateService",
        {
            "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                create_certificate,
                request_deserializer=IstioCertificateRequest.FromString,
                response_serializer=IstioCertificateResponse.SerializeToString,
            )
        },
    )


__all__ = ["certificate_service"]
