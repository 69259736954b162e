"""The HBONE node's two listening sockets, each made in one place: 15008 (mTLS from peer nodes) and the
transparent capture listener. The agent makes them (agent/hbone/supervisor.py) and hands them to each HBONE
child it starts (inherited fds) and to a successor agent over the handover socket (agent/handover.py), so
the kernel keeps one listener per port across a restart, new settings and a hot upgrade: a pod's SYN that
the capture assigns always finds a socket, and waits in its accept queue until a node accepts it.
"""

from __future__ import annotations

import ipaddress
import socket

from planemesh.agent.proxy.sockets import make_listener_socket

LISTEN = "hbone.listen"  # names of the sockets in the handover manifest
CAPTURE = "hbone.capture"
NAMES = (LISTEN, CAPTURE)


def bind_listen(host: str, port: int) -> socket.socket:
    """The 15008 listener: not transparent (peers connect to the node's own address), dual-stack on `::`."""
    return make_listener_socket(port, transparent=False, host=host)


def bind_capture(port: int) -> socket.socket:
    """The capture listener: transparent, so an accepted socket's name is the pod's original destination."""
    return make_listener_socket(port, transparent=True, host="::")


def bound_to(sock: socket.socket, host: str, port: int) -> bool:
    """Whether `sock` listens on exactly (host, port): a socket inherited for another address is not re-used."""
    try:
        name = sock.getsockname()
    except OSError:
        return False
    return name[1] == port and ipaddress.ip_address(name[0]) == ipaddress.ip_address(host)


def adopt(fd: int) -> socket.socket:
    """A listening socket inherited as fd `fd` (the HBONE child's --listen-fd / --capture-fd)."""
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1:
        sock.detach()
        raise ValueError(f"fd {fd} is not a listening TCP socket")
    sock.setblocking(False)
    return sock
