"""The transparent listener socket: options as the data path needs them (root, in a throw-away netns)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent("""
    import socket
    from planemesh.agent.proxy.sockets import make_listener_socket

    sock = make_listener_socket(0, transparent=True)
    port = sock.getsockname()[1]
    assert sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::"
    assert sock.getsockopt(socket.SOL_IP, 19) == 1, "IP_TRANSPARENT"
    assert sock.getsockopt(socket.IPPROTO_IPV6, 75) == 1, "IPV6_TRANSPARENT"
    assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0, "dual-stack"
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    assert not sock.getblocking()
    # v4 and v6 clients reach the one [::] socket; a v4 destination shows as ::ffff:a.b.c.d.
    sock.setblocking(True)
    for client_addr, expected in ((("127.0.0.1", port), "::ffff:127.0.0.1"), (("::1", port), "::1")):
        client = socket.create_connection(client_addr, timeout=2)
        accepted, _ = sock.accept()
        assert accepted.getsockname()[0] == expected, accepted.getsockname()
        accepted.close()
        client.close()
    # Transparent sockets may bind addresses the namespace does not own (what TPROXY relies on).
    foreign = make_listener_socket(0, transparent=True, host="198.18.0.1")
    assert foreign.getsockname()[0] == "198.18.0.1"
    try:
        make_listener_socket(0, transparent=False, host="198.18.0.2")
    except OSError:
        pass
    else:
        raise AssertionError("a non-transparent socket bound a foreign address")
    print("ok")
""")


@pytest.mark.netns
def test_transparent_listener_socket_options(run_prefix: str) -> None:
    ns = f"{run_prefix}-pxl"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=10)
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CHECK],
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)
