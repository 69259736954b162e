"""A streamed GET to the Kubernetes API (a watch): HTTP/1.1 on asyncio, the body as lines.

    async for line in stream_lines(url, {"Authorization": "Bearer ..."}, context, idle_timeout_s=330):
        event = json.loads(line)

asyncio rather than urllib in a thread: a watch stays open for minutes and must end at once when the agent
stops (a cancelled task closes the socket; a blocked thread could not be interrupted). The body may be
chunked (what the API server sends for a watch) or delimited by the connection's end. Limits: a status line
or header of at most 8 KiB, 100 headers, a line (one event: one pod) of at most MAX_LINE bytes; silence for
`idle_timeout_s` (the server's bookmarks and its own timeoutSeconds keep a live watch talking) is an error.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Mapping

MAX_LINE = 16 << 20  # one watch event is one pod: etcd keeps objects under 1.5 MiB
_MAX_HEAD = 8 << 10
_MAX_HEADERS = 100


class KubeHttpError(Exception):
    """The request failed: connection, TLS, a status other than 200 (`status`), or a malformed answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


async def _read_line(reader: asyncio.StreamReader, limit: int, idle_s: float) -> bytes:
    try:
        async with asyncio.timeout(idle_s):
            line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise KubeHttpError("connection closed inside a line") from None
        return b""
    except asyncio.LimitOverrunError:
        raise KubeHttpError(f"a line over {limit} bytes") from None
    except TimeoutError:
        raise KubeHttpError(f"no data for {idle_s:g} s") from None
    if len(line) > limit:
        raise KubeHttpError(f"a line over {limit} bytes")
    return line


async def _head(reader: asyncio.StreamReader, idle_s: float) -> tuple[int, str, dict[str, str]]:
    status_line = (await _read_line(reader, _MAX_HEAD, idle_s)).decode("latin-1").rstrip("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise KubeHttpError(f"not an HTTP/1.1 answer: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADERS + 1):
        line = (await _read_line(reader, _MAX_HEAD, idle_s)).decode("latin-1").rstrip("\r\n")
        if not line:
            return int(parts[1]), parts[2] if len(parts) > 2 else "", headers
        name, sep, value = line.partition(":")
        if not sep:
            raise KubeHttpError(f"malformed header {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    raise KubeHttpError(f"more than {_MAX_HEADERS} headers")


async def _chunks(reader: asyncio.StreamReader, idle_s: float) -> AsyncIterator[bytes]:
    while True:
        raw = await _read_line(reader, _MAX_HEAD, idle_s)
        if not raw:
            raise KubeHttpError("connection closed before the end of the body")
        size_line = raw.split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise KubeHttpError(f"malformed chunk size {size_line[:20]!r}") from None
        if size == 0:
            return
        if size > MAX_LINE:
            raise KubeHttpError(f"a chunk over {MAX_LINE} bytes")
        try:
            async with asyncio.timeout(idle_s):
                data = await reader.readexactly(size + 2)
        except asyncio.IncompleteReadError:
            raise KubeHttpError("connection closed inside a chunk") from None
        except TimeoutError:
            raise KubeHttpError(f"no data for {idle_s:g} s") from None
        yield data[:-2]


async def _lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    pending = b""
    async for chunk in chunks:
        pending += chunk
        if len(pending) > MAX_LINE and b"\n" not in pending:
            raise KubeHttpError(f"a line over {MAX_LINE} bytes")
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if pending.strip():
        yield pending


async def stream_lines(
    url: str, headers: Mapping[str, str], context: ssl.SSLContext | None, idle_timeout_s: float
) -> AsyncIterator[bytes]:
    """GET `url` and yield the body's non-empty lines until the server ends it. KubeHttpError on failure."""
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "https"
    host, port = parts.hostname or "", parts.port or (443 if secure else 80)
    try:
        async with asyncio.timeout(idle_timeout_s):
            reader, writer = await asyncio.open_connection(host, port, ssl=context if secure else None, limit=MAX_LINE)
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        raise KubeHttpError(f"connect {host}:{port}: {exc or type(exc).__name__}") from None
    try:
        target = f"{parts.path or '/'}?{parts.query}" if parts.query else parts.path or "/"
        authority = parts.netloc.rpartition("@")[2]
        head = [f"GET {target} HTTP/1.1", f"Host: {authority}", "Accept: application/json", "Connection: close"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        status, reason, answer = await _head(reader, idle_timeout_s)
        if status != 200:
            raise KubeHttpError(f"HTTP {status} {reason}".strip(), status)
        if "chunked" in answer.get("transfer-encoding", "").lower():
            body = _chunks(reader, idle_timeout_s)
        else:
            body = _until_closed(reader, idle_timeout_s)
        async for line in _lines(body):
            yield line
    except (OSError, ssl.SSLError) as exc:
        raise KubeHttpError(f"{host}:{port}: {exc or type(exc).__name__}") from None
    finally:
        writer.close()


async def _until_closed(reader: asyncio.StreamReader, idle_s: float) -> AsyncIterator[bytes]:
    while line := await _read_line(reader, MAX_LINE, idle_s):
        yield line


__all__ = ["MAX_LINE", "KubeHttpError", "stream_lines"]
