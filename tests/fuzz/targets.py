"""Fuzz targets for the parsers that face the network, and for xDS translation.

Each target takes one input (bytes) and must never raise: an exception is a finding. They run under atheris
(coverage-guided, tests/fuzz/run.py) and are replayed over the seed corpus (tests/fuzz/corpus/<target>/).
- http1: bytes from a client, in pieces, into the proxy's HTTP/1.1 Downstream protocol (head, chunked body,
  pipelining, upgrade/CONNECT holding) with a fake transport; routes answer directly (no upstream I/O).
- h2: the same bytes after the HTTP/2 preface into the h2 server connection (H2Downstream).
- h2client: bytes from an h2c upstream into the codec's client side (h2_codec.H2ClientCodec), three streams open,
  driven as H2Side drives it (data acknowledged, DATA sent into the windows it grants).
- sniff: the sniff classifier on every prefix of the input, and its final verdict.
- sni: the TLS record reader and ClientHello parser (SNI, ALPN) and the SNI chain selection.
- xds: a valid Listener / RouteConfiguration / Cluster from the repository's example, mutated field by field
  with well-typed values; translation succeeds (and the workers' routing tables build) or raises ConfigError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from functools import cache
from types import MappingProxyType

from planemesh.agent.proxy.downstream import Downstream
from planemesh.agent.proxy.h2_codec import GOAWAY, H2ClientCodec, ProtocolError, StreamClosedError
from planemesh.agent.proxy.h2_downstream import H2Downstream
from planemesh.agent.proxy.server import PlaneProxy, RoutingTable
from planemesh.agent.proxy.sni_routing import SniRoutes, server_name_error
from planemesh.agent.proxy.sniff import MAX_PEEK, Kind, classify, parse_client_hello
from planemesh.model.config import (
    ConfigError,
    DirectResponse,
    FaultFilter,
    HeaderMatch,
    Listener,
    ListenerProtocol,
    QueryMatch,
    Redirect,
    Route,
    RouteAction,
    RouteMatch,
    UpgradeConfig,
)

PROXY_PORT = 15001
HELD_PORT = 15002  # a listener whose fault filter holds every request: bodies and pipelined requests get parsed
PEER = ("127.0.0.1", 40000)
# The connection's destination is one of the proxy's own listeners on loopback: their routes (all direct
# responses) apply, and nothing could ever be forwarded anywhere but to loopback.


class FakeTransport(asyncio.Transport):
    """What the proxy's protocols call on their transport, recording writes; no socket."""

    def __init__(self, destination: tuple[str, int]) -> None:
        super().__init__()
        self.destination = destination
        self.written = 0
        self.closed = False
        self.protocol: asyncio.BaseProtocol | None = None

    def get_extra_info(self, name, default=None):
        return {"sockname": self.destination, "peername": PEER, "socket": None}.get(name, default)

    def write(self, data) -> None:
        self.written += len(data)

    def writelines(self, chunks) -> None:
        for c in chunks:
            self.write(c)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol

    def get_protocol(self):
        return self.protocol

    def get_write_buffer_size(self) -> int:
        return 0


# Routes that answer without an upstream: every code path up to routing and body framing runs, no I/O.
ROUTES = (
    Route(name="regex", match=RouteMatch(prefix=None, regex="/r/(a+)+[0-9]*"), direct_response=DirectResponse(200)),
    Route(name="hdr", match=RouteMatch(prefix="/h", headers=(HeaderMatch(name="x-v", regex="v[0-9]+"),)),
          direct_response=DirectResponse(201, b"h")),
    Route(name="q", match=RouteMatch(prefix="/q", query=(QueryMatch(name="id", regex="[a-f]+"),)),
          direct_response=DirectResponse(202)),
    Route(name="redirect", match=RouteMatch(prefix="/old"), redirect=Redirect(path="/new")),
    Route(name="connect", match=RouteMatch(prefix=None, connect=True),
          direct_response=DirectResponse(403), action=RouteAction(upgrades=(UpgradeConfig("connect"),))),
    Route(name="all", match=RouteMatch(prefix="/"), direct_response=DirectResponse(200, b"ok")),
)  # fmt: skip


class _ProxyBench:
    """One PlaneProxy bound to a private (not running) event loop; callbacks run by spinning it briefly."""

    def __init__(self) -> None:
        from tests.proxy.proxy_harness import make_snapshot

        self.loop = asyncio.new_event_loop()
        self.errors: list[dict] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.errors.append(ctx))
        snapshot = make_snapshot(PROXY_PORT, [], routes=ROUTES)
        held = replace(snapshot.listeners[0], name="held", port=HELD_PORT,
                       http_filters=(FaultFilter(delay_s=3600.0, delay_percent=100.0),))
        snapshot = replace(snapshot, listeners=(*snapshot.listeners, held))
        self.proxy = PlaneProxy(snapshot, "oam", tick_s=3600.0)
        self.loop.run_until_complete(self._bind())

    async def _bind(self) -> None:
        self.proxy._bind_loop()
        self.proxy.listen_ports.update((PROXY_PORT, HELD_PORT))

    def spin(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0))

    def check(self) -> None:
        if self.errors:
            ctx = self.errors[0]
            self.errors.clear()
            exc = ctx.get("exception")
            raise exc if exc is not None else RuntimeError(ctx.get("message", "loop error"))


@cache
def _bench() -> _ProxyBench:
    return _ProxyBench()


def _pieces(data: bytes) -> list[bytes]:
    """The input cut where its first byte says: a client's bytes arrive in any split."""
    if len(data) < 2:
        return [data]
    step = 1 + data[0] % 32
    body = data[1:]
    if data[0] & 0x80:  # one read
        return [body]
    return [body[i : i + step] for i in range(0, len(body), step)]


def _drive(protocol: asyncio.Protocol, data: bytes, bench: _ProxyBench) -> None:
    """Bit 0x40 of the first byte picks the listener (direct answers, or requests held by a fault delay)."""
    pieces = _pieces(data)
    transport = FakeTransport(("127.0.0.1", HELD_PORT if data[:1] and data[0] & 0x40 else PROXY_PORT))
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    for piece in pieces:
        current = transport.protocol  # an h2c preface hands the connection to H2Downstream
        if transport.closed:
            break
        current.data_received(piece)  # type: ignore[union-attr]
        bench.spin()
    transport.protocol.connection_lost(None)  # type: ignore[union-attr]
    bench.spin()
    bench.check()


def http1(data: bytes) -> None:
    bench = _bench()
    _drive(Downstream(bench.proxy), data, bench)
    assert not bench.proxy.connections, "a closed connection stayed registered"


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2(data: bytes) -> None:
    bench = _bench()
    data = data or b"\x80"
    _drive(H2Downstream(bench.proxy), data[:1] + H2_PREFACE + data[1:], bench)


H2_REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]


def h2client(data: bytes) -> None:
    codec = H2ClientCodec(1000, 1000, 1 << 16, 1 << 17)
    codec.initiate_connection()
    for sid in (1, 3, 5):
        codec.send_headers(sid, H2_REQUEST, end_stream=sid == 1)
    codec.data_to_send()
    half = len(data) // 2
    try:
        for piece in (data[:half], data[half:]):
            for event in codec.receive_data(piece):
                sid = getattr(event, "stream_id", 0)
                length = getattr(event, "flow_controlled_length", None)
                if length is not None:
                    codec.acknowledge_received_data(length, sid)
                elif sid and not codec.closed:
                    try:
                        window = codec.local_flow_control_window(sid)
                        if window > 0:
                            codec.send_data(sid, b"x" * min(window, codec.max_outbound_frame_size, 40000))
                    except StreamClosedError:
                        pass
            codec.data_to_send()
    except ProtocolError:
        assert codec.closed
        out, kinds = codec.data_to_send(), []
        while len(out) >= 9:  # the frames prepared: the last one is the GOAWAY
            kinds.append(out[3])
            out = out[9 + int.from_bytes(out[:3], "big") :]
        assert kinds[-1:] == [GOAWAY] and not out, kinds


def sniff(data: bytes) -> None:
    data = data[: MAX_PEEK + 64]
    decided = None
    for end in range(0, len(data) + 1, max(1, len(data) // 64)):
        verdict = classify(data[:end])
        if verdict is not None:
            decided = verdict
            break
    final = classify(data, final=True)
    assert final is not None
    if decided is not None and decided.kind is not Kind.TLS:  # TLS may read more of the ClientHello later
        assert final.kind is decided.kind, (decided, final)


@cache
def _sni_routes() -> SniRoutes:
    def tls(name: str, names: tuple[str, ...]) -> Listener:
        return Listener(name=name, plane="oam", port=443, protocol=ListenerProtocol.TCP, server_names=names)

    return SniRoutes([tls("exact", ("api.example.com",)), tls("wild", ("*.example.com",)), tls("any", ())])


def sni(data: bytes) -> None:
    """A TLS record: the input as the ClientHello handshake body (with a valid record header), then raw."""
    record = b"\x16\x03\x01" + min(len(data), 0xFFFF).to_bytes(2, "big") + data[:0xFFFF]
    for verdict in (classify(record, final=True), classify(data, final=True)):
        if verdict.kind is Kind.TLS:
            assert verdict.sni is None or len(verdict.sni) <= 253
            server_name_error(verdict.sni or "")
            _sni_routes().select(443, "198.18.1.20", verdict.sni)
    parse_client_hello(data)


# ---- xDS translation ----------------------------------------------------------------------------------


@cache
def _example_resources() -> list:
    from importlib import resources as importlib_resources

    from planemesh.xds.resources import parse_resource_text, unpack

    text = importlib_resources.files("planemesh.xds").joinpath("examples/two-planes.yaml").read_text()
    return [unpack(p, p.type_url) for p in parse_resource_text(text, "example")]


@cache
def _planes():
    from planemesh.model.static_config import load_default_config

    return load_default_config().planes


class _Mutator:
    """Well-typed field mutations of a protobuf message, steered by a FuzzedDataProvider-like source."""

    def __init__(self, fdp) -> None:
        self.fdp = fdp

    def scalar(self, field):
        from google.protobuf.descriptor import FieldDescriptor as F

        fdp = self.fdp
        t = field.type
        if t == F.TYPE_STRING:
            pick = fdp.ConsumeIntInRange(0, 5)
            specials = ["", "*", "0.0.0.0", "/", "(a+)+$", "::1"]
            return specials[pick] if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(24)
        if t == F.TYPE_BYTES:
            return fdp.ConsumeBytes(24)
        if t == F.TYPE_BOOL:
            return fdp.ConsumeBool()
        if t == F.TYPE_ENUM:
            values = field.enum_type.values
            return values[fdp.ConsumeIntInRange(0, len(values) - 1)].number
        if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
            return fdp.ConsumeRegularFloat()
        if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
            return fdp.ConsumeIntInRange(0, 2**32 - 1)
        if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
            return fdp.ConsumeIntInRange(0, 2**64 - 1)
        if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
            return fdp.ConsumeIntInRange(-(2**31), 2**31 - 1)
        return fdp.ConsumeIntInRange(-(2**63), 2**63 - 1)

    def mutate(self, msg, depth: int = 0) -> None:
        from google.protobuf.descriptor import FieldDescriptor as F

        fdp = self.fdp
        fields = msg.DESCRIPTOR.fields
        if not fields or depth > 12:
            return
        for _ in range(fdp.ConsumeIntInRange(0, 3)):
            if fdp.remaining_bytes() == 0:
                return
            field = fields[fdp.ConsumeIntInRange(0, len(fields) - 1)]
            repeated = field.is_repeated
            is_msg = field.type == F.TYPE_MESSAGE
            op = fdp.ConsumeIntInRange(0, 3)
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                if op == 0:
                    msg.ClearField(field.name)
                continue
            if op == 0:
                msg.ClearField(field.name)
            elif repeated:
                container = getattr(msg, field.name)
                if is_msg:
                    self.mutate(container[fdp.ConsumeIntInRange(0, len(container) - 1)] if len(container) and op == 1
                                else container.add(), depth + 1)  # fmt: skip
                else:
                    container.append(self.scalar(field))
            elif is_msg:
                self.mutate(getattr(msg, field.name), depth + 1)  # a set or a fresh sub-message
            else:
                setattr(msg, field.name, self.scalar(field))
        # Walk on into the sub-messages already set, so deep fields get their turn too.
        if fdp.ConsumeBool():
            present = [f for f, _ in msg.ListFields() if f.type == F.TYPE_MESSAGE]
            if present:
                field = present[fdp.ConsumeIntInRange(0, len(present) - 1)]
                value = getattr(msg, field.name)
                if field.is_repeated:
                    if field.message_type.GetOptions().map_entry or not len(value):
                        return
                    value = value[fdp.ConsumeIntInRange(0, len(value) - 1)]
                self.mutate(value, depth + 1)


def xds(data: bytes, provider: Callable | None = None) -> None:
    import atheris
    from google.protobuf.any_pb2 import Any as AnyMsg

    from planemesh.xds.client_state import XdsResources
    from planemesh.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
    from planemesh.xds.translate import translate

    fdp = (provider or atheris.FuzzedDataProvider)(data)
    by_type: dict[str, dict] = {LISTENER: {}, ROUTE: {}, CLUSTER: {}, ENDPOINT: {}}
    originals = _example_resources()
    for original in originals:
        msg = type(original)()
        msg.CopyFrom(original)
        type_url = "type.googleapis.com/" + msg.DESCRIPTOR.full_name
        by_type.setdefault(type_url, {})[getattr(msg, "name", "") or getattr(msg, "cluster_name", "")] = msg
    mutator = _Mutator(fdp)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        pool = [m for msgs in by_type.values() for m in msgs.values()]
        target = pool[fdp.ConsumeIntInRange(0, len(pool) - 1)]
        mutator.mutate(target)
        # Typed configs (Any) carry nested messages: mutate inside them too, then pack them back.
        for any_msg in _anys(target):
            if fdp.remaining_bytes() and fdp.ConsumeBool():
                inner = _unpack_any(any_msg)
                if inner is not None:
                    mutator.mutate(inner)
                    packed = AnyMsg()
                    packed.Pack(inner)
                    any_msg.CopyFrom(packed)
    resources = XdsResources(
        listeners=MappingProxyType(by_type[LISTENER]), routes=MappingProxyType(by_type[ROUTE]),
        clusters=MappingProxyType(by_type[CLUSTER]), endpoints=MappingProxyType(by_type[ENDPOINT]),
        versions=MappingProxyType({"LDS": "1"}),
    )  # fmt: skip
    try:
        snapshot = translate(resources, _planes())
    except ConfigError:
        return
    for plane in snapshot.planes:  # what a worker builds from it must build too
        RoutingTable(snapshot, plane.name)


def _anys(msg) -> list:
    from google.protobuf.descriptor import FieldDescriptor as F

    out = []
    for field, value in msg.ListFields():
        if field.type != F.TYPE_MESSAGE or field.message_type.GetOptions().map_entry:
            continue
        for item in value if field.is_repeated else (value,):
            if field.message_type.full_name == "google.protobuf.Any":
                out.append(item)
            else:
                out.extend(_anys(item))
    return out


def _unpack_any(any_msg):
    from google.protobuf import descriptor_pool, message_factory

    try:
        desc = descriptor_pool.Default().FindMessageTypeByName(any_msg.type_url.rpartition("/")[2])
        inner = message_factory.GetMessageClass(desc)()
        inner.ParseFromString(any_msg.value)
    except Exception:  # an unknown type or undecodable bytes: leave it as it is
        return None
    return inner


TARGETS: dict[str, Callable[[bytes], None]] = {
    "http1": http1, "h2": h2, "h2client": h2client, "sniff": sniff, "sni": sni, "xds": xds,
}  # fmt: skip
# The modules each target exercises: atheris instruments them for coverage feedback.
INSTRUMENT = {
    "http1": ("planemesh.agent.proxy.downstream", "planemesh.agent.proxy.exchange", "planemesh.agent.proxy.http1",
              "planemesh.agent.proxy.request_head", "planemesh.agent.proxy.routing"),
    "h2": ("planemesh.agent.proxy.h2", "planemesh.agent.proxy.h2_upstream", "planemesh.agent.proxy.h2_hpack",
           "planemesh.agent.proxy.h2_goaway", "planemesh.agent.proxy.h2_codec", "planemesh.agent.proxy.h2_hpack_decode",
           "planemesh.agent.proxy.h2_downstream", "planemesh.agent.proxy.h2_guard"),
    "h2client": ("planemesh.agent.proxy.h2_codec", "planemesh.agent.proxy.h2_hpack_decode"),
    "sniff": ("planemesh.agent.proxy.sniff",),
    "sni": ("planemesh.agent.proxy.sniff", "planemesh.agent.proxy.sni_routing"),
    "xds": ("planemesh.xds",),
}  # fmt: skip
