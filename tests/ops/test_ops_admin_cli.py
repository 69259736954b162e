"""The CLI client functions against a live admin server, and their argparse wiring."""

from __future__ import annotations

import argparse
import io
import json
import socket
import threading

import pytest

from planemesh.agent import admin_client
from planemesh.agent.admin_client import (
    EXIT_NOT_READY,
    EXIT_OK,
    EXIT_UNREACHABLE,
    AdminClient,
    AdminUnreachable,
    add_admin_commands,
)
from planemesh.agent.sdnotify import DEFAULT_BLOCKERS
from planemesh.agent.stats_report import DataPathStats, ListenerStats, StatsReport, XdsTypeStats
from planemesh.model.config import Snapshot
from planemesh.model.snapshot_json import from_jsonable


def _report() -> StatsReport:
    return StatsReport(
        listeners=[ListenerStats("oam", "oam_80", active_connections=4, connections=9)],
        datapath=[DataPathStats("media", {"bypass": 12, "proxy": 3}, interfaces_attached=1)],
        xds=[XdsTypeStats("type.googleapis.com/envoy.config.cluster.v3.Cluster", version="42", acks=3)],
        xds_connected=True,
    )


@pytest.fixture(params=["unix", "tcp"])
def client(request, live_admin):
    target = f"unix://{live_admin.unix_path}" if request.param == "unix" else f"http://127.0.0.1:{live_admin.tcp_port}"
    live_admin.stats.register("all", _report)
    return AdminClient(target)


def test_status_reports_blockers_then_ready(client, live_admin, default_snapshot):
    out = io.StringIO()
    assert admin_client.status(client, out) == EXIT_NOT_READY
    text = out.getvalue()
    assert "ready      no, waiting for:" in text and all(b in text for b in DEFAULT_BLOCKERS)
    assert "config     none applied yet" in text
    live_admin.state["snapshot"] = default_snapshot
    for blocker in DEFAULT_BLOCKERS:
        live_admin.readiness.clear(blocker)
    out = io.StringIO()
    assert admin_client.status(client, out) == EXIT_OK
    text = out.getvalue()
    assert "ready      yes" in text and "static:embedded-default" in text and "oam, media" in text
    assert "xds        connected" in text and "Cluster" in text and " 42" in text


def test_planes_table_and_json(client, live_admin, default_snapshot):
    out = io.StringIO()
    assert admin_client.planes(client, out) == EXIT_NOT_READY  # no config yet: said so, not a traceback
    live_admin.state["snapshot"] = default_snapshot
    out = io.StringIO()
    assert admin_client.planes(client, out) == EXIT_OK
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["PLANE", "ID", "PROXY", "CONNS", "REQS", "INTERFACES", "/", "CIDRS"]
    assert lines[1].split()[:5] == ["oam", "1", "15001", "4", "0"]
    assert "packets: bypass=12 proxy=3" in out.getvalue()
    out = io.StringIO()
    assert admin_client.planes(client, out, as_json=True) == EXIT_OK
    assert [p["name"] for p in json.loads(out.getvalue())["planes"]] == ["oam", "media"]


def test_stats_text_filter_and_json(client):
    out = io.StringIO()
    assert admin_client.stats(client, out, prefix="planemesh_bpf_packets") == EXIT_OK
    lines = out.getvalue().splitlines()
    assert lines and all("planemesh_bpf_packets" in line for line in lines)
    assert 'planemesh_bpf_packets_total{plane="media",verdict="bypass"} 12.0' in lines
    out = io.StringIO()
    assert admin_client.stats(client, out, as_json=True) == EXIT_OK
    report = json.loads(out.getvalue())
    assert report["listeners"][0]["active_connections"] == 4


def test_config_dump_round_trips(client, live_admin, default_snapshot):
    out = io.StringIO()
    assert admin_client.config_dump(client, out) == EXIT_NOT_READY
    live_admin.state["snapshot"] = default_snapshot
    out = io.StringIO()
    assert admin_client.config_dump(client, out) == EXIT_OK
    assert from_jsonable(Snapshot, json.loads(out.getvalue())["snapshot"]) == default_snapshot


def test_argparse_wiring_and_env_default(live_admin, monkeypatch, capsys, default_snapshot):
    monkeypatch.setenv("PLANEMESH_ADMIN", f"unix://{live_admin.unix_path}")
    parser = argparse.ArgumentParser(prog="planemesh")
    add_admin_commands(parser.add_subparsers(dest="command", required=True))
    live_admin.state["snapshot"] = default_snapshot
    args = parser.parse_args(["config-dump"])
    assert args.admin == f"unix://{live_admin.unix_path}"
    assert args.func(args) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["version"] == default_snapshot.version
    args = parser.parse_args(["stats", "--filter", "planemesh_ready", "--admin", f"127.0.0.1:{live_admin.tcp_port}"])
    assert args.func(args) == EXIT_OK
    assert "planemesh_ready 0.0" in capsys.readouterr().out


def test_unreachable_agent_is_a_clear_error(tmp_path, capsys):
    client = AdminClient(f"unix://{tmp_path / 'no-agent.sock'}", timeout_s=1)
    with pytest.raises(AdminUnreachable, match="cannot reach the agent at unix://"):
        client.get("/status")
    parser = argparse.ArgumentParser(prog="planemesh")
    add_admin_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["status", "--admin", f"unix://{tmp_path / 'no-agent.sock'}"])
    assert args.func(args) == EXIT_UNREACHABLE
    assert "cannot reach the agent" in capsys.readouterr().err
    args = parser.parse_args(["status", "--admin", "0.0.0.0:15000"])
    assert args.func(args) == EXIT_UNREACHABLE
    assert "non-loopback" in capsys.readouterr().err


def test_garbage_answer_is_a_clear_error(tmp_path):
    # A server that is not the agent: closes after a non-HTTP line.
    path = str(tmp_path / "imposter.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen(1)
        srv.settimeout(5)

        def answer() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"SSH-2.0-OpenSSH\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        with pytest.raises(AdminUnreachable):
            AdminClient(f"unix://{path}", timeout_s=2).get("/status")
        thread.join(5)
