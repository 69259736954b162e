"""h2c and gRPC through the proxy with a real grpcio server and client: the four call shapes, trailers
(grpc-status) forwarded, deadline and server errors with the right status, proxy errors as gRPC status."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from planemesh.model.config import Cluster, ClusterKind, Endpoint
from tests.proxy.proxy_harness import ProxyThread, free_port

_ident = (lambda b: b, lambda b: b)  # raw bytes messages: no generated stubs needed


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"fail":
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "no way")
    if request.startswith(b"sleep"):
        time.sleep(float(request[5:]))
    context.set_trailing_metadata((("x-trailer", "t1"),))
    return b"echo:" + request


def _server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield b"item%d" % i


def _client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return b"|".join(requests)


def _bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for r in requests:
        yield r.upper()


@pytest.fixture(scope="module")
def grpc_backend() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.method_handlers_generic_handler(
        "t.Svc",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary, *_ident),
            "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream, *_ident),
            "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream, *_ident),
            "Bidi": grpc.stream_stream_rpc_method_handler(_bidi, *_ident),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


def _h2_cluster(port: int) -> dict[str, Cluster]:
    return {
        "backend": Cluster(
            name="backend", kind=ClusterKind.STATIC, http2=True, endpoints=(Endpoint(address="127.0.0.1", port=port),)
        )
    }


@pytest.fixture
def channel(grpc_backend: int) -> Iterator[tuple[grpc.Channel, ProxyThread]]:
    with (
        ProxyThread([("127.0.0.1", grpc_backend)], clusters=_h2_cluster(grpc_backend)) as proxy,
        grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as ch,
    ):
        yield ch, proxy


def test_grpc_four_call_shapes(channel: tuple[grpc.Channel, ProxyThread]) -> None:
    ch, proxy = channel
    reply, call = ch.unary_unary("/t.Svc/Unary", *_ident).with_call(b"hi", timeout=5)
    assert reply == b"echo:hi"
    assert ("x-trailer", "t1") in call.trailing_metadata()
    assert list(ch.unary_stream("/t.Svc/ServerStream", *_ident)(b"50", timeout=5)) == [b"item%d" % i for i in range(50)]
    big = [bytes([i]) * 100_000 for i in range(30)]  # 3 MB: more than every flow-control window
    assert ch.stream_unary("/t.Svc/ClientStream", *_ident)(iter(big), timeout=10) == b"|".join(big)
    out = list(ch.stream_stream("/t.Svc/Bidi", *_ident)(iter([b"a", b"bc", b"def"]), timeout=5))
    assert out == [b"A", b"BC", b"DEF"]
    lines = proxy.flush_log()
    assert sum("HTTP/2" in line for line in lines) == 4


def test_grpc_server_error_and_deadline(channel: tuple[grpc.Channel, ProxyThread]) -> None:
    ch, _ = channel
    unary = ch.unary_unary("/t.Svc/Unary", *_ident)
    with pytest.raises(grpc.RpcError) as err:
        unary(b"fail", timeout=5)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "no way"
    with pytest.raises(grpc.RpcError) as err:
        unary(b"sleep1.0", timeout=0.2)
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert unary(b"after", timeout=5) == b"echo:after"  # the connection survived the cancelled stream


def test_proxy_errors_are_grpc_statuses(grpc_backend: int) -> None:
    dead = free_port()
    with (
        ProxyThread([("127.0.0.1", dead)], clusters=_h2_cluster(dead)) as proxy,
        grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as ch,
    ):
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/t.Svc/Unary", *_ident)(b"x", timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "upstream connect error" in err.value.details()
