"""The long-lived agent never holds the BPF compiler, and a restart or hot upgrade compiles nothing.

bcc (and with it LLVM/clang, ~75-130 MB) runs only in the short-lived helper process of ebpf/build.py;
with --pin-dir the programs are pinned under their content hash and re-used by the next agent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.footprint import byte_compile_product
from planemesh.agent.demo import start_agent
from planemesh.labs import load_lab, procs
from planemesh.labs import netns as ns_tools
from planemesh.labs.traffic import http_requests
from tests.netns.agent_lab import AgentLab, eventually, running_agent

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

PROBE = Path(__file__).with_name("compile_probe")
COMPILED = "compiled pm_tc.c in a helper process"
REUSED = "re-used pinned pm_tc.c"


def compiler_libraries(pid: int) -> set[str]:
    """libbcc / libLLVM / libclang files mapped into a process."""
    with open(f"/proc/{pid}/maps") as f:
        paths = {line.split()[-1] for line in f if len(line.split()) >= 6}
    return {p for p in paths if any(lib in os.path.basename(p) for lib in ("libbcc", "libLLVM", "libclang"))}


def grpc_libraries(pid: int) -> set[str]:
    """grpc's and protobuf's extension modules mapped into a process (loaded only when xDS is configured)."""
    with open(f"/proc/{pid}/maps") as f:
        paths = {line.split()[-1] for line in f if len(line.split()) >= 6}
    return {p for p in paths if any(lib in os.path.basename(p) for lib in ("cygrpc", "_message.abi3", "_upb"))}


def openssl_libraries(pid: int) -> set[str]:
    """libssl / libcrypto mapped into a process (a worker, and an agent without an xDS bootstrap, load uvloop
    without them: agent/lean_loop.py)."""
    with open(f"/proc/{pid}/maps") as f:
        paths = {line.split()[-1] for line in f if len(line.split()) >= 6}
    return {p for p in paths if any(lib in os.path.basename(p) for lib in ("libssl", "libcrypto"))}


def mapped_files(pid: int, *names: str) -> set[str]:
    """Files mapped into a process whose name contains one of `names`."""
    with open(f"/proc/{pid}/maps") as f:
        paths = {line.split()[-1] for line in f if len(line.split()) >= 6}
    return {p for p in paths if any(name in os.path.basename(p) for name in names)}


def output(proc) -> str:  # type: ignore[no-untyped-def]
    return "\n".join(getattr(proc, "output_lines", []))


def proxied(env: AgentLab) -> bool:
    r = http_requests(env.client_ns, env.server("oam", 4), 80, ["/"])
    return r.status == [200] and "x-request-id" in r.seen(0)["headers"]


def test_agent_holds_no_compiler_and_warm_starts_compile_nothing(run_prefix: str) -> None:
    pin_dir = f"/sys/fs/bpf/{run_prefix}-lean"
    try:
        with running_agent(f"{run_prefix}f", ["--pin-dir", pin_dir]) as env:
            # Cold: compiled once, in a helper; the agent process never mapped the compiler.
            assert compiler_libraries(env.agent.pid) == set()
            assert COMPILED in env.agent_output()
            assert proxied(env)
            workers = [*procs.zygotes(env.agent.pid), *procs.worker_pids(env.agent.pid)]  # exec'd: no zygote
            assert len(procs.worker_pids(env.agent.pid)) == 2 and all(compiler_libraries(p) == set() for p in workers)
            # A static config: no xDS, so neither the agent nor a worker loaded grpc/protobuf.
            assert all(grpc_libraries(pid) == set() for pid in [env.agent.pid, *workers])
            # No TLS configured: no OpenSSL in the agent or a worker, which still proxied above.
            assert all(openssl_libraries(pid) == set() for pid in [env.agent.pid, *workers])
            # PyYAML parses the configuration in a child (model/yaml_text.py); an exec'd worker's death signal is
            # set by setpriv (agent/parent_death.py): no libyaml in the agent, no ctypes/libffi in a worker.
            assert mapped_files(env.agent.pid, "_yaml", "libyaml") == set()
            assert all(mapped_files(pid, "_ctypes", "libffi") == set() for pid in procs.worker_pids(env.agent.pid))
            with open(f"/proc/{env.agent.pid}/maps") as f:  # the agent's control loop is the stdlib's (daemon.py)
                assert "uvloop" not in f.read()
            programs = {p for p in os.listdir(pin_dir) if p.startswith("prog_pm_tc_ingress_")}
            assert len(programs) == 1, programs

            # Hot upgrade: the successor takes over and re-uses the pinned program.
            successor = start_agent(env.lab, env.workdir, ["--pin-dir", pin_dir])
            try:
                assert env.agent.wait(30) == 0
                assert REUSED in output(successor) and COMPILED not in output(successor)
                assert compiler_libraries(successor.pid) == set()
                assert eventually(lambda: proxied(env), timeout=10)
                # Fail-open kill, then a restart: pins present, nothing compiled either.
                successor.send_signal(signal.SIGKILL)
                successor.wait(10)
            finally:
                ns_tools.stop(successor)
            restarted = start_agent(env.lab, env.workdir, ["--pin-dir", pin_dir])
            try:
                assert REUSED in output(restarted) and COMPILED not in output(restarted)
                assert eventually(lambda: proxied(env), timeout=10)
                assert {p for p in os.listdir(pin_dir) if p.startswith("prog_pm_tc_ingress_")} == programs
            finally:
                assert ns_tools.stop(restarted) == 0
            # A clean stop detaches and removes every pin, programs included: the next start is cold.
            assert not os.path.exists(pin_dir)
    finally:
        for name in os.listdir(pin_dir) if os.path.isdir(pin_dir) else []:
            os.unlink(os.path.join(pin_dir, name))
        if os.path.isdir(pin_dir):
            os.rmdir(pin_dir)


def test_agent_and_workers_run_OO_from_opt2_caches(run_prefix: str, tmp_path: Path) -> None:
    """-OO (planemesh.module_argv) saves ~0.8 MB per process only when the .opt-2.pyc files exist: the agent and its
    workers compile no module from source at start (scripts/setup.sh wrote the venv's and the stdlib's; the
    product's are written here, as setup.sh and the image do)."""
    byte_compile_product()
    log = tmp_path / "compiled"
    env = {**os.environ, "PYTHONPATH": str(PROBE), "PLANEMESH_COMPILE_LOG": str(log)}
    with load_lab(prefix=f"{run_prefix}o") as lab:
        agent = start_agent(lab, tmp_path, ["--pin-dir", f"/sys/fs/bpf/{run_prefix}-oo"], env=env)
        try:
            workers = procs.worker_pids(agent.pid)
            assert len(workers) == 2
            for pid in [agent.pid, *workers]:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    assert b"-OO" in f.read().split(b"\0"), pid
            logs = [Path(f"{log}.{pid}") for pid in [agent.pid, *workers]]
            compiled = {p.name: p.read_text().split() for p in logs if p.exists()}
            assert compiled == {}, compiled  # every module came from an .opt-2.pyc
        finally:
            assert ns_tools.stop(agent) == 0
    # The probe does see a compile: a module with no .pyc, imported the same way.
    (tmp_path / "fresh_module.py").write_text("X = 1\n")
    child = subprocess.run([sys.executable, "-P", "-OO", "-c", "import fresh_module"], env={
        **env, "PYTHONPATH": f"{PROBE}:{tmp_path}", "PYTHONDONTWRITEBYTECODE": "1"}, timeout=60)  # fmt: skip
    assert child.returncode == 0
    assert [p.read_text().split() for p in tmp_path.glob("compiled.*")] == [[str(tmp_path / "fresh_module.py")]]
