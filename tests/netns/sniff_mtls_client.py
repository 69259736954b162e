"""A client run inside a lab pod by tests/netns/test_sniff_mtls_lab.py: connect to HOST:PORT, optionally with
mTLS offering the given ALPN, send PAYLOAD, print what came back (repr) before EOF or a 3 s pause."""

from __future__ import annotations

import socket
import ssl
import sys


def main() -> int:
    host, port, cert, key, alpn, payload = sys.argv[1:7]
    raw = socket.create_connection((host, int(port)), timeout=5)
    sock: socket.socket = raw
    if cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the agent's identity is not what this test checks
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(alpn.split(","))
        sock = ctx.wrap_socket(raw)
    sock.sendall(payload.encode().decode("unicode_escape").encode("latin-1"))
    sock.settimeout(3)
    out = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            out += data
    except (TimeoutError, ssl.SSLError, OSError):
        pass
    print(repr(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
