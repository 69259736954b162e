"""planemesh's gRPC client (xds/grpc_channel.py) on real sockets: against grpcio's server (streams, unary calls,
deadlines, statuses with escaped messages, a request far larger than HTTP/2's first window), and against a
hand-written HTTP/2 server for what grpcio will not do on demand (a tiny window, silence after the handshake,
GOAWAY, a dropped connection)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import AsyncIterator, Callable

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from google.protobuf import wrappers_pb2
from hyperframe.frame import DataFrame

from planemesh.xds.grpc_channel import Channel, tls_context
from planemesh.xds.grpc_wire import EOF, MessageReader, RpcError, StatusCode, encode_message
from planemesh.xds.server_channel import CredentialsError, TlsFiles, open_channel
from tests.xds.test_xds_transport import _pki

Bytes = wrappers_pb2.BytesValue
MESSAGE = "naïve 100% sure: ✓ done"


def _handler() -> grpc.GenericRpcHandler:
    async def echo(requests: AsyncIterator[Bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Bytes]:
        async for req in requests:
            if req.value == b"abort":
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, MESSAGE)
            yield Bytes(value=str(len(req.value)).encode())

    async def unary(req: Bytes, context: grpc.aio.ServicerContext) -> Bytes:
        auth = dict(context.invocation_metadata() or ()).get("authorization", "")
        if req.value == b"sleep":
            await asyncio.sleep(5)
        return Bytes(value=auth.encode() + b"|" + req.value[::-1])

    return grpc.method_handlers_generic_handler("t.S", {
        "Echo": grpc.stream_stream_rpc_method_handler(echo, Bytes.FromString, Bytes.SerializeToString),
        "Unary": grpc.unary_unary_rpc_method_handler(unary, Bytes.FromString, Bytes.SerializeToString),
    })  # fmt: skip


async def _requests(*values: bytes, delay_s: float = 0.0) -> AsyncIterator[Bytes]:
    await asyncio.sleep(delay_s)  # the server's SETTINGS are in (a smaller window applies from then on)
    for v in values:
        yield Bytes(value=v)


def _with_grpc_server(scenario: Callable[[str], object], tmp_path) -> object:
    async def run() -> object:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_handler(),))
        target = f"unix://{tmp_path}/g.sock"
        server.add_insecure_port(target)
        await server.start()
        try:
            return await scenario(target)
        finally:
            await server.stop(0)

    return asyncio.run(run())


def test_a_stream_against_grpcio_sends_a_request_larger_than_every_window(tmp_path) -> None:
    big = b"z" * (3 << 20)  # 3 MiB: ~48 times the 64 KiB HTTP/2 starts with

    async def scenario(target: str) -> list[bytes]:
        async with Channel(target, max_receive=1 << 20) as ch:
            call = ch.stream("/t.S/Echo", _requests(b"a", big, b"", b"bc"), Bytes.FromString)
            return [m.value async for m in call]

    assert _with_grpc_server(scenario, tmp_path) == [b"1", str(len(big)).encode(), b"0", b"2"]


def test_unary_calls_metadata_status_and_deadline_against_grpcio(tmp_path) -> None:
    async def scenario(target: str) -> tuple:
        async with Channel(target) as ch:
            answer = await ch.unary("/t.S/Unary", Bytes(value=b"abc"), Bytes.FromString,
                                    metadata=[("authorization", "Bearer tok")], timeout_s=5)  # fmt: skip
            with pytest.raises(RpcError) as late:
                await ch.unary("/t.S/Unary", Bytes(value=b"sleep"), Bytes.FromString, timeout_s=0.3)
            with pytest.raises(RpcError) as missing:
                await ch.unary("/t.S/Nope", Bytes(), Bytes.FromString, timeout_s=5)
            call = ch.stream("/t.S/Echo", _requests(b"ok", b"abort"), Bytes.FromString)
            first = await call.read()
            with pytest.raises(RpcError) as aborted:
                await call.read()
            again = await ch.unary("/t.S/Unary", Bytes(value=b"xy"), Bytes.FromString, timeout_s=5)  # same connection
            return answer.value, late.value, missing.value, first.value, aborted.value, again.value

    answer, late, missing, first, aborted, again = _with_grpc_server(scenario, tmp_path)
    assert answer == b"Bearer tok|cba" and again == b"|yx" and first == b"2"
    assert late.code() is StatusCode.DEADLINE_EXCEEDED
    assert missing.code() is StatusCode.UNIMPLEMENTED
    assert aborted.code() is StatusCode.FAILED_PRECONDITION and aborted.details() == MESSAGE  # percent-decoded


def test_a_response_over_the_receive_limit_is_resource_exhausted(tmp_path) -> None:
    async def scenario(target: str) -> RpcError:
        async with Channel(target, max_receive=100) as ch:
            call = ch.stream("/t.S/Echo", _requests(b"q" * 200), Bytes.FromString)
            with pytest.raises(RpcError) as small:  # the answer "200" fits; now make grpc send a large one
                await ch.unary("/t.S/Unary", Bytes(value=b"w" * 150), Bytes.FromString, timeout_s=5)
            assert (await call.read()).value == b"200"
            return small.value

    err = _with_grpc_server(scenario, tmp_path)
    assert err.code() is StatusCode.RESOURCE_EXHAUSTED and "vs. 100" in err.details()


# ---- a hand-written HTTP/2 server -------------------------------------------------------------------------
class RawServer:
    """Accepts one connection; `behave(server, conn, event)` decides what the server does with each event."""

    def __init__(self, behave: Callable, window: int = 65_535) -> None:
        self.behave, self.window = behave, window
        self.received: dict[int, MessageReader] = {}
        self.messages: list[bytes] = []
        self.silent = False  # stop reading and answering (a hung server)
        self.outgoing: list[tuple[int, bytes]] = []  # (stream, DATA) sent as the client's window allows
        self.sent = 0
        self.writer: asyncio.StreamWriter | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.window})  # once the client ACKs
        writer.write(conn.data_to_send())
        while not self.silent and (data := await reader.read(65536)):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    got = self.received.setdefault(event.stream_id, MessageReader(1 << 30)).feed(event.data)
                    self.messages += got
                self.behave(self, conn, event)
            while self.outgoing and conn.local_flow_control_window(self.outgoing[0][0]) >= len(self.outgoing[0][1]):
                conn.send_data(*self.outgoing.pop(0))
                self.sent += 1
            if not self.silent:
                writer.write(conn.data_to_send())
        if self.silent:
            await asyncio.sleep(30)

    def grant_slowly(self, conn: h2.connection.H2Connection, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)


async def _raw(
    behave: Callable, scenario: Callable, tmp_path, window: int = 65_535, server_tls=None, **channel
) -> object:
    raw = RawServer(behave, window)
    server = await asyncio.start_unix_server(raw.serve, f"{tmp_path}/raw.sock", ssl=server_tls)
    try:
        async with Channel(f"unix://{tmp_path}/raw.sock", **channel) as ch:
            return await scenario(ch, raw)
    finally:
        server.close()
        if raw.writer is not None:
            raw.writer.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()


def _ok_headers(conn: h2.connection.H2Connection, stream_id: int) -> None:
    conn.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])


def test_sending_keeps_within_a_tiny_window_the_server_grants_bit_by_bit(tmp_path) -> None:
    def behave(raw: RawServer, conn, event) -> None:
        raw.grant_slowly(conn, event)
        if isinstance(event, h2.events.StreamEnded):
            _ok_headers(conn, event.stream_id)
            conn.send_data(event.stream_id, encode_message(Bytes(value=b"done").SerializeToString()))
            conn.send_headers(event.stream_id, [("grpc-status", "0")], end_stream=True)

    async def scenario(ch: Channel, raw: RawServer) -> tuple:
        call = ch.stream("/t.S/Echo", _requests(b"k" * 50_000, b"l" * 3, delay_s=0.3), Bytes.FromString)
        return [m.value async for m in call], raw.messages

    answers, got = asyncio.run(_raw(behave, scenario, tmp_path, window=1_000))
    assert answers == [b"done"]  # h2 on the server side refuses any frame past its window: none came
    assert [Bytes.FromString(m).value for m in got] == [b"k" * 50_000, b"l" * 3]


def test_an_unanswered_keepalive_ping_ends_the_call_unavailable(tmp_path) -> None:
    def behave(raw: RawServer, conn, event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            _ok_headers(conn, event.stream_id)
            raw.silent = True  # the headers go out, then nothing: no PING ACK ever

    async def scenario(ch: Channel, raw: RawServer) -> RpcError:
        call = ch.stream("/t.S/Echo", _requests(b"a"), Bytes.FromString)
        with pytest.raises(RpcError) as err:
            await asyncio.wait_for(call.read(), 5)
        return err.value

    err = asyncio.run(_raw(behave, scenario, tmp_path, keepalive_s=0.2, keepalive_timeout_s=0.3))
    assert err.code() is StatusCode.UNAVAILABLE and "keepalive ping" in err.details() and "0.3 s" in err.details()


@pytest.mark.parametrize("how", ["goaway", "goaway-then-data", "drop", "reset"])
def test_goaway_a_lost_connection_and_a_reset_are_named(tmp_path, how: str) -> None:
    def behave(raw: RawServer, conn, event) -> None:
        if isinstance(event, h2.events.DataReceived) and event.data:  # not the empty frame ending the requests
            _ok_headers(conn, event.stream_id)
            conn.send_data(event.stream_id, encode_message(Bytes(value=b"one").SerializeToString()))
            if how == "goaway":
                conn.close_connection(error_code=11, additional_data=b"too_many_pings")
            elif how == "goaway-then-data":  # graceful: the open stream's frames still follow, in the same write
                conn.close_connection(error_code=0, last_stream_id=event.stream_id, additional_data=b"max_age")
                more = DataFrame(event.stream_id, data=encode_message(Bytes(value=b"two").SerializeToString()))
                raw.writer.write(conn.data_to_send() + more.serialize())
            elif how == "reset":
                conn.reset_stream(event.stream_id, error_code=7)  # REFUSED_STREAM
            else:
                raw.writer.write(conn.data_to_send())
                raw.writer.close()

    async def scenario(ch: Channel, raw: RawServer) -> tuple:
        call = ch.stream("/t.S/Echo", _requests(b"a"), Bytes.FromString)
        first = await asyncio.wait_for(call.read(), 5)
        with pytest.raises(RpcError) as err:
            await asyncio.wait_for(call.read(), 5)
        with pytest.raises(RpcError):  # every later read gives the same end
            await call.read()
        return first.value, err.value

    first, err = asyncio.run(_raw(behave, scenario, tmp_path))
    assert first == b"one" and err.code() is StatusCode.UNAVAILABLE
    words = {"goaway": r"GOAWAY, HTTP/2 error 11: too_many_pings",
             "goaway-then-data": r"GOAWAY, HTTP/2 error 0: max_age",
             "drop": r"raw.sock (was closed by the server|was lost)",
             "reset": r"stream reset by the server \(HTTP/2 error 7\)"}[how]  # fmt: skip
    assert re.search(words, err.details()), err.details()


def test_an_ok_end_reads_eof_and_a_refused_connection_is_unavailable(tmp_path) -> None:
    def behave(raw: RawServer, conn, event) -> None:
        if isinstance(event, h2.events.StreamEnded):
            conn.send_headers(event.stream_id, [(":status", "200"), ("grpc-status", "0")], end_stream=True)

    async def scenario(ch: Channel, raw: RawServer) -> object:
        call = ch.stream("/t.S/Echo", _requests(), Bytes.FromString)
        return await asyncio.wait_for(call.read(), 5)

    assert asyncio.run(_raw(behave, scenario, tmp_path)) is EOF

    async def refused() -> RpcError:
        async with Channel(f"unix://{tmp_path}/nobody.sock") as ch:
            with pytest.raises(RpcError) as err:
                await ch.stream("/t.S/Echo", _requests(), Bytes.FromString).read()
            return err.value

    err = asyncio.run(refused())
    assert err.code() is StatusCode.UNAVAILABLE and "failed to connect to unix://" in err.details()


def _ended_ok(raw: RawServer, conn, event) -> None:
    if isinstance(event, h2.events.StreamEnded):
        conn.send_headers(event.stream_id, [(":status", "200"), ("grpc-status", "0")], end_stream=True)


@pytest.mark.parametrize("alpn", ["h2", None])
def test_tls_verifies_the_server_name_sent_by_sni_with_or_without_alpn(tmp_path, alpn: str | None) -> None:
    _ca, cert, key = _pki(tmp_path)  # a server certificate for xds.test, signed by tmp_path/ca.pem
    (tmp_path / "srv.pem").write_bytes(cert)
    (tmp_path / "srv.key").write_bytes(key)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")
    if alpn is not None:
        server_tls.set_alpn_protocols([alpn])
    names: list[str | None] = []
    server_tls.sni_callback = lambda sock, name, ctx: names.append(name)

    async def scenario(ch: Channel, raw: RawServer) -> object:
        try:
            return await asyncio.wait_for(ch.stream("/t.S/Echo", _requests(), Bytes.FromString).read(), 5)
        except RpcError as exc:
            return exc

    client_tls = tls_context((tmp_path / "ca.pem").read_bytes())
    for server_name, ok in (("xds.test", True), ("other.test", False)):
        got = asyncio.run(_raw(_ended_ok, scenario, tmp_path, server_tls=server_tls, tls=client_tls,
                               server_name=server_name))  # fmt: skip
        assert names[-1] == server_name
        if ok:
            assert got is EOF
        else:
            assert isinstance(got, RpcError) and got.code() is StatusCode.UNAVAILABLE
            assert "TLS handshake failed" in got.details() and "other.test" in got.details()


def test_keepalive_sends_at_most_two_pings_without_data_sent_in_between(tmp_path) -> None:
    pings: list[float] = []

    def behave(raw: RawServer, conn, event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            _ok_headers(conn, event.stream_id)
        elif isinstance(event, h2.events.PingReceived):
            pings.append(asyncio.get_running_loop().time())  # h2 answers it by itself

    async def scenario(ch: Channel, raw: RawServer) -> tuple[int, int]:
        outbox: asyncio.Queue = asyncio.Queue()

        async def requests() -> AsyncIterator[Bytes]:
            while True:
                yield await outbox.get()

        call = ch.stream("/t.S/Echo", requests(), Bytes.FromString)
        await asyncio.sleep(0.6)  # ~12 keepalive periods, idle
        idle = len(pings)
        outbox.put_nowait(Bytes(value=b"data"))  # a DATA frame sent: two more are allowed
        await asyncio.sleep(0.6)
        call.cancel()
        return idle, len(pings)

    idle, after_data = asyncio.run(_raw(behave, scenario, tmp_path, keepalive_s=0.05, keepalive_timeout_s=1))
    assert (idle, after_data) == (2, 4)


def test_a_client_certificate_from_the_bootstrap_files_is_presented(tmp_path) -> None:
    _ca, cert, key = _pki(tmp_path)
    (tmp_path / "srv.pem").write_bytes(cert)
    (tmp_path / "srv.key").write_bytes(key)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.pem"))
    server_tls.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")
    server_tls.verify_mode = ssl.CERT_REQUIRED  # no client certificate, no connection
    server_tls.set_alpn_protocols(["h2"])
    files = TlsFiles(ca=str(tmp_path / "ca.pem"), cert=str(tmp_path / "srv.pem"), key=str(tmp_path / "srv.key"),
                     server_name="xds.test")  # fmt: skip

    async def run() -> tuple[object, object]:
        raw = RawServer(_ended_ok)
        server = await asyncio.start_unix_server(raw.serve, f"{tmp_path}/raw.sock", ssl=server_tls)
        try:
            async with open_channel(f"unix://{tmp_path}/raw.sock", files, "server.tls") as ch:
                got = await asyncio.wait_for(ch.stream("/t.S/Echo", _requests(), Bytes.FromString).read(), 5)
            return got, raw.writer.get_extra_info("peercert")
        finally:
            server.close()
            raw.writer.close()

    got, peer = asyncio.run(run())
    assert got is EOF and peer is not None and dict(x[0] for x in peer["subject"])["commonName"] == "xds.test"
    with pytest.raises(CredentialsError, match=r"server.tls.key .*absent.key: cannot read"):
        absent = TlsFiles(ca=files.ca, cert=files.cert, key=str(tmp_path / "absent.key"))
        open_channel("unix:///x", absent, "server.tls")


def test_frequent_keepalive_pings_never_trip_grpcios_ping_policy(tmp_path) -> None:
    """grpcio's server sends GOAWAY too_many_pings after 3 PINGs within 5 minutes without data: pinging every
    50 ms over idle spells and exchanges, the stream stays up (two PINGs at most between DATA frames sent)."""

    async def scenario(target: str) -> list[bytes]:
        outbox: asyncio.Queue = asyncio.Queue()

        async def requests() -> AsyncIterator[Bytes]:
            while (item := await outbox.get()) is not None:
                yield item

        async with Channel(target, keepalive_s=0.05, keepalive_timeout_s=2) as ch:
            call = ch.stream("/t.S/Echo", requests(), Bytes.FromString)
            got = []
            for n in range(4):
                await asyncio.sleep(0.4)  # ~8 keepalive periods idle
                outbox.put_nowait(Bytes(value=b"x" * n))
                got.append((await asyncio.wait_for(call.read(), 5)).value)
            outbox.put_nowait(None)
            assert await asyncio.wait_for(call.read(), 5) is EOF
            return got

    assert _with_grpc_server(scenario, tmp_path) == [b"0", b"1", b"2", b"3"]


def test_the_window_is_given_back_as_messages_are_read_so_a_slow_reader_holds_the_server(tmp_path) -> None:
    message = encode_message(Bytes(value=b"m" * 1000).SerializeToString())  # 1,008 bytes on the wire

    def behave(raw: RawServer, conn, event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            _ok_headers(conn, event.stream_id)
            raw.outgoing = [(event.stream_id, message)] * 200  # 200 KB against a 16 KiB window

    async def scenario(ch: Channel, raw: RawServer) -> tuple[int, int, int]:
        call = ch.stream("/t.S/Echo", _requests(b"go"), Bytes.FromString)
        await asyncio.wait_for(call.read(), 5)
        await asyncio.sleep(0.3)  # the client reads nothing more: the server runs out of window
        held = raw.sent
        for _ in range(199):
            await asyncio.wait_for(call.read(), 5)
        return held, raw.sent, call._call.inbox.qsize() if call._call else -1

    held, sent, left = asyncio.run(_raw(behave, scenario, tmp_path, receive_window=16_384))
    assert held <= 17, f"{held} messages sent to a reader that read one: the window was not held back"
    assert sent == 200 and left == 0
