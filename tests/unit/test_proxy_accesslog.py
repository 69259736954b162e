"""Access-log formatting (Envoy's default text format plus the plane; JSON) and the batching buffer."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from planemesh.agent.proxy.accesslog import (
    AccessLogBuffer,
    AccessRecord,
    file_sink,
    format_json,
    format_start_time,
    format_text,
)

BASE = AccessRecord(
    start_time=1764123456.789, method="GET", path="/a?b=1", protocol="HTTP/1.1", status=200, flags="",
    bytes_rx=0, bytes_tx=12, duration_ms=3, upstream_ms=2, xff="10.0.0.1", user_agent="curl/8.0",
    request_id="2f0b6d7e-52b3-4b48-9d52-5a2f4f5ff0a1", authority="svc:80", upstream_host="127.0.0.1:8080",
    plane="oam",
)


@pytest.mark.parametrize(("changes", "expected"), [
    ({}, '[2025-11-26T02:17:36.789Z] "GET /a?b=1 HTTP/1.1" 200 - 0 12 3 2 "10.0.0.1" "curl/8.0" '
         '"2f0b6d7e-52b3-4b48-9d52-5a2f4f5ff0a1" "svc:80" "127.0.0.1:8080" oam\n'),
    ({"status": 503, "flags": "UF", "upstream_ms": None, "upstream_host": None, "user_agent": None,
      "bytes_tx": 0},
     '[2025-11-26T02:17:36.789Z] "GET /a?b=1 HTTP/1.1" 503 UF 0 0 3 - "10.0.0.1" "-" '
     '"2f0b6d7e-52b3-4b48-9d52-5a2f4f5ff0a1" "svc:80" "-" oam\n'),
    ({"status": 0, "flags": "DC", "method": "POST", "bytes_rx": 100, "user_agent": 'evil"agent\n'},
     '[2025-11-26T02:17:36.789Z] "POST /a?b=1 HTTP/1.1" 0 DC 100 12 3 2 "10.0.0.1" "evil\\"agent\\n" '
     '"2f0b6d7e-52b3-4b48-9d52-5a2f4f5ff0a1" "svc:80" "127.0.0.1:8080" oam\n'),
])
def test_format_text(changes: dict, expected: str) -> None:
    assert format_text(replace(BASE, **changes)) == expected


def test_format_json_fields() -> None:
    line = format_json(replace(BASE, flags="UT", status=504))
    assert line.endswith("\n") and "\n" not in line[:-1]
    doc = json.loads(line)
    assert doc["response_code"] == 504 and doc["response_flags"] == "UT"
    assert doc["start_time"] == "2025-11-26T02:17:36.789Z"
    assert doc["request_id"] == BASE.request_id and doc["plane"] == "oam" and doc["upstream_service_time"] == 2


def test_start_time_millis() -> None:
    assert format_start_time(0.001) == "1970-01-01T00:00:00.001Z"
    assert format_start_time(86400.9999) == "1970-01-02T00:00:00.999Z"


def test_buffer_batches_and_flushes_on_size() -> None:
    batches: list[str] = []
    buf = AccessLogBuffer(batches.append, max_pending=3)
    buf.append(BASE)
    buf.append(BASE)
    assert batches == []  # nothing written per request
    buf.append(BASE)
    assert len(batches) == 1 and batches[0].count("\n") == 3
    buf.append(BASE)
    buf.flush()
    buf.flush()  # empty: no write
    assert len(batches) == 2 and batches[1].count("\n") == 1


def test_buffer_survives_a_failing_sink() -> None:
    def broken(text: str) -> None:
        raise OSError("disk full")

    buf = AccessLogBuffer(broken, max_pending=1)
    buf.append(BASE)  # must not raise into the data path
    buf.flush()


def test_file_sink_appends(tmp_path) -> None:
    path = tmp_path / "access.log"
    sink = file_sink(str(path))
    sink(format_text(BASE))
    sink(format_text(BASE))
    assert path.read_text().count(" oam\n") == 2
