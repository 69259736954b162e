"""What a plane's worker process loads at start-up: nothing a plane without that feature does not use.

Each worker is a process of its own (agent/worker_process.py), so every module it imports costs RSS once per plane
(bench/footprint.py reports RSS, PSS and USS). The check runs in a fresh interpreter, as a worker starts."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time

import pytest

from planemesh.model.safe_regex import compile_regex
from planemesh.model.static_config import load_default_config

NOT_IN_A_WORKER = {
    "re2": "RE2 and its C++ runtime (~3 MB RSS): loaded by the first regex route only (model/safe_regex.py)",
    "grpc": "the xDS client lives in the agent",
    "google.protobuf": "xDS messages are translated in the agent",
    "bcc": "BPF programs are built by a short-lived helper of the agent",
    "yaml": "configuration files are read by the agent",
    "pyroute2": "netlink is the agent's",
    "cryptography": "certificates are made by the agent",
    "h2": "the h2 stack loads on a worker's first h2 connection (agent/proxy/h2_support.py)",
    "hpack": "same",
    "planemesh.agent.proxy.h2_codec": "same",
    "ssl": "uvloop is loaded without OpenSSL (agent/lean_loop.py); the TLS engine imports ssl on first use",
    "_ssl": "same: libssl and libcrypto, ~4 MB of RSS",
    "_hashlib": "hashlib's OpenSSL half: lb.py hashes with blake2b from _blake2, xfcc.py loads hashlib on mTLS",
    "netaddr": "addresses and networks are model/ip.py's, on the stdlib's ipaddress (~1.5-2 MB RSS less)",
    "argparse": "the worker's command line is the agent's, parsed by hand (~0.6 MB RSS with gettext)",
    "ctypes": "its PR_SET_PDEATHSIG is set by setpriv before it runs (agent/parent_death.py; ~0.35 MB RSS)",
    "_ctypes": "same",
    "json": "loaded by the first record of a JSON access log (agent/proxy/accesslog.py; ~0.1 MB RSS)",
    "http": "its HTTPStatus enum loads with the first reason phrase the proxy makes up (agent/proxy/http1.py)",
    "pickle": "the worker channel uses pickle's C half directly (planemesh/cpickle.py; pickle.py is ~0.2 MB RSS)",
}

# The snapshot arrives pickled, as the agent sends it (agent/worker_channel.py).
STARTUP = (
    "import sys, planemesh.agent.worker_process\n"
    "from planemesh import cpickle\n"
    "from planemesh.agent.proxy.server import PlaneProxy\n"
    "from planemesh.agent.proxy.accesslog import file_sink\n"
    "PlaneProxy(cpickle.load(sys.stdin.buffer), 'oam', upstream_mark=1)\n"
    "print(' '.join(m for m in {names!r} if m in sys.modules))\n"
)


def test_worker_start_up_loads_none_of_what_belongs_to_the_agent_or_to_unused_features() -> None:
    code = STARTUP.format(names=sorted(NOT_IN_A_WORKER))
    snapshot = pickle.dumps(load_default_config())
    out = subprocess.run([sys.executable, "-c", code], input=snapshot, capture_output=True, timeout=120, check=True)
    loaded = out.stdout.decode().split()
    assert not loaded, {m: NOT_IN_A_WORKER[m] for m in loaded}


def test_regexes_still_compile_and_match_once_re2_is_loaded_on_demand() -> None:
    rx = compile_regex(r"/v[0-9]+/.*")
    assert rx.fullmatch("/v12/x") and not rx.fullmatch("/w/x")


def test_worker_command_line_parses_what_the_supervisor_writes_and_refuses_the_rest() -> None:
    from planemesh.agent.worker_process import parse_args

    args = parse_args(["--plane", "oam", "--control-fd", "3", "--upstream-mark", "0x100", "--listen-fd", "4",
                       "--listen-fd", "5", "--drain-timeout", "2.5", "--host-map-fd", "9"])  # fmt: skip
    assert (args.plane, args.control_fd, args.upstream_mark) == ("oam", 3, 0x100)
    assert (args.listen_fd, args.drain_timeout, args.host_map_fd, args.access_log) == ([4, 5], 2.5, 9, None)
    for bad, why in [
        (["--plane"], "one value"),
        (["--plane", "x", "--control-fd", "z", "--upstream-mark", "1"], "bad value for --control-fd"),
        (["--plane", "x", "--control-fd", "3", "--upstream-mark", "1", "--bogus", "1"], "unknown option"),
        (["--plane", "x"], "required"),
    ]:
        with pytest.raises(SystemExit, match=why) as refused:
            parse_args(bad)
        assert refused.value.code == 2  # argparse's usage exit code


def test_the_access_logs_millisecond_table_is_built_by_the_first_line_not_at_start() -> None:
    """~64 kB per worker at rest or without an access log (agent/proxy/accesslog.py _MILLIS)."""
    code = STARTUP.replace("print(", "print(len(sys.modules['planemesh.agent.proxy.accesslog']._MILLIS), ", 1)
    out = subprocess.run([sys.executable, "-c", code.format(names=[])], input=pickle.dumps(load_default_config()),
                         capture_output=True, timeout=120, check=True)  # fmt: skip
    assert out.stdout.split()[0] == b"0"
    from planemesh.agent.proxy.accesslog import format_start_time

    for epoch in (1765032000.0, 1765032000.0005, 1765032000.999, 1765032001.25, 86399.5):
        whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(epoch)))
        assert format_start_time(epoch) == f"{whole}.{int((epoch - int(epoch)) * 1000):03d}Z"


def test_reason_phrases_are_the_stdlibs_with_or_without_http_loaded() -> None:
    from http import HTTPStatus

    from planemesh.agent.proxy.http1 import _BUILT_IN, reason

    assert all(reason(code) == HTTPStatus(code).phrase.encode() for code in [*_BUILT_IN, 200, 404, 502, 504])
    assert reason(599) == b"Unknown"
