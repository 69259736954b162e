"""MadeYouReset (CVE-2025-8671) against the real proxy: the client makes the proxy's h2 library reset streams
itself (DATA after END_STREAM, a stream WINDOW_UPDATE overflowing the window) instead of sending RST_STREAM.
Those resets count as premature like the client's own (Envoy does the same), so the connection is closed with
GOAWAY(ENHANCE_YOUR_CALM), and the upstream work of each such stream is cancelled at once."""

from __future__ import annotations

import time

import pytest

from planemesh.labs import h2_frames as hf
from tests.proxy.proxy_harness import ProxyThread
from tests.proxy.test_h2_abuse import SlowBackend
from tests.proxy.test_h2_admission import H2Probe

pytestmark = pytest.mark.unit

HOLD = "/hold/3"  # answered after 3 s: each stream keeps its upstream busy meanwhile


def provoke(kind: str, sid: int) -> bytes:
    """What makes h2 reset the stream `sid` (a request already ended by its HEADERS)."""
    if kind == "data_after_end_stream":
        return hf.frame(hf.DATA, 0, sid, b"x")
    return hf.window_update(sid, hf.MAX_STREAM_ID)  # + the initial window: past 2^31-1 (FLOW_CONTROL_ERROR)


KINDS = ["data_after_end_stream", "window_update_overflow"]


@pytest.mark.parametrize("kind", KINDS)
def test_provoked_resets_cancel_the_upstream_work(kind: str) -> None:
    """A few provoked resets (below the limit): each stream is reset (RST_STREAM to the client), its upstream
    request cancelled at once, not after the backend's 3 s; the connection stays."""
    with SlowBackend() as backend, ProxyThread([("127.0.0.1", backend.port)]) as px:
        client = H2Probe(px.port)
        blocks = hf.RequestBlocks("x", HOLD)  # HPACK state: one per connection
        sids = list(range(1, 21, 2))
        client.send(b"".join(hf.headers(sid, blocks.next()) for sid in sids))
        assert client.wait(lambda: px.proxy.stats.requests_active == len(sids), 5)
        client.send(b"".join(provoke(kind, sid) for sid in sids))
        assert client.wait(lambda: px.proxy.stats.requests_active == 0, 1.5), px.proxy.stats.requests_active

        def reset_streams() -> set[int]:
            return {f.stream_id for f in client.frames if f.kind == hf.RST_STREAM}

        # the frames reach the probe's reader thread after the proxy counted the requests done (CI saw none yet)
        assert client.wait(lambda: reset_streams() == set(sids), 5), reset_streams()
        assert px.proxy.stats.h2_provoked_resets == len(sids)
        assert px.proxy.stats.h2_premature_resets == len(sids)
        assert not client.closed and client.goaway is None
        client.close()


@pytest.mark.parametrize("kind", KINDS)
def test_provoked_reset_flood_is_closed(kind: str) -> None:
    with SlowBackend() as backend, ProxyThread([("127.0.0.1", backend.port)]) as px:
        client = H2Probe(px.port)
        blocks = hf.RequestBlocks("x", HOLD)
        sid, t0 = 1, time.monotonic()
        while not client.closed and time.monotonic() - t0 < 8 and sid < 100_000:
            batch = list(range(sid, sid + 40, 2))
            client.send(b"".join(hf.headers(s, blocks.next()) for s in batch))
            client.poll(0.01)  # the streams are opened (and go upstream) in one read, reset by the next
            try:
                client.send(b"".join(provoke(kind, s) for s in batch))
            except (BrokenPipeError, ConnectionResetError):
                break
            client.poll(0.01)
            sid += 40
        assert client.wait(lambda: client.closed, 5)
        _, code, debug = client.goaway_fields()
        assert (code, debug) == (hf.ENHANCE_YOUR_CALM, b"premature_resets")
        # Envoy's rule: closed once premature resets reach half of the total-count limit (500)
        assert 250 <= px.proxy.stats.h2_premature_resets < 2000
        # every one provoked, but those of the last batch, whose reading the close stopped
        assert px.proxy.stats.h2_provoked_resets >= 250 - 20
        client.close()
