"""One defaults module (planemesh.model.defaults) for every flag of `planemesh`: the parsers follow it, its
variables are really read, docs/configuration.md is generated from it; and what the DaemonSet's variables do."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from planemesh.agent.agent_options import options_from_args
from planemesh.agent.cli import COMMANDS, build_parser
from planemesh.model.config import ConfigError
from planemesh.model.defaults import SETTINGS, Kind, setting
from planemesh.xds.bootstrap import bootstrap_from_dict, with_node
from planemesh.xds.transport import node_identity

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gen_configuration_doc", ROOT / "scripts" / "gen_configuration_doc.py")
gen_doc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_doc)


@pytest.fixture(autouse=True)
def no_planemesh_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for s in SETTINGS:
        if s.env:
            monkeypatch.delenv(s.env, raising=False)


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser, by name ("ca init" for a verb of `ca`), built now (defaults read now)."""
    out: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    full = f"{prefix} {name}".strip()
                    out[full] = sub
                    walk(sub, full)

    for command in ["lab", *COMMANDS]:
        walk(build_parser(argv=[command]), "")
    return out


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]  # fmt: skip


def effective(action: argparse.Action):
    """The default as a parse yields it (argparse converts a string default with the option's type)."""
    return action.type(action.default) if isinstance(action.default, str) and action.type else action.default


def expected_default(s, action: argparse.Action):
    if s.kind is Kind.SWITCH:
        return False
    if s.kind is Kind.LIST or s.default is None:
        return None
    return action.type(s.default) if action.type else s.default


def test_every_flag_of_every_command_is_in_the_defaults_module_with_its_default() -> None:
    seen = set()
    for command, parser in parsers().items():
        for action in options(parser):
            flag = action.option_strings[-1]
            s = setting(command, flag)  # KeyError: a flag missing from planemesh.model.defaults
            seen.add((command, flag))
            assert effective(action) == expected_default(s, action), (command, flag)
    listed = {(c, s.flag) for s in SETTINGS if s.flag for c in s.commands}
    assert listed == seen, f"in the defaults module but no parser has them: {listed - seen}"


def test_every_variable_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    for s in SETTINGS:
        if s.env and s.flag and s.kind is not Kind.LIST:
            monkeypatch.setenv(s.env, "1" if s.kind is Kind.SWITCH else "42")
    for command, parser in parsers().items():
        for action in options(parser):
            s = setting(command, action.option_strings[-1])
            if s.env and s.kind is not Kind.LIST:
                want = True if s.kind is Kind.SWITCH else (action.type("42") if action.type else "42")
                assert effective(action) == want, (command, s.flag, s.env)


def agent_options(argv: list[str] = ()):  # type: ignore[assignment]
    return options_from_args(build_parser(argv=["agent"]).parse_args(["agent", *argv]))


def test_the_agent_reads_planemesh_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    assert agent_options().admin == ["unix:///run/planemesh/admin.sock"]
    monkeypatch.setenv("PLANEMESH_ADMIN", "unix:///tmp/a.sock, 127.0.0.1:15001")
    assert agent_options().admin == ["unix:///tmp/a.sock", "127.0.0.1:15001"]
    assert agent_options(["--admin", "127.0.0.1:15002"]).admin == ["127.0.0.1:15002"]  # the flag wins


def test_admin_clients_talk_to_the_first_endpoint_of_planemesh_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANEMESH_ADMIN", "unix:///tmp/a.sock,127.0.0.1:15001")
    for command in ("status", "planes", "stats", "config-dump", "top"):
        args = build_parser(argv=[command]).parse_args([command])
        assert args.admin == "unix:///tmp/a.sock", command


def test_host_cgroup_and_datapath_only_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANEMESH_HOST_CGROUP", "telecom.slice,system.slice/ims.service")
    monkeypatch.setenv("PLANEMESH_DATAPATH_ONLY", "true")
    opts = agent_options()
    assert opts.host_cgroups == ["telecom.slice", "system.slice/ims.service"] and opts.datapath_only


BOOT = {"node": {"id": "from-file", "metadata": {"NAMESPACE": "mesh"}}, "server": {"address": "127.0.0.1:15010"},
        "planes": [{"name": "oam", "id": 1, "interfaces": ["lo"], "cidrs": ["127.0.0.0/8"]}]}  # fmt: skip


def test_the_daemonsets_variables_reach_the_xds_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANEMESH_NODE_ID", "worker-3")
    monkeypatch.setenv("PLANEMESH_NODE_IPS", "10.0.0.3,fd00::3")
    monkeypatch.setenv("PLANEMESH_NODE_IP", "10.0.0.99")  # NODE_IPS wins
    monkeypatch.setenv("PLANEMESH_POD_NAME", "planemesh-x7k2p")
    monkeypatch.setenv("PLANEMESH_HOST_PROC", "/host/proc")
    opts = agent_options()
    node = node_identity(with_node(bootstrap_from_dict(BOOT), opts.node))
    assert node.id == "worker-3"
    assert node.metadata["INSTANCE_IPS"] == "10.0.0.3,fd00::3" and node.metadata["NAME"] == "planemesh-x7k2p"
    assert node.metadata["NAMESPACE"] == "mesh" and opts.host_proc == Path("/host/proc")


def test_node_ip_alone_and_the_bootstrap_metadata_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANEMESH_NODE_IP", "10.0.0.99")
    boot = bootstrap_from_dict({**BOOT, "node": {"id": "f", "metadata": {"NAME": "set-by-hand"}}})
    node = node_identity(with_node(boot, agent_options(["--pod-name", "pod-1"]).node))
    assert node.id == "f" and node.metadata["INSTANCE_IPS"] == "10.0.0.99" and node.metadata["NAME"] == "set-by-hand"


def test_a_bad_node_ip_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANEMESH_NODE_IPS", "10.0.0.3,not-an-ip")
    with pytest.raises(ConfigError, match=r"--node-ip.*not-an-ip"):
        agent_options()


def test_docs_configuration_md_is_generated_from_the_defaults_module() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == gen_doc.render(), "run: .venv/bin/python -P scripts/gen_configuration_doc.py"
    for s in SETTINGS:
        assert (s.env or s.flag) in doc
