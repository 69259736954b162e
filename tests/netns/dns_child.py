"""Run inside a lab netns by tests/netns/test_dns_lab.py (`ip netns exec` gives it the lab's /etc/hosts and
resolv.conf): two backends on 127.0.0.2 and 127.0.0.3 (one port), a real PlaneProxy whose cluster is
STRICT_DNS `backend.lab.test`, resolved by the system resolver. Commands on stdin, one answer line each on
stdout: `get` -> the backend that answered (or the status), `stats` -> lookups and failures."""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import json
import socket
import sys
import threading
from types import MappingProxyType

from planemesh.model.config import Cluster, ClusterKind, DnsSettings, Endpoint
from tests.proxy.proxy_harness import ProxyThread, ThreadedBackend

NAME = "backend.lab.test"


def named(who: str) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = who.encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


class PortBackend(ThreadedBackend):
    """A ThreadedBackend on a given port (both backends share one port: the cluster's host has one)."""

    def __init__(self, host: str, port: int, who: str) -> None:
        self.address_family = socket.AF_INET
        http.server.ThreadingHTTPServer.__init__(self, (host, port), named(who))
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)


def get(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read().decode()
        return body if resp.status == 200 else str(resp.status)
    finally:
        conn.close()


def main() -> int:
    refresh_s = float(sys.argv[1])
    with ThreadedBackend("127.0.0.2", named("a")) as a, PortBackend("127.0.0.3", a.port, "b") as _b:
        dns = DnsSettings(hosts=(Endpoint(NAME, a.port),), refresh_s=refresh_s, family="v4")
        backend = Cluster("backend", kind=ClusterKind.STRICT_DNS, dns=dns)
        px = ProxyThread([])
        px.snapshot = dataclasses.replace(px.snapshot, clusters=MappingProxyType({"backend": backend}))
        px.proxy.update(px.snapshot)
        with px:
            print("ready", flush=True)
            for line in sys.stdin:
                cmd = line.strip()
                if cmd == "get":
                    print(get(px.port), flush=True)
                elif cmd == "stats":
                    stats = {"lookups": px.proxy.dns_resolver.lookups, "failures": px.proxy.dns.failures("backend")}
                    print(json.dumps(stats), flush=True)
                else:
                    break
    return 0


if __name__ == "__main__":
    sys.exit(main())
