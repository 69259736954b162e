"""uvloop without OpenSSL (agent/lean_loop.py): a worker, and an agent without an xDS bootstrap, load no libssl or
libcrypto at start-up (~4 MB of RSS each, bench/footprint.py); their loop still serves plain TCP, refuses
loop-level TLS (`ssl=`) with a clear error, and a later `import ssl` (the TLS engine's) gets the real module."""

from __future__ import annotations

import subprocess
import sys

from planemesh.agent.cli import loop_tls_possible

CHILD = r"""
import planemesh.agent.worker_process  # the worker's entry module: loads the loop first, before asyncio
import asyncio, sys
from planemesh.agent.lean_loop import NoLoopTls, loaded_without_ssl
import uvloop

def libs():
    with open("/proc/self/maps") as f:
        return sorted({l.split()[-1].rsplit("/", 1)[-1] for l in f if "libssl" in l or "libcrypto" in l})

print("loaded", sorted(m for m in ("ssl", "_ssl", "_hashlib") if m in sys.modules), libs(), loaded_without_ssl())

async def main():
    async def echo(r, w):
        w.write(await r.read(5)); await w.drain(); w.close()
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"hello"); await w.drain()
    print("echo", (await r.read()).decode())
    w.close()
    try:
        await asyncio.open_connection("127.0.0.1", port, ssl=True)
        print("tls", "handshook?")
    except NoLoopTls as exc:
        print("tls", "refused", "without OpenSSL" in str(exc))
    server.close()

uvloop.run(main())
import ssl  # what the TLS engine does on a plane's first TLS connection: the real module, now
print("real", ssl.create_default_context().verify_mode == ssl.CERT_REQUIRED, bool(libs()))
"""


def test_worker_loads_no_openssl_and_its_loop_serves_plain_tcp_refuses_loop_tls() -> None:
    out = subprocess.run([sys.executable, "-P", "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "loaded [] [] True", lines  # no ssl/_ssl/_hashlib module, no libssl/libcrypto mapped
    assert lines[1:] == ["echo hello", "tls refused True", "real True True"], lines


def test_the_agent_keeps_loop_tls_when_a_bootstrap_may_configure_a_kubernetes_source() -> None:
    assert not loop_tls_possible(["agent", "--config", "c.yaml", "--pin-dir", "/sys/fs/bpf/x"], env={})
    assert not loop_tls_possible(["agent", "--xds-resources", "dir"], env={})
    assert loop_tls_possible(["agent", "--bootstrap", "b.yaml"], env={})
    assert loop_tls_possible(["agent", "--boot=b.yaml"], env={})  # argparse's abbreviation
    assert loop_tls_possible(["agent"], env={"PLANEMESH_BOOTSTRAP": "b.yaml"})


AGENT_LOOP = r"""
from planemesh.agent.lean_loop import import_asyncio_without_ssl
import_asyncio_without_ssl()
import asyncio, sys

async def main():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await asyncio.open_connection("127.0.0.1", port, ssl=True)
    except RuntimeError as exc:
        print("refused", exc)
    server.close()

print(sorted(m for m in ("ssl", "_ssl", "_hashlib", "uvloop") if m in sys.modules))
asyncio.run(main())
"""


def test_the_agents_asyncio_without_openssl_refuses_loop_tls_clearly() -> None:
    out = subprocess.run([sys.executable, "-P", "-c", AGENT_LOOP], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "refused stdlib ssl module not available"], out.stdout


def test_an_agent_without_bootstrap_starts_on_the_lean_loop_and_one_with_keeps_openssl() -> None:
    code = (
        "import sys\nfrom planemesh.agent import cli\n"
        "real = cli.build_parser\n"
        "def parse(argv):\n"  # the agent's modules imported (asyncio, uvloop), then stop before running it
        "    real(argv=argv)\n"
        "    sys.exit(0 if ('_ssl' in sys.modules) == ('--bootstrap' in argv) and 'uvloop' not in sys.modules else 3)\n"
        "cli.build_parser = parse\n"
        "cli.main(sys.argv[1:])\n"
    )
    for argv in (["agent", "--config", "x.yaml"], ["agent", "--bootstrap", "b.yaml"]):
        done = subprocess.run([sys.executable, "-P", "-c", code, *argv], capture_output=True, timeout=120, env={})
        assert done.returncode == 0, (argv, done.stderr)
