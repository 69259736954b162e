"""The long-lived agent process imports no pyroute2 (issue 15: ~10 MB of its RSS; pyroute2's package imports all of
itself). Its kernel changes go through the short-lived netlink helper (netplanes/nl_helper.py, which does import
it) and it reads links with its own rtnetlink reader (netplanes/link_monitor.py). The check runs in a fresh
interpreter over every module the agent process loads, at start or later (host mode, HBONE supervision, xDS,
admin, shaping); tests/bpf/test_kernel_netlink_helper.py runs the kernel side for real."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

AGENT_MODULES = (
    "planemesh.agent.cli",
    "planemesh.agent.daemon",
    "planemesh.agent.kernel",
    "planemesh.agent.admin_glue",
    "planemesh.agent.xds_source",
    "planemesh.agent.hbone.supervisor",
    "planemesh.ebpf.loader",
    "planemesh.ebpf.egress_shaper",
    "planemesh.ebpf.host_redirect",
    "planemesh.netplanes.discovery",
    "planemesh.netplanes.link_monitor",
    "planemesh.netplanes.nl_client",
    "planemesh.netplanes.netns",
)


def _loaded(modules: tuple[str, ...]) -> list[str]:
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.split()


def test_the_agents_modules_import_no_pyroute2() -> None:
    assert [m for m in _loaded(AGENT_MODULES) if m.split(".")[0] == "pyroute2"] == []


def test_the_netlink_helper_is_where_pyroute2_is() -> None:
    assert "pyroute2" in _loaded(("planemesh.netplanes.nl_helper",))


def test_no_product_module_imports_netaddr() -> None:
    """Addresses and networks are model/ip.py's (the stdlib's ipaddress): netaddr cost each process ~1.5-2 MB."""
    product = (*AGENT_MODULES, "planemesh.xds.translate", "planemesh.xds.translate_rbac", "planemesh.ebpf.policy",
               "planemesh.agent.rbac", "planemesh.agent.workloads.model", "planemesh.model.snapshot_json",
               "planemesh.model.validation", "planemesh.agent.proxy.server", "planemesh.labs.model")  # fmt: skip
    assert [m for m in _loaded(product) if m.split(".")[0] == "netaddr"] == []


def test_reading_the_default_configuration_loads_no_archive_or_tempfile_modules() -> None:
    """The embedded default config is read as the file next to model/static_config.py: importlib.resources pulled
    tempfile, shutil, bz2, lzma and zipfile into the agent (~1 MB of RSS)."""
    code = (
        "import sys\nfor m in " + repr(AGENT_MODULES) + ": __import__(m)\n"
        "from planemesh.model.static_config import load_default_config\nassert load_default_config().planes\n"
        "print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120, check=True)
    heavy = {"importlib.resources", "tempfile", "lzma", "bz2", "zipfile"}
    assert heavy.isdisjoint(out.stdout.split()), heavy.intersection(out.stdout.split())


def test_the_agents_command_line_loads_no_shutil_and_help_keeps_the_terminal_width() -> None:
    """argparse's formatter asks shutil for the terminal's width at each add_argument (shutil imports bz2, lzma,
    zlib: ~0.45 MB); agent/cli.py gives it the width itself, found the same way (COLUMNS first)."""
    code = (
        "import sys\nfrom planemesh.agent import cli\n"
        "p = cli.build_parser(argv=['agent'])\np.parse_args(['agent', '--config', 'x.yaml'])\n"
        "print('shutil' in sys.modules, max(map(len, p.format_help().splitlines())))"
    )
    env = {"COLUMNS": "50", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    loaded, widest = out.stdout.split()
    assert loaded == "False" and int(widest) <= 50


NETADDR_IMPORT = re.compile(r"^\s*(from netaddr\b|import netaddr\b)", re.M)


def test_no_source_file_imports_netaddr() -> None:
    """Statically, over the product, labs, benches and tests: a netaddr network handed to the model never matches
    model/ip.py's addresses (a test built with one saw its listeners match nothing). Only the test comparing the
    two keeps it."""
    root = Path(__file__).resolve().parents[2]
    folders = ("agent", "bench", "ebpf", "labs", "model", "netplanes", "tests", "xds")
    found = [
        str(path.relative_to(root))
        for folder in folders
        for path in (root / folder).rglob("*.py")
        if path.name != "test_model_ip.py" and NETADDR_IMPORT.search(path.read_text())
    ]
    assert found == []


def test_an_agent_that_execs_its_workers_loads_no_fork_server() -> None:
    """The zygote's modules (agent/zygote.py, zygote_client.py: ~70 kB of RSS) are the agent's only with
    --worker-zygote (daemon.new_zygotes); tests/netns/test_worker_zygote_agent.py runs that mode."""
    assert [m for m in _loaded(AGENT_MODULES[:2]) if "zygote" in m] == []


def test_the_agent_loads_pickles_c_half_only() -> None:
    """The worker channel, the YAML and the netlink helpers pickle with `_pickle` (planemesh/cpickle.py): pickle.py
    also defines a pure-Python pickler, ~0.2 MB of RSS in the agent and in each worker. (protobuf imports pickle:
    an agent with xDS or HBONE has it anyway.)"""
    at_rest = (
        "planemesh.agent.cli",
        "planemesh.agent.daemon",
        "planemesh.agent.kernel",
        "planemesh.agent.admin_glue",
        "planemesh.netplanes.nl_client",
        "planemesh.model.yaml_text",
        "planemesh.agent.worker_channel",
    )
    loaded = _loaded(at_rest)
    assert "_pickle" in loaded and "pickle" not in loaded
