"""Two nodes, one pod behind each, an inter-node link; an HBONE node process per node.

    pod A (10.81.1.2) -- node A (10.81.1.1 | 10.81.0.1) ==link== node B (10.81.0.2 | 10.81.2.1) -- pod B (10.81.2.2)

Without HBONE the nodes route pod traffic across the link in plaintext (the bypass baseline). Node A captures
pod A's connections to pod B's CIDR on the tunnelled ports (TC program on its pod-facing veth) and carries them
to node B's port 15008. Every address is assigned here, inside namespaces this lab created.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography.hazmat.primitives.serialization import Encoding

from planemesh import module_argv
from planemesh.agent.identity.ca import CertificateAuthority, key_pem
from planemesh.agent.identity.ca_files import write_new
from planemesh.labs import netns as ns_tools

POD_A, POD_B = "10.81.1.2", "10.81.2.2"
POD_A6, POD_B6 = "fd81:1::2", "fd81:2::2"
CIDR_A6, CIDR_B6 = "fd81:1::/64", "fd81:2::/64"
NODE_A_LINK, NODE_B_LINK = "10.81.0.1", "10.81.0.2"
CIDR_A, CIDR_B = "10.81.1.0/24", "10.81.2.0/24"
TD = "cluster.local"
ID_A = f"spiffe://{TD}/ns/ran/sa/amf"
ID_B = f"spiffe://{TD}/ns/ran/sa/smf"
NODE_A_ID = f"spiffe://{TD}/ns/planemesh/sa/node-a"
NODE_B_ID = f"spiffe://{TD}/ns/planemesh/sa/node-b"
PORT, ECHO_PORT = 8080, 8081  # tunnelled
BYPASS_PORT, BYPASS_ECHO_PORT = 9090, 9091  # not captured: plaintext across the link
CAPTURE_PORT = 15001
ETH_P_ALL = 0x0003

# The pod B server: on 8080/9090 reads until EOF, answers `B saw <n> bytes from <peer>: <first 64 bytes>`;
# on 8081/9091 echoes.
SERVER = r"""
import socket, sys, threading
def serve(port):
    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(512)
    while True:
        c, peer = s.accept()
        threading.Thread(target=handle, args=(c, peer), daemon=True).start()
def handle(c, peer):
    with c:
        if c.getsockname()[1] in (8081, 9091):
            while data := c.recv(1 << 16):
                c.sendall(data)
            return
        head, n = b"", 0
        while data := c.recv(1 << 16):
            n += len(data)
            if len(head) < 64:
                head = (head + data)[:64]
        c.sendall(b"B saw %d bytes from %s: %s" % (n, peer[0].removeprefix("::ffff:").encode(), head))
for p in (8080, 9090, 8081, 9091):
    threading.Thread(target=serve, args=(p,), daemon=True).start()
print("server ready", flush=True)
threading.Event().wait()
"""


def _ip(ns: str | None, *args: str) -> None:
    argv = ["ip", *args]
    subprocess.run(ns_tools.exec_argv(ns, argv) if ns else argv, check=True, capture_output=True, timeout=30)


@dataclass
class HboneLab:
    prefix: str
    workdir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def node_a(self) -> str:
        return f"{self.prefix}-hbna"

    @property
    def node_b(self) -> str:
        return f"{self.prefix}-hbnb"

    @property
    def pod_a(self) -> str:
        return f"{self.prefix}-hbpa"

    @property
    def pod_b(self) -> str:
        return f"{self.prefix}-hbpb"

    @property
    def pin_dir(self) -> str:
        return f"/sys/fs/bpf/{self.prefix}-hbone"

    def up(self) -> None:
        for ns in (self.node_a, self.node_b, self.pod_a, self.pod_b):
            _ip(None, "netns", "add", ns)
        _ip(None, "link", "add", "hbpa0", "netns", self.pod_a, "type", "veth", "peer", "hbpa1", "netns", self.node_a)
        _ip(None, "link", "add", "hbpb0", "netns", self.pod_b, "type", "veth", "peer", "hbpb1", "netns", self.node_b)
        _ip(None, "link", "add", "hbla", "netns", self.node_a, "type", "veth", "peer", "hblb", "netns", self.node_b)
        for ns, ifname, addr in (
            (self.pod_a, "hbpa0", f"{POD_A}/24"), (self.node_a, "hbpa1", "10.81.1.1/24"),
            (self.pod_b, "hbpb0", f"{POD_B}/24"), (self.node_b, "hbpb1", "10.81.2.1/24"),
            (self.node_a, "hbla", f"{NODE_A_LINK}/30"), (self.node_b, "hblb", f"{NODE_B_LINK}/30"),
        ):  # fmt: skip
            _ip(ns, "addr", "add", addr, "dev", ifname)
            _ip(ns, "link", "set", ifname, "up")
            _ip(ns, "link", "set", "lo", "up")
        for ns, ifname, addr in (
            (self.pod_a, "hbpa0", f"{POD_A6}/64"), (self.node_a, "hbpa1", "fd81:1::1/64"),
            (self.pod_b, "hbpb0", f"{POD_B6}/64"), (self.node_b, "hbpb1", "fd81:2::1/64"),
            (self.node_a, "hbla", "fd81::1/64"), (self.node_b, "hblb", "fd81::2/64"),
        ):  # fmt: skip
            _ip(ns, "-6", "addr", "add", addr, "dev", ifname, "nodad")
        _ip(self.pod_a, "-6", "route", "add", "default", "via", "fd81:1::1")
        _ip(self.pod_b, "-6", "route", "add", "default", "via", "fd81:2::1")
        _ip(self.node_a, "-6", "route", "add", CIDR_B6, "via", "fd81::2")
        _ip(self.node_b, "-6", "route", "add", CIDR_A6, "via", "fd81::1")
        _ip(self.pod_a, "route", "add", "default", "via", "10.81.1.1")
        _ip(self.pod_b, "route", "add", "default", "via", "10.81.2.1")
        _ip(self.node_a, "route", "add", CIDR_B, "via", NODE_B_LINK)
        _ip(self.node_b, "route", "add", CIDR_A, "via", NODE_A_LINK)
        for ns in (self.node_a, self.node_b):
            ns_tools.write_sysctls(ns, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})

    def down(self) -> None:
        for proc in self.procs:
            ns_tools.stop(proc)
            print(f"--- {' '.join(map(str, proc.args))[-80:]}", *getattr(proc, "output_lines", [])[-40:], sep="\n")
        for ns in (self.pod_a, self.pod_b, self.node_a, self.node_b):
            ns_tools.remove(ns)
        shutil.rmtree(self.pin_dir, ignore_errors=True)

    def start_server(self) -> subprocess.Popen:
        proc = ns_tools.start_until(self.pod_b, [sys.executable, "-c", SERVER], "server ready", timeout=20)
        self.procs.append(proc)
        return proc

    def write_ca(self, name: str, ca: CertificateAuthority) -> Path:
        out = self.workdir / name
        out.mkdir(parents=True, exist_ok=True)
        write_new(out / "ca-cert.pem", ca.cert.public_bytes(Encoding.PEM))
        write_new(out / "ca-key.pem", key_pem(ca.key), secret=True)
        write_new(out / "cert-chain.pem", ca.chain_pem())
        write_new(out / "root-cert.pem", ca.root_pem())
        return out

    def start_node(self, name: str, settings: dict) -> subprocess.Popen:
        ns = self.node_a if name == "a" else self.node_b
        config = self.workdir / f"hbone-{name}.yaml"
        config.write_text(yaml.safe_dump(settings))
        argv = [
            *module_argv("planemesh.agent.hbone"), "--config", str(config), "--netns", ns,
            "--stats", str(self.workdir / f"stats-{name}.json"), "--pin-dir", self.pin_dir,
        ]  # fmt: skip
        proc = ns_tools.start_until(None, argv, "hbone ready", timeout=60)
        self.procs.append(proc)
        return proc

    def start_agent(self, name: str, config: dict, bootstrap: bool = False) -> subprocess.Popen:
        """`planemesh agent` in node `name`'s namespace with `config` (a static config or, `bootstrap`, an xDS
        bootstrap) carrying an `hbone:` section: the agent runs the HBONE node itself."""
        ns = self.node_a if name == "a" else self.node_b
        path = self.workdir / f"agent-{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = [
            sys.executable, "-m", "planemesh.agent.cli", "agent", "--netns", ns,
            "--bootstrap" if bootstrap else "--config", str(path), "--admin", f"unix://{self.admin_path(name)}",
            "--drain-timeout", "1",
        ]  # fmt: skip
        proc = ns_tools.start_until(None, argv, "planemesh agent ready", timeout=120)
        self.procs.append(proc)
        return proc

    def admin_path(self, name: str) -> Path:
        return self.workdir / f"admin-{name}.sock"

    def stop_nodes(self) -> None:
        for proc in [p for p in self.procs if "planemesh.agent.hbone" in " ".join(map(str, p.args))]:
            ns_tools.stop(proc)
            self.procs.remove(proc)

    def stats(self, name: str) -> dict:
        path = self.workdir / f"stats-{name}.json"
        return json.loads(path.read_text()) if path.exists() else {}


def node_a_settings(ca_dir: Path, peer_identity: str | None = NODE_B_ID) -> dict:
    peer: dict = {"name": "node-b", "address": NODE_B_LINK, "cidrs": [CIDR_B, CIDR_B6]}
    if peer_identity:
        peer["identity"] = peer_identity
    return {
        "node": {"identity": NODE_A_ID}, "ca": str(ca_dir), "listen": f"{NODE_A_LINK}:15008",
        "capture": {"port": CAPTURE_PORT, "interfaces": ["hbpa1"], "ports": [PORT, ECHO_PORT]},
        "workloads": {POD_A: ID_A, POD_A6: ID_A}, "peers": [peer],
    }  # fmt: skip


# The agent's own plane: an interface pattern that matches nothing in this lab (the pod-facing veth is HBONE's
# capture, the link is the HBONE path), so only HBONE intercepts here; its ports are not HBONE's capture port.
AGENT_PLANES = [{"name": "mesh", "id": 1, "interfaces": ["hbzz*"], "cidrs": ["10.81.99.0/24"], "proxy_port": 15101,
                 "sniff_port": 15102}]  # fmt: skip


def node_b_settings(ca_dir: Path, rbac: list | None = None) -> dict:
    return {
        "node": {"identity": NODE_B_ID}, "ca": str(ca_dir), "listen": f"{NODE_B_LINK}:15008",
        "workloads": {POD_B: ID_B, POD_B6: ID_B}, "rbac": rbac or [],
    }  # fmt: skip


@contextlib.contextmanager
def hbone_lab(prefix: str, workdir: Path) -> Iterator[HboneLab]:
    lab = HboneLab(prefix, workdir)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


class LinkCapture:
    """Every frame on an interface of a namespace (AF_PACKET), read by a thread until stopped; `segments` are the
    TCP ones (IPv4 and IPv6 without extension headers) as (sport, dport, payload), `frames` all of them raw."""

    def __init__(self, ns: str, ifname: str) -> None:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.bind((ifname, 0))
            s.settimeout(0.2)
            return s

        self.sock = ns_tools.call_in(ns, make)
        self.segments: list[tuple[int, int, bytes]] = []  # (sport, dport, payload)
        self.frames: list[bytes] = []
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_flag.is_set():
            try:
                frame = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.frames.append(frame)
            if frame[12:14] == b"\x08\x00" and len(frame) >= 34 and frame[23] == 6:
                tcp, end = 14 + (frame[14] & 0x0F) * 4, 14 + struct.unpack("!H", frame[16:18])[0]
            elif frame[12:14] == b"\x86\xdd" and len(frame) >= 74 and frame[20] == 6:
                tcp, end = 54, 54 + struct.unpack("!H", frame[18:20])[0]
            else:
                continue
            sport, dport = struct.unpack("!HH", frame[tcp : tcp + 4])
            self.segments.append((sport, dport, frame[tcp + (frame[tcp + 12] >> 4) * 4 : end]))

    def stop(self) -> list[tuple[int, int, bytes]]:
        """The TCP segments seen (`frames` keeps every frame)."""
        time.sleep(0.3)  # frames in flight
        self.stop_flag.set()
        self.thread.join(timeout=5)
        self.sock.close()
        return self.segments


def pod_exchange(
    lab: HboneLab, payload: bytes, port: int = PORT, timeout: float = 15.0, dst: str = POD_B, timing: list | None = None
) -> bytes:
    """From pod A: connect to pod B, send payload, half-close, read the answer until EOF (b'' when refused).
    `timing` gets the TCP connect's duration: the capture listener's kernel completes it, so a SYN dropped for want
    of a listener (the fail-closed plane) shows as a wait of at least the SYN retry (1 s)."""

    def go() -> bytes:
        started = time.monotonic()
        s = socket.create_connection((dst, port), timeout=timeout)
        if timing is not None:
            timing.append(time.monotonic() - started)
        with s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = b""
            try:
                while data := s.recv(1 << 16):
                    got += data
            except ConnectionResetError:
                pass
            return got

    return ns_tools.call_in(lab.pod_a, go)
