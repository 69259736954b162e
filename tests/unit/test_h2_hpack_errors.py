"""Malformed HPACK from a peer, either side of the codec (agent/proxy/h2_codec.py with h2_hpack_decode.py): each is
a connection error, COMPRESSION_ERROR (RFC 9113 4.3), with the GOAWAY prepared; never another exception. And the
codec's encoder with a peer's SETTINGS_HEADER_TABLE_SIZE, end to end with the h2 library as the peer."""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.events as ev
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planemesh.agent.proxy import h2_codec as c
from planemesh.labs import h2_frames as hf

MALFORMED = {
    "indexed field 0": b"\x80",
    "index past both tables": b"\xbf",  # 62: the dynamic table is empty
    "literal name index past both tables": b"\x7f\x05\x01v",
    "entry evicted by a size update": b"\x40\x01a\x01b" + b"\x20\xbe",  # in one block: the update comes late
    "index of an entry a size update evicted": b"\x3f\x01\xbe",  # size 32 (nothing fits), then index 62
    "table size update past SETTINGS_HEADER_TABLE_SIZE": b"\x3f\xe2\x1f",  # 4,097
    "table size update after a field": b"\x82\x20",
    "integer cut short": b"\xff",
    "integer continuation cut short": b"\xff\x80",
    "name index cut short": b"\x7f",
    "string length cut short": b"\x40\x7f",
    "integer too long": b"\xff" + b"\x80" * 6 + b"\x01",
    "string past the block": b"\x40\x05ab",
    "literal without its value": b"\x00\x01a",
    "Huffman padding longer than 7 bits": b"\x00\x01a\x82\x1f\xff",
    "Huffman padding not of 1 bits": b"\x00\x01a\x81\x18",
    "Huffman EOS in the string": b"\x00\x01a\x84\xff\xff\xff\xfc",
}


def server_codec() -> c.H2ServerCodec:
    server = c.H2ServerCodec(8, 10, 65535, 1 << 20)
    server.initiate_connection()
    server.data_to_send()
    return server


def client_codec() -> c.H2ClientCodec:
    client = c.H2ClientCodec(8, 8, 65535, 1 << 20)
    client.initiate_connection()
    client.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")])
    client.data_to_send()
    return client


def goaway_code(codec: c.H2Codec) -> int:
    out = codec.data_to_send()
    goaways = [f for f in hf.FrameReader().feed(out) if f.kind == hf.GOAWAY]
    assert len(goaways) == 1
    return struct.unpack(">II", goaways[0].payload[:8])[1]


@pytest.mark.parametrize("side", ["server", "client"])
@pytest.mark.parametrize("block", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_hpack_is_a_compression_error(side: str, block: bytes) -> None:
    codec = server_codec() if side == "server" else client_codec()
    preface = hf.client_preface() if side == "server" else hf.settings()
    with pytest.raises(c.ProtocolError) as raised:
        codec.receive_data(preface + hf.headers(1, block))
    assert raised.value.error_code == c.COMPRESSION_ERROR
    assert goaway_code(codec) == c.COMPRESSION_ERROR
    assert codec.receive_data(hf.ping()) == []  # the connection takes nothing more


def test_a_header_list_past_the_advertised_size_is_enhance_your_calm() -> None:
    field = b"\x00\x01a\x7f\x81\x7f" + b"v" * 16384  # a 16,384-byte value: 5 of them pass 65,536
    codec = server_codec()
    data = field * 5
    frames = hf.frame(hf.HEADERS, hf.END_STREAM, 1, data[:16384])
    rest = [data[i : i + 16384] for i in range(16384, len(data), 16384)]
    for i, piece in enumerate(rest):
        frames += hf.frame(c.CONTINUATION, hf.END_HEADERS if i == len(rest) - 1 else 0, 1, piece)
    with pytest.raises(c.ProtocolError) as raised:
        codec.receive_data(hf.client_preface() + frames)
    assert raised.value.error_code == c.ENHANCE_YOUR_CALM


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_header_block_gives_events_or_a_connection_error(block: bytes) -> None:
    codec = server_codec()
    try:
        events = codec.receive_data(hf.client_preface() + hf.headers(1, block))
    except c.ProtocolError as e:
        assert e.error_code in (c.COMPRESSION_ERROR, c.ENHANCE_YOUR_CALM)
        return
    assert any(isinstance(e, ev.RequestReceived) for e in events)


def test_the_peers_header_table_size_is_followed_end_to_end() -> None:
    """The h2 library as the client, advertising a table of 0 and then 256 bytes: our responses carry the
    size updates and decode in its hpack decoder; the dynamic table is used again once it may be."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    server = server_codec()
    head = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"server", b"planemesh")]
    sid = 1
    for size in (0, 256):
        client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: size})
        for _ in range(2):
            client.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"),
                                      (b":path", b"/s.S/M")], end_stream=True)  # fmt: skip
            server.receive_data(client.data_to_send())
            server.send_headers(sid, head, end_stream=True)
            out = server.data_to_send()
            got = [e for e in client.receive_data(out) if isinstance(e, ev.ResponseReceived)]
            assert list(got[0].headers) == head
            client.data_to_send()
            sid += 2
        assert server.encoder.header_table_size == size
        assert len(client.decoder.header_table.dynamic_entries) == (0 if size == 0 else 2)
