"""Open-loop HTTP/1.1 latency probe over sockets: a fixed request rate, each request timed from its due time.

    python -m planemesh.labs.open_loop_client --host ADDR --port PORT --rate R [--seconds S] [--path P]
                                              [--connections N] [--timeout S]

The timing rules (due times, latency from due, what a run sums to) are labs/open_loop.py's; this is the loop
that keeps them: one thread, `select` with microsecond timeouts (epoll's are milliseconds), keep-alive
connections opened before the clock starts. It runs until every request due in --seconds is answered or
--timeout seconds after the last one fell due; what is unanswered by then counts as no answer (an infinite
latency). Run it inside a pod's namespace (`ip netns exec`): it prints one JSON line, a Summary. It only talks
to --host.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import select
import socket
import sys
import time

from planemesh.labs.open_loop import ProtocolError, ResponseReader, Schedule, Summary, Timeline, summarize
from planemesh.labs.traffic import host_port

CONNECT_TIMEOUT_S = 3.0


class Lane:
    """One keep-alive connection, the request it has in flight and the next one it will carry."""

    def __init__(self, address: tuple[str, int], first: int) -> None:
        self.address = address
        self.next = first
        self.inflight: int | None = None
        self.free_at = 0.0  # when it could take its next request (seconds from the start)
        self.sock: socket.socket | None = None
        self.reader = ResponseReader()

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock else -1

    def open(self) -> bool:
        self.close()
        try:
            self.sock = socket.create_connection(self.address, timeout=CONNECT_TIMEOUT_S)
        except OSError:
            return False
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)  # select says when to read; sends are one small request
        self.reader = ResponseReader()
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Probe:
    def __init__(self, host: str, port: int, path: str, schedule: Schedule, seconds: float, timeout: float) -> None:
        self.schedule, self.timeout = schedule, timeout
        self.timeline = Timeline(schedule, seconds)
        self.request = f"GET {path} HTTP/1.1\r\nHost: {host_port(host, port)}\r\nUser-Agent: open-loop\r\n\r\n".encode()
        self.lanes = [Lane((host, port), schedule.first(c)) for c in range(schedule.connections)]
        self.broken, self.error = 0, ""
        self.start = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.start

    def run(self) -> Summary:
        for lane in self.lanes:  # before the clock starts: connecting is not part of any request's latency
            if not lane.open():
                raise OSError(f"cannot connect to {lane.address[0]} port {lane.address[1]}")
        cpu = _cpu_s()
        gc_was = gc.isenabled()
        gc.disable()  # a collection in the loop would be the probe's own stall
        self.start = time.perf_counter()
        try:
            self._loop(self.timeline.seconds + self.timeout)
        finally:
            if gc_was:
                gc.enable()
            for lane in self.lanes:
                lane.close()
        return summarize(self.timeline, cpu_s=_cpu_s() - cpu, broken=self.broken, error=self.error)

    def _loop(self, deadline: float) -> None:
        total = len(self.timeline)
        due = self.timeline.due
        while True:
            now = self.now()
            if now >= deadline:
                return
            wake = deadline
            for lane in self.lanes:
                if lane.inflight is None and lane.next < total:
                    if due[lane.next] <= now:
                        self._send(lane, now)
                    else:
                        wake = min(wake, due[lane.next])
            busy = [lane for lane in self.lanes if lane.inflight is not None]
            if not busy and wake >= deadline:
                return  # everything due was sent and answered (or its connection could not be reopened)
            readable = select.select(busy, [], [], max(0.0, wake - self.now()))[0] if busy else []
            if not busy:
                time.sleep(max(0.0, wake - self.now()))
            for lane in readable:
                self._read(lane)

    def _send(self, lane: Lane, now: float) -> None:
        index = lane.next
        lane.next = self.schedule.following(index)
        if lane.sock is None:
            return  # its connection could not be reopened: this request is never answered
        self.timeline.mark_sent(index, now, lane.free_at)
        lane.inflight = index
        try:
            lane.sock.sendall(self.request)
        except OSError as exc:
            self._break(lane, f"send: {exc}")

    def _read(self, lane: Lane) -> None:
        try:
            data = lane.sock.recv(65536) if lane.sock else b""
            if not data:
                raise ConnectionError("closed by the server")
            answers = lane.reader.feed(data)
        except (OSError, ProtocolError) as exc:
            self._break(lane, f"read: {exc}")
            return
        if not answers:
            return
        at = self.now()
        if len(answers) > 1 or lane.inflight is None:
            self._break(lane, f"{len(answers)} answers to one request")
            return
        self.timeline.mark_done(lane.inflight, at, answers[0].status)
        lane.inflight, lane.free_at = None, at
        if answers[0].closes:  # the server said it closes: reopen before the next request falls due
            lane.open()
            lane.free_at = self.now()

    def _break(self, lane: Lane, why: str) -> None:
        """The connection broke: its request in flight is never answered; reopen it for the next one."""
        self.broken += 1
        self.error = why
        lane.inflight = None
        lane.open()
        lane.free_at = self.now()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def probe(
    host: str, port: int, rate: float, seconds: float, path: str = "/", connections: int = 8, timeout: float = 5.0
) -> Summary:
    return Probe(host, port, path, Schedule(rate, connections), seconds, timeout).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--rate", type=float, required=True, help="requests per second, offered whatever happens")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=5.0, help="wait for answers after the last request fell due")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 60 or not 0 <= args.timeout <= 60:
        parser.error("--seconds must be in (0, 60] and --timeout in [0, 60]: the probe is bounded")
    try:
        summary = probe(args.host, args.port, args.rate, args.seconds, args.path, args.connections, args.timeout)
    except (OSError, ValueError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(summary.to_json_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
