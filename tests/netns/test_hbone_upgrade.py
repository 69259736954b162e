"""A hot upgrade of the agent on node A never sends pod traffic untunnelled and has no gap (the two-agent lab
of test_hbone_agent.py, the link capture of hbone_lab).

While pod A streams to pod B on one connection and three threads keep opening new ones, a successor agent
takes node A over: it receives the HBONE node's listening sockets (15008, capture) over the handover socket
and starts its node on them (re-using the pinned capture program: nothing compiled) before the predecessor's
node hands over. Throughout, no frame on the inter-node link carries the plaintext marker, and every
connection got its answer through the tunnel (pod B saw node B's address, not pod A's); through the upgrade
none failed and every TCP connect took under 0.5 s. On the code before the sockets were handed over (the
successor bound them once the predecessor's node closed them) a connection opened in that 0.4 s gap waited for
its SYN retry (1.03 s measured) and one failed; on older code still (the capture detached between the two
nodes) such connections crossed the link in plaintext. Then the new node is killed and restarted by the agent
on the same sockets.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from datetime import datetime

import pytest

from planemesh.agent.admin_client import AdminClient
from planemesh.agent.identity.ca import new_root, utcnow
from planemesh.labs import netns as ns_tools
from tests.netns.agent_lab import eventually
from tests.netns.hbone_lab import (
    AGENT_PLANES,
    POD_B,
    PORT,
    LinkCapture,
    hbone_lab,
    node_a_settings,
    node_b_settings,
    pod_exchange,
)
from tests.netns.test_hbone_agent import hbone_rows

pytestmark = [pytest.mark.netns, pytest.mark.bpf]
MARKER = b"UPGRADE-HBONE-MARKER-" + os.urandom(8).hex().encode()
TUNNELLED = b"B saw %d bytes from 10.81.2.1: "  # pod B's peer is node B when the bytes came through HBONE
PLAINTEXT = b"from 10.81.1.2"  # pod A's own address: the connection was routed, not tunnelled
MAX_CONNECT_S = 0.5  # half the kernel's first SYN retry: a connect that waited for a listener takes >= 1 s


def stream(stop: threading.Event, out: dict) -> None:
    """In pod A: one long connection sending marker chunks until `stop` (or until it is cut)."""
    try:
        with socket.create_connection((POD_B, PORT), timeout=10) as s:
            while not stop.is_set():
                s.sendall(MARKER * 64)
                out["sent"] = out.get("sent", 0) + len(MARKER) * 64
                time.sleep(0.01)
            s.shutdown(socket.SHUT_WR)
            out["answer"] = s.recv(1 << 16)
    except OSError as exc:
        out["error"] = repr(exc)


def log_time(proc, text: str) -> float:  # type: ignore[no-untyped-def]
    """The timestamp of the first line of `proc`'s output (the agent's and its HBONE node's logs) with `text`."""
    line = next(x for x in proc.output_lines if text in x)
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def opener(lab, stop: threading.Event, attempts: list) -> None:  # type: ignore[no-untyped-def]
    """(start, end, answer, connect seconds or None) per connection, until `stop`."""
    while not stop.is_set():
        started = time.monotonic()
        timing: list = []
        try:
            answer = pod_exchange(lab, MARKER, timeout=10.0, timing=timing)
        except OSError as exc:
            answer = repr(exc).encode()
        attempts.append((started, time.monotonic(), answer, timing[0] if timing else None))
        time.sleep(0.02)


def test_hot_upgrade_never_sends_pod_traffic_untunnelled(run_prefix: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with hbone_lab(run_prefix, tmp_path) as lab:
        lab.start_server()
        root = new_root("cluster.local", now=utcnow())
        ca_a = lab.write_ca("ca-a", root.intermediate("node-a", now=utcnow()))
        ca_b = lab.write_ca("ca-b", root.intermediate("node-b", now=utcnow()))
        lab.start_agent("b", {"planes": AGENT_PLANES, "hbone": node_b_settings(ca_b)})
        agent_a = lab.start_agent("a", {"planes": AGENT_PLANES, "hbone": node_a_settings(ca_a)})
        admin_a = AdminClient(f"unix://{lab.admin_path('a')}")
        first = eventually(lambda: (n := hbone_rows(admin_a)["node"])["up"] == 1 and n, 30)
        assert first, hbone_rows(admin_a)
        assert pod_exchange(lab, MARKER, timeout=10.0).startswith(TUNNELLED % len(MARKER))

        cap = LinkCapture(lab.node_a, "hbla")
        stop = threading.Event()
        streamed: dict = {}
        attempts: list = []
        threads = [threading.Thread(target=ns_tools.call_in, args=(lab.pod_a, stream, stop, streamed), daemon=True)]
        threads += [threading.Thread(target=opener, args=(lab, stop, attempts), daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        upgrade_at = time.monotonic()
        successor = lab.start_agent("a", {"planes": AGENT_PLANES, "hbone": node_a_settings(ca_a)})
        assert agent_a.wait(timeout=60) == 0
        new = eventually(lambda: (n := hbone_rows(admin_a)["node"])["up"] == 1 and n["pid"] != first["pid"] and n, 60)
        assert new and new["restarts"] == 0, hbone_rows(admin_a)
        up_at = time.monotonic()
        time.sleep(2.0)  # connections opened after the new node is up
        crash_at = time.monotonic()
        # and a crash of the new HBONE node: the agent restarts it; the capture never left (fail-closed meanwhile)
        os.kill(new["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        again = eventually(lambda: (n := hbone_rows(admin_a)["node"])["up"] == 1 and n["pid"] != new["pid"] and n, 30)
        assert again and again["restarts"] == 1, hbone_rows(admin_a)
        crash_up_at = time.monotonic()
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        cap.stop()

        assert not any(MARKER in frame for frame in cap.frames), "plaintext pod bytes crossed the link"
        answers = [a for _, _, a, _ in attempts]
        assert not any(PLAINTEXT in a for a in answers), [a[:80] for a in answers if PLAINTEXT in a]
        ok = [(s, e) for s, e, a, _ in attempts if a.startswith(TUNNELLED % len(MARKER))]
        failed = [a[:80] for _, _, a, _ in attempts if not a.startswith(TUNNELLED % len(MARKER))]
        # Through the hot upgrade (before the crash): no gap. The successor took the listening sockets over the
        # handover socket, so every SYN found a listener: 0 failures, connects answered by the kernel at once.
        upgrade = [(a, c) for s, e, a, c in attempts if upgrade_at - 1 <= s and e < crash_at]
        upgrade_failed = [a[:80] for a, _ in upgrade if not a.startswith(TUNNELLED % len(MARKER))]
        connects = [c for _, c in upgrade if c is not None]
        # While the killed node is restarted, the agent's capture socket stays: connections opened after the
        # kill wait in its accept queue and are tunnelled by the next node (before: their SYN was dropped).
        restart = [(a, c) for s, _, a, c in attempts if killed_at <= s < crash_up_at]
        restart_failed = [a[:80] for a, _ in restart if not a.startswith(TUNNELLED % len(MARKER))]
        assert ok and any(s > up_at for s, _ in ok), attempts  # tunnelling again after the upgrade
        assert any(s > crash_up_at for s, _ in ok), attempts  # and after the crash
        assert PLAINTEXT not in streamed.get("answer", b""), streamed
        assert streamed.get("sent", 0) > 0, streamed
        during = [e - s for s, e in ok if s >= upgrade_at - 1]
        gone, back = log_time(agent_a, "handing over"), log_time(successor, "HBONE capture attached")
        print(f"\nhot upgrade: successor's capture attached {gone - back:.2f}s before the old node handed over;"
              f" {len(attempts)} connections, {len(failed)} failed, longest wait of a tunnelled one "
              f"{max(during):.2f}s, new HBONE node up {up_at - upgrade_at:.2f}s after the successor started; "
              f"stream: {streamed.get('error') or 'completed'}; through the upgrade {len(upgrade)} connections,"
              f" {len(upgrade_failed)} failed, longest connect {max(connects, default=0) * 1000:.0f} ms")  # fmt: skip
        assert len(upgrade) >= 20 and not upgrade_failed, upgrade_failed
        assert max(connects) < MAX_CONNECT_S, sorted(connects)[-5:]  # old code: >= 1 s (a dropped SYN, retried)
        print(f"restart: {len(restart)} connections opened while the node was down, {len(restart_failed)} failed,"
              f" longest connect {max([c for _, c in restart if c is not None], default=0) * 1000:.0f} ms")
        assert restart and not restart_failed, restart_failed
        assert max(c for _, c in restart if c is not None) < MAX_CONNECT_S
        out = "\n".join(successor.output_lines)  # type: ignore[attr-defined]
        assert "program re-used from its pins: nothing compiled" in out, out[-3000:]
        assert ns_tools.stop(successor) == 0
