"""The sans-IO HTTP/2 server codec (agent/proxy/h2_codec.py): frames in -> events, calls -> frames out, checked
against RFC 9113 and against an independent peer (the h2 library as the client)."""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.events as ev
import hpack
import pytest

from planemesh.agent.proxy import h2_codec as c
from planemesh.labs import h2_frames as hf

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/a")]


def block(fields=GET) -> bytes:
    return hpack.Encoder().encode(fields)


def codec(window: int = 65535, connection_window: int = 1 << 20, enforced: int = 10) -> c.H2ServerCodec:
    server = c.H2ServerCodec(8, enforced, window, connection_window)
    server.initiate_connection()
    server.data_to_send()
    return server


def opened(server: c.H2ServerCodec, *frames: bytes, settings: dict[int, int] | None = None) -> list:
    """The client's preface and SETTINGS, then `frames`: the events of them all."""
    return server.receive_data(hf.client_preface(settings) + b"".join(frames))


def frames_of(data: bytes) -> list[hf.Frame]:
    reader = hf.FrameReader()
    return list(reader.feed(data))


def goaway_of(server: c.H2ServerCodec) -> tuple[int, int, bytes]:
    found = [f for f in frames_of(server.data_to_send()) if f.kind == hf.GOAWAY]
    assert len(found) == 1
    last, code = struct.unpack(">II", found[0].payload[:8])
    return last, code, found[0].payload[8:]


def connection_error(data: bytes, settings: dict[int, int] | None = None, **kw) -> tuple[int, int]:
    """Feed `data` after the preface: the ProtocolError's code and the GOAWAY's (they must agree)."""
    server = codec(**kw)
    with pytest.raises(c.ProtocolError) as raised:
        opened(server, data, settings=settings)
    _, code, _ = goaway_of(server)
    assert code == raised.value.error_code
    assert server.receive_data(hf.ping()) == []  # closed: nothing more is taken
    return code, raised.value.error_code


# ---- against a real client ---------------------------------------------------------------------------------


def test_a_request_and_its_response_round_trip_with_the_h2_library_as_client() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.send_headers(1, GET, end_stream=True)
    server = c.H2ServerCodec(100, 216, 1 << 20, 1 << 20)
    server.initiate_connection()
    events = server.receive_data(client.data_to_send())
    kinds = [type(e) for e in events]
    assert kinds == [ev.RemoteSettingsChanged, ev.RequestReceived, ev.StreamEnded]
    request = events[1]
    assert request.stream_id == 1 and list(request.headers) == GET and request.stream_ended is events[2]
    server.send_headers(1, [(b":status", b"200"), (b"content-type", b"text/plain")])
    assert server.local_flow_control_window(1) == 65535  # the client's default stream window
    server.send_data(1, b"hello", end_stream=True)
    got = client.receive_data(server.data_to_send())
    kinds = [type(e) for e in got]
    assert ev.RemoteSettingsChanged in kinds and ev.SettingsAcknowledged in kinds  # our SETTINGS, its ACK
    response = next(e for e in got if isinstance(e, ev.ResponseReceived))
    assert dict(response.headers)[b":status"] == b"200"
    assert b"".join(e.data for e in got if isinstance(e, ev.DataReceived)) == b"hello"
    assert any(isinstance(e, ev.StreamEnded) for e in got)
    assert client.remote_settings.max_concurrent_streams == 100
    assert client.outbound_flow_control_window == 1 << 20  # the connection window, granted at once
    assert client.remote_settings.initial_window_size == 1 << 20  # each stream's
    assert server.streams == {}  # ended both ways: forgotten


def test_the_connection_window_beyond_65535_is_granted_at_once() -> None:
    server = c.H2ServerCodec(8, 16, 1 << 16, 1 << 20)
    server.initiate_connection()
    updates = [f for f in frames_of(server.data_to_send()) if f.kind == hf.WINDOW_UPDATE]
    assert [(f.stream_id, struct.unpack(">I", f.payload)[0]) for f in updates] == [(0, (1 << 20) - 65535)]


def test_bytes_fed_one_at_a_time_give_the_same_events() -> None:
    data = hf.client_preface() + hf.headers(1, block(), end_stream=False) + hf.frame(hf.DATA, 1, 1, b"body")
    whole = codec().receive_data(data)
    server = codec()
    pieces = [e for i in range(len(data)) for e in server.receive_data(data[i : i + 1])]
    assert [type(e) for e in pieces] == [type(e) for e in whole]
    assert [e.data for e in pieces if isinstance(e, ev.DataReceived)] == [b"body"]


# ---- frame edge cases --------------------------------------------------------------------------------------


def test_padding_is_removed_and_counted_in_flow_control() -> None:
    padded_headers = hf.frame(hf.HEADERS, c.PADDED | c.END_HEADERS, 1, b"\x03" + block() + b"\x00" * 3)
    padded_data = hf.frame(hf.DATA, c.PADDED | c.END_STREAM, 1, b"\x04body" + b"\x00" * 4)
    server = codec()
    events = opened(server, padded_headers, padded_data)
    request = next(e for e in events if isinstance(e, ev.RequestReceived))
    data = next(e for e in events if isinstance(e, ev.DataReceived))
    assert list(request.headers) == GET
    assert (data.data, data.flow_controlled_length) == (b"body", 9)  # the pad length byte and the padding count
    assert data.stream_ended is not None


def test_headers_with_priority_fields() -> None:
    prio = struct.pack(">IB", 0, 15)
    events = opened(codec(), hf.frame(hf.HEADERS, c.PRIORITY_FLAG | c.END_HEADERS | c.END_STREAM, 1, prio + block()))
    assert list(next(e for e in events if isinstance(e, ev.RequestReceived)).headers) == GET


def test_a_header_block_across_continuation_frames() -> None:
    whole = block()
    events = opened(
        codec(),
        hf.frame(hf.HEADERS, c.END_STREAM, 1, whole[:3]),
        hf.frame(9, 0, 1, whole[3:6]),
        hf.frame(9, c.END_HEADERS, 1, whole[6:]),
    )
    request = next(e for e in events if isinstance(e, ev.RequestReceived))
    assert list(request.headers) == GET and request.stream_ended is not None


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (hf.frame(hf.DATA, 1, 0, b"x"), c.PROTOCOL_ERROR),  # DATA on stream 0
        (hf.frame(hf.HEADERS, 4, 0, b"\x82"), c.PROTOCOL_ERROR),  # HEADERS on stream 0
        (hf.frame(hf.HEADERS, 5, 2, b"\x82"), c.PROTOCOL_ERROR),  # an even (server) stream id from a client
        (hf.frame(hf.HEADERS, 5, 1, b"\xff\xff\xff\xff\xff\xff"), c.COMPRESSION_ERROR),  # undecodable HPACK
        (hf.frame(hf.HEADERS, 5, 1, b"\xbf"), c.COMPRESSION_ERROR),  # index 63: not in any table
        (hf.frame(hf.HEADERS, 0, 1, b"\x82") + hf.ping(), c.PROTOCOL_ERROR),  # header block interrupted
        (hf.frame(9, 4, 1, b"\x82"), c.PROTOCOL_ERROR),  # CONTINUATION without HEADERS
        (hf.frame(hf.HEADERS, 0, 1, b"\x82") + hf.frame(9, 4, 3, b"\x84"), c.PROTOCOL_ERROR),  # other stream
        (hf.frame(hf.HEADERS, 0, 1, b"") + hf.frame(9, 0, 1) * 65, c.ENHANCE_YOUR_CALM),  # CONTINUATION flood
        (hf.frame(hf.HEADERS, 0x8 | 0x4, 1, b"\x05\x82"), c.PROTOCOL_ERROR),  # padding longer than the payload
        (hf.frame(hf.DATA, 0x8, 1, b""), c.PROTOCOL_ERROR),  # PADDED without a pad length (stream 1 idle too)
        (hf.frame(hf.DATA, 0, 1, b"x"), c.PROTOCOL_ERROR),  # DATA on an idle stream
        (hf.frame(hf.PING, 0, 0, b"1234567"), c.FRAME_SIZE_ERROR),
        (hf.frame(hf.PING, 0, 1, b"12345678"), c.PROTOCOL_ERROR),  # PING on a stream
        (hf.frame(hf.SETTINGS, 0, 0, b"\x00\x04\x00\x00"), c.FRAME_SIZE_ERROR),  # length not a multiple of 6
        (hf.frame(hf.SETTINGS, 1, 0, b"\x00" * 6), c.FRAME_SIZE_ERROR),  # an ACK with a payload
        (hf.frame(hf.SETTINGS, 0, 1), c.PROTOCOL_ERROR),  # SETTINGS on a stream
        (hf.settings({4: 1 << 31}), c.FLOW_CONTROL_ERROR),  # initial window past 2^31-1
        (hf.settings({5: 100}), c.PROTOCOL_ERROR),  # max frame size below 16384
        (hf.settings({2: 2}), c.PROTOCOL_ERROR),  # ENABLE_PUSH other than 0/1
        (hf.frame(hf.WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)), c.PROTOCOL_ERROR),
        (hf.frame(hf.WINDOW_UPDATE, 0, 0, b"\x00\x01"), c.FRAME_SIZE_ERROR),
        (hf.window_update(0, hf.MAX_STREAM_ID), c.FLOW_CONTROL_ERROR),  # connection window past 2^31-1
        (hf.window_update(5, 1), c.PROTOCOL_ERROR),  # WINDOW_UPDATE on an idle stream
        (hf.rst_stream(1), c.PROTOCOL_ERROR),  # RST_STREAM on an idle stream
        (hf.frame(hf.RST_STREAM, 0, 0, b"\x00\x00\x00\x08"), c.PROTOCOL_ERROR),
        (hf.frame(hf.RST_STREAM, 0, 1, b"\x00\x08"), c.FRAME_SIZE_ERROR),
        (hf.frame(2, 0, 1, b"\x00" * 4), c.FRAME_SIZE_ERROR),  # PRIORITY of 4 bytes
        (hf.frame(5, 4, 1, b"\x00\x00\x00\x02\x82"), c.PROTOCOL_ERROR),  # PUSH_PROMISE from a client
        (hf.frame(hf.GOAWAY, 0, 0, b"\x00" * 4), c.FRAME_SIZE_ERROR),
        (hf.frame(hf.DATA, 0, 1, b"x" * 16385), c.FRAME_SIZE_ERROR),  # past SETTINGS_MAX_FRAME_SIZE
    ],
)
def test_invalid_frames_are_connection_errors_with_rfc_9113_codes(data: bytes, code: int) -> None:
    assert connection_error(data) == (code, code)


def test_the_preface_and_first_settings_are_required() -> None:
    server = codec()
    with pytest.raises(c.ProtocolError):
        server.receive_data(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 10)
    server = codec()
    assert server.receive_data(hf.PREFACE[:10]) == []  # a prefix: wait for more
    with pytest.raises(c.ProtocolError):
        server.receive_data(hf.PREFACE[10:] + hf.ping())  # the first frame is not SETTINGS
    assert goaway_of(server)[1] == c.PROTOCOL_ERROR


def test_too_many_concurrent_streams_past_the_enforced_limit() -> None:
    server = codec(enforced=2)
    opened(server, hf.headers(1, block(), end_stream=False), hf.headers(3, block(), end_stream=False))
    with pytest.raises(c.ProtocolError):
        server.receive_data(hf.headers(5, block()))
    assert goaway_of(server)[:2] == (3, c.PROTOCOL_ERROR)  # last stream: the highest the client opened


def test_headers_on_a_closed_stream_is_a_connection_error_unless_the_stream_was_reset() -> None:
    """RFC 9113 5.1: a closed stream (ended both ways, or an idle one that a higher stream id closed) takes no
    HEADERS: STREAM_CLOSED. One that was reset may still see frames sent before the peer knew: dropped."""
    server = codec()
    opened(server, hf.headers(5, block(), end_stream=False), hf.rst_stream(5))
    server.data_to_send()
    assert server.receive_data(hf.headers(5, block())) == []  # reset: in flight, dropped
    assert server.data_to_send() == b""
    with pytest.raises(c.ProtocolError):
        server.receive_data(hf.headers(3, block()))  # never opened, below 5: closed
    assert goaway_of(server)[:2] == (5, c.STREAM_CLOSED)


# ---- stream errors (MadeYouReset's provocations) --------------------------------------------------------------


def stream_error(*frames: bytes) -> tuple[list, list[hf.Frame]]:
    server = codec()
    opened(server, hf.headers(1, block(), end_stream=True))
    server.data_to_send()
    events = server.receive_data(b"".join(frames))
    with pytest.raises(c.StreamClosedError):  # reset: nothing more is sent on it
        server.send_headers(1, [(b":status", b"200")])
    return events, frames_of(server.data_to_send())


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (hf.frame(hf.DATA, 0, 1, b"x"), c.STREAM_CLOSED),  # DATA after END_STREAM
        (hf.headers(1, block()), c.STREAM_CLOSED),  # HEADERS after END_STREAM
        (hf.window_update(1, hf.MAX_STREAM_ID), c.FLOW_CONTROL_ERROR),  # the stream window past 2^31-1
        (hf.frame(hf.WINDOW_UPDATE, 0, 1, struct.pack(">I", 0)), c.PROTOCOL_ERROR),  # increment 0 on a stream
    ],
)
def test_stream_errors_reset_the_stream_and_report_a_reset_not_sent_by_the_client(frame: bytes, code: int) -> None:
    events, sent = stream_error(frame)
    resets = [e for e in events if isinstance(e, ev.StreamReset)]
    assert [(e.stream_id, e.error_code, e.remote_reset) for e in resets] == [(1, code, False)]
    assert [(f.kind, f.stream_id, struct.unpack(">I", f.payload)[0]) for f in sent if f.kind != hf.WINDOW_UPDATE] == [
        (hf.RST_STREAM, 1, code)
    ]


def test_trailers_end_the_stream_and_trailers_without_end_stream_are_refused() -> None:
    server = codec()
    events = opened(server, hf.headers(1, block(), end_stream=False),
                    hf.headers(1, block([(b"grpc-status", b"0")]), end_stream=True))  # fmt: skip
    trailers = next(e for e in events if isinstance(e, ev.TrailersReceived))
    assert list(trailers.headers) == [(b"grpc-status", b"0")] and trailers.stream_ended is not None
    with pytest.raises(c.ProtocolError):
        opened(
            codec(), hf.headers(1, block(), end_stream=False), hf.headers(1, block([(b"a", b"b")]), end_stream=False)
        )


def test_a_client_reset_is_reported_once_and_later_frames_on_the_stream_are_dropped() -> None:
    server = codec()
    events = opened(server, hf.headers(1, block(), end_stream=False), hf.rst_stream(1, hf.CANCEL))
    assert [(e.error_code, e.remote_reset) for e in events if isinstance(e, ev.StreamReset)] == [(hf.CANCEL, True)]
    server.data_to_send()
    later = server.receive_data(hf.frame(hf.DATA, 0, 1, b"late") + hf.rst_stream(1) + hf.window_update(1, 5))
    assert [type(e) for e in later] == [ev.DataReceived, ev.WindowUpdated]  # reported for the guard's counts
    with pytest.raises(c.StreamClosedError):
        server.send_data(1, b"x")


# ---- control frames -----------------------------------------------------------------------------------------------


def test_settings_are_applied_and_acknowledged_and_pings_answered() -> None:
    server = codec()
    opened(server, hf.headers(1, block()))
    server.data_to_send()
    events = server.receive_data(hf.settings({4: 100, 5: 32768, 1: 0}) + hf.ping(b"abcdefgh"))
    changed = next(e for e in events if isinstance(e, ev.RemoteSettingsChanged))
    assert changed.changed_settings == {4: 100, 5: 32768, 1: 0}
    assert any(isinstance(e, ev.PingReceived) and e.ping_data == b"abcdefgh" for e in events)
    sent = frames_of(server.data_to_send())
    assert [(f.kind, f.flags, f.payload) for f in sent] == [(hf.SETTINGS, hf.ACK, b""), (hf.PING, hf.ACK, b"abcdefgh")]
    assert server.max_outbound_frame_size == 32768
    assert server.local_flow_control_window(1) == 100  # stream 1 window moved by the difference (RFC 9113 6.9.2)
    assert server.encoder.header_table_size == 0
    assert [type(e) for e in server.receive_data(hf.settings_ack())] == [ev.SettingsAcknowledged]


def test_a_smaller_initial_window_can_take_open_windows_negative() -> None:
    server = codec()
    opened(server, hf.headers(1, block()))
    server.send_headers(1, [(b":status", b"200")])
    server.send_data(1, b"x" * 1000)
    server.receive_data(hf.settings({4: 500}))
    assert server.local_flow_control_window(1) == -500
    server.receive_data(hf.window_update(1, 600))
    assert server.local_flow_control_window(1) == 100


def test_goaway_from_the_client_and_unknown_frames_are_reported() -> None:
    events = opened(codec(), hf.frame(0xFA, 0, 0, b"?"), hf.frame(hf.GOAWAY, 0, 0, struct.pack(">II", 7, 0) + b"bye"))
    assert isinstance(events[1], ev.UnknownFrameReceived)
    assert (events[2].last_stream_id, events[2].error_code, events[2].additional_data) == (7, 0, b"bye")


# ---- flow control --------------------------------------------------------------------------------------------


def test_send_windows_follow_window_updates_and_overruns_are_refused() -> None:
    server = codec()
    opened(server, hf.headers(1, block()), settings={4: 10})
    server.send_headers(1, [(b":status", b"200")])
    assert server.local_flow_control_window(1) == 10
    server.send_data(1, b"x" * 10)
    assert server.local_flow_control_window(1) == 0
    with pytest.raises(c.ProtocolError):
        server.send_data(1, b"y")
    server.receive_data(hf.window_update(1, 5))
    assert server.local_flow_control_window(1) == 5
    assert server.send_window == 65535 - 10  # the connection's window: its own WINDOW_UPDATEs


def test_received_data_is_credited_back_in_half_window_batches() -> None:
    server = codec(window=1000, connection_window=65535)
    opened(server, hf.headers(1, block(), end_stream=False), hf.frame(hf.DATA, 0, 1, b"x" * 1000))
    with pytest.raises(c.ProtocolError) as raised:  # the stream window is spent: one more byte is a violation
        server.receive_data(hf.frame(hf.DATA, 0, 1, b"x"))
    assert raised.value.error_code == c.FLOW_CONTROL_ERROR
    server = codec(window=1000, connection_window=65535)
    opened(server, hf.headers(1, block(), end_stream=False), hf.frame(hf.DATA, 0, 1, b"x" * 500))
    server.data_to_send()
    server.acknowledge_received_data(400, 1)
    assert server.data_to_send() == b""  # below half the window: not yet
    server.acknowledge_received_data(100, 1)
    updates = [(f.stream_id, struct.unpack(">I", f.payload)[0]) for f in frames_of(server.data_to_send())]
    assert updates == [(1, 500)]  # the connection's half (32767) is not reached yet
    events = server.receive_data(hf.frame(hf.DATA, 0, 1, b"x" * 1000))  # the credit is usable at once
    assert sum(e.flow_controlled_length for e in events if isinstance(e, ev.DataReceived)) == 1000
    server.acknowledge_received_data(10, 1)  # a spent window is credited whatever the amount: the client waits
    assert [(f.stream_id, struct.unpack(">I", f.payload)[0]) for f in frames_of(server.data_to_send())] == [(1, 10)]


def test_data_on_a_closed_stream_is_credited_to_the_connection() -> None:
    server = codec(connection_window=65535)
    opened(server, hf.headers(1, block(), end_stream=False), hf.rst_stream(1))
    server.data_to_send()
    events = server.receive_data(hf.frame(hf.DATA, 0, 1, b"x" * 16384) * 2)
    assert [(e.stream_id, e.flow_controlled_length) for e in events] == [(1, 16384)] * 2  # reported (guard counts)
    for e in events:  # as H2Side does for a stream nobody takes
        server.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
    updates = [(f.stream_id, struct.unpack(">I", f.payload)[0]) for f in frames_of(server.data_to_send())]
    assert updates == [(0, 32768)]


def test_a_large_header_block_is_sent_in_continuation_frames_a_client_reassembles() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.send_headers(1, GET, end_stream=True)
    server = codec()
    server.receive_data(client.data_to_send())
    server.data_to_send()
    big = [(b":status", b"200")] + [(f"x-field-{i}".encode(), b"v" * 200) for i in range(200)]
    server.send_headers(1, big, end_stream=True)
    out = server.data_to_send()
    assert [f.kind for f in frames_of(out)].count(9) >= 2
    response = next(e for e in client.receive_data(out) if isinstance(e, ev.ResponseReceived))
    assert list(response.headers) == big


def test_close_connection_names_the_last_stream_and_reason_and_ends_sending() -> None:
    server = codec()
    opened(server, hf.headers(1, block(), end_stream=False), hf.headers(3, block(), end_stream=False))
    server.data_to_send()
    server.close_connection(c.ENHANCE_YOUR_CALM, b"premature_resets")
    assert goaway_of(server) == (3, c.ENHANCE_YOUR_CALM, b"premature_resets")
    with pytest.raises(c.ProtocolError):
        server.send_headers(1, [(b":status", b"200")])
    with pytest.raises(c.ProtocolError):
        server.close_connection()


# ---- the client side (h2c upstreams), with the h2 library as the server ---------------------------------------


def h2_server() -> h2.connection.H2Connection:
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    return server


def client_codec() -> c.H2ClientCodec:
    client = c.H2ClientCodec(1000, 1000, 1 << 20, 1 << 22)
    client.initiate_connection()
    return client


def test_client_side_request_interim_response_trailers_round_trip() -> None:
    client, server = client_codec(), h2_server()
    sid = client.get_next_available_stream_id()
    assert sid == 1
    client.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")])
    client.send_data(sid, b"body", end_stream=True)
    assert client.get_next_available_stream_id() == 3
    events = server.receive_data(client.data_to_send())
    assert server.remote_settings.enable_push == 0
    assert [e.data for e in events if isinstance(e, ev.DataReceived)] == [b"body"]
    server.send_headers(1, [(b":status", b"100")])
    server.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    server.send_data(1, b"reply")
    server.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    got = client.receive_data(server.data_to_send())
    kinds = [type(e) for e in got]
    assert kinds == [
        ev.RemoteSettingsChanged, ev.SettingsAcknowledged, ev.InformationalResponseReceived,
        ev.ResponseReceived, ev.DataReceived, ev.TrailersReceived, ev.StreamEnded,
    ]  # fmt: skip
    assert dict(got[3].headers)[b":status"] == b"200" and got[4].data == b"reply"
    assert list(got[5].headers) == [(b"grpc-status", b"0")]
    assert client.streams == {}
    assert client.peer_max_concurrent_streams == server.local_settings.max_concurrent_streams


def test_client_side_goaway_lets_the_accepted_streams_complete() -> None:
    client, server = client_codec(), h2_server()
    for sid in (1, 3):
        client.send_headers(sid, GET, end_stream=True)
    server.receive_data(client.data_to_send())
    goaway = hf.frame(hf.GOAWAY, 0, 0, struct.pack(">II", 1, 0))
    events = client.receive_data(server.data_to_send() + goaway)
    assert [(e.last_stream_id, e.error_code) for e in events if isinstance(e, ev.ConnectionTerminated)] == [(1, 0)]
    server.send_headers(1, [(b":status", b"204")], end_stream=True)
    got = client.receive_data(server.data_to_send())
    assert [type(e) for e in got] == [ev.ResponseReceived, ev.StreamEnded]


@pytest.mark.parametrize(
    "data",
    [
        hf.frame(5, 4, 1, b"\x00\x00\x00\x02\x82"),  # PUSH_PROMISE: push was never enabled
        hf.headers(2, b"\x88"),  # a stream the server may not open
        hf.headers(5, b"\x88"),  # one the client has not opened yet
        hf.frame(hf.DATA, 0, 7, b"x"),
    ],
)
def test_client_side_frames_on_streams_it_did_not_open_are_connection_errors(data: bytes) -> None:
    client = client_codec()
    client.send_headers(1, GET, end_stream=True)
    client.receive_data(hf.settings())
    client.data_to_send()
    with pytest.raises(c.ProtocolError) as raised:
        client.receive_data(data)
    assert raised.value.error_code == c.PROTOCOL_ERROR
    assert goaway_of(client)[:2] == (0, c.PROTOCOL_ERROR)  # a client processed no stream of the server's
