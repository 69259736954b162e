"""STRICT_DNS for real: a PlaneProxy in a lab netns resolves its cluster's host with the system resolver
(glibc getaddrinfo: the lab's /etc/hosts, which `ip netns exec` mounts from /etc/netns/<ns>/), follows a
changed answer at dns_refresh_rate without any new snapshot, and keeps the last addresses when the name stops
resolving. The netns has only loopback and its resolv.conf names 127.0.0.1 in it: no DNS query can leave."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from planemesh.labs import netns as ns_tools
from tests.support.procs import dev_module_argv

pytestmark = pytest.mark.netns
REFRESH_S = 0.3


def _hosts(path: Path, ip: str | None) -> None:
    # Written in place: `ip netns exec` bind-mounts this very file over /etc/hosts.
    with path.open("r+") as f:
        f.truncate(0)
        f.write("127.0.0.1 localhost\n" + (f"{ip} backend.lab.test\n" if ip else ""))


@pytest.fixture
def dns_lab(run_prefix):
    ns = f"{run_prefix}dns"
    etc = Path("/etc/netns") / ns
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        ns_tools.run(ns, ["ip", "link", "set", "lo", "up"])
        etc.mkdir(parents=True)
        (etc / "hosts").write_text("")
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        yield ns, etc
    finally:
        ns_tools.remove(ns)
        shutil.rmtree(etc, ignore_errors=True)


class Child:
    def __init__(self, ns: str) -> None:
        argv = dev_module_argv("tests.netns.dns_child", str(REFRESH_S))
        self.proc = ns_tools.popen(ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.ask(None) == "ready"

    def ask(self, cmd: str | None) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if cmd is not None:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def until(self, want: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        got = ""
        while time.monotonic() < deadline:
            got = self.ask("get")
            if got == want:
                return got
            time.sleep(0.05)
        return got

    def close(self) -> None:
        if self.proc.poll() is None:
            self.ask("quit")
        ns_tools.stop(self.proc)


def test_strict_dns_follows_the_system_resolver_without_a_snapshot(dns_lab):
    ns, etc = dns_lab
    _hosts(etc / "hosts", "127.0.0.2")
    child = Child(ns)
    try:
        assert child.until("a") == "a"  # resolved at once: backend a
        _hosts(etc / "hosts", "127.0.0.3")
        assert child.until("b") == "b"  # re-resolved at dns_refresh_rate, no snapshot pushed
        before = json.loads(child.ask("stats"))
        _hosts(etc / "hosts", None)  # the name no longer resolves: the last addresses stay
        time.sleep(REFRESH_S * 4 + 1.5)
        after = json.loads(child.ask("stats"))
        assert after["failures"] > before["failures"] and after["lookups"] > before["lookups"]
        assert child.ask("get") == "b"
    finally:
        child.close()


def test_a_name_that_never_resolved_answers_503(dns_lab):
    ns, etc = dns_lab
    child = Child(ns)
    try:
        assert child.ask("get") == "503"  # no address yet: no healthy upstream
        deadline = time.monotonic() + 10
        while json.loads(child.ask("stats"))["failures"] < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert json.loads(child.ask("stats"))["failures"] >= 2  # retried at the refresh rate, failing
        assert child.ask("get") == "503"
        _hosts(etc / "hosts", "127.0.0.2")
        assert child.until("a") == "a"
    finally:
        child.close()
