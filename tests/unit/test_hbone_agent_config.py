"""The agent's side of HBONE (no I/O beyond temp files): the `hbone:` section of the static config and the
bootstrap (errors naming `hbone.<field>`, the bootstrap's `ca:` giving CreateCertificate certificates, the
capture port against the planes' ports), the counters as admin/Prometheus rows, `planemesh hbone`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from planemesh.agent.cli import build_parser, main
from planemesh.agent.hbone.load import load_hbone_section
from planemesh.agent.hbone.stats import HboneStats
from planemesh.agent.hbone.supervisor import HboneSupervisor, load_hbone
from planemesh.agent.identity.ca import new_root, utcnow
from planemesh.agent.identity.ca_files import write_root_ca
from planemesh.agent.metrics import PlanemeshCollector
from planemesh.agent.metrics_text import CollectorRegistry, generate_latest
from planemesh.agent.stats_report import StatsRegistry, coerce_report, merge_reports
from planemesh.model.config import ConfigError
from planemesh.model.static_config import snapshot_from_dict
from planemesh.xds.bootstrap import bootstrap_from_dict

PLANES = [{"name": "oam", "id": 1, "interfaces": ["*-oam"], "cidrs": ["198.18.1.0/24"]}]
NODE = "spiffe://cluster.local/ns/planemesh/sa/node-a"
AMF = "spiffe://cluster.local/ns/ran/sa/amf"


CA_DIR = "/nonexistent/planemesh-ca"  # read by the agent's start only after the section checked out


def section(**extra: object) -> dict:
    return {"node": {"identity": NODE}, "ca": CA_DIR, "workloads": {"10.81.1.2": AMF},
            "peers": [{"name": "node-b", "address": "10.81.0.2", "cidrs": ["10.81.2.0/24"]}], **extra}  # fmt: skip


def boot(hbone: dict, **top: object) -> dict:
    return {"node": {"id": "n", "metadata": {"NAMESPACE": "planemesh", "SERVICE_ACCOUNT": "node-a"}},
            "server": {"address": "unix:///run/xds.sock", "token_file": "/run/token"}, "planes": PLANES,
            "hbone": hbone, **top}  # fmt: skip


def real_ca(tmp_path: Path) -> str:
    root = new_root("cluster.local", now=utcnow())
    out = tmp_path / "ca"
    write_root_ca(out, root)
    return str(out)


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_static_config_accepts_the_section_and_the_agent_checks_it(tmp_path: Path) -> None:
    snapshot_from_dict({"planes": PLANES, "hbone": section()})  # the Snapshot ignores it, the agent reads it
    good = load_hbone_section(write(tmp_path, {"planes": PLANES, "hbone": section(ca=real_ca(tmp_path))}), None)
    assert good is not None and good["peers"][0]["name"] == "node-b"
    assert load_hbone_section(write(tmp_path, {"planes": PLANES}), None) is None
    with pytest.raises(ConfigError, match=r"^hbone\.ca: .*/nonexistent/planemesh-ca"):  # read before anything starts
        load_hbone_section(write(tmp_path, {"planes": PLANES, "hbone": section()}), None)


@pytest.mark.parametrize(
    ("hbone", "path", "message"),
    [
        (section(peers=[{"address": "10.81.0.2", "cidrs": ["10.0.0.0/33"]}]), "hbone.peers[0].cidrs[0]",
         "is not an IP prefix"),
        (section(listen="nowhere:15008"), "hbone.listen", "is not an IP address"),
        (section(capture={"port": 15001, "interfaces": ["veth0"], "ports": [8080]}), "hbone.capture.port",
         "15001 is plane oam's proxy_port"),
        (section(capture={"port": 15006, "interfaces": ["veth0", "n3-oam"], "ports": [8080]}),
         "hbone.capture.interfaces[1]", "'n3-oam' is an interface of plane oam"),
        (section(rbac=[{"rules": {"policies": {"p": {"permissions": [{"any": True}],
                                                      "principals": [{"metadata": {}}]}}}}]),
         "hbone.rbac[0].rules.policies[p].principals[0].metadata", "not supported"),
        ({k: v for k, v in section().items() if k != "ca"}, "hbone.ca", "ca_api"),
        (section(tunnel=True), "hbone.tunnel", "unknown field"),
        (section(wds={"node": "node-a"}), "hbone.wds.address", "a non-empty string required"),
        (section(wds={"address": "unix:///x", "node": "n", "token": "t"}), "hbone.wds.token", "unknown field"),
        (section(peers=[{"address": "10.81.0.2"}]), "hbone.peers[0].cidrs", "at least one pod CIDR"),
        ("yes", "hbone", "expected a mapping"),
    ],
)  # fmt: skip
def test_section_errors_name_the_field(tmp_path: Path, hbone: object, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_hbone(write(tmp_path, {"planes": PLANES, "hbone": hbone}), None)
    assert err.value.path == path and message in err.value.reason, str(err.value)


def test_bootstrap_ca_section_gives_hbone_its_certificates_by_create_certificate(tmp_path: Path) -> None:
    no_ca = {k: v for k, v in section().items() if k != "ca"}
    with pytest.raises(ConfigError, match=r"^hbone\.ca: .*ca_api"):
        bootstrap_from_dict(boot(no_ca))  # neither its own CA nor the bootstrap's
    with pytest.raises(ConfigError, match=r"^hbone\.peers\[0\]\.address: required"):
        bootstrap_from_dict(boot(section(peers=[{"cidrs": ["10.81.2.0/24"]}])))
    settings = load_hbone(None, write(tmp_path, boot(no_ca, ca={"ttl_s": 3600})))
    assert settings is not None and "ca" not in settings
    assert settings["ca_api"] == {"address": "unix:///run/xds.sock", "token_file": "/run/token", "ttl_s": 3600.0}
    own = load_hbone(None, write(tmp_path, boot(section(ca=real_ca(tmp_path)), ca={"ttl_s": 3600})))
    assert own is not None and "ca_api" not in own  # a section with its own CA keeps it


def test_counters_reach_the_admin_report_and_prometheus(tmp_path: Path) -> None:
    stats = HboneStats()
    out = stats.peer_out("node-b")
    out.connections, out.streams, out.bytes_sent, out.bytes_received = 1, 3, 300, 30
    stats.refuse_out("status_403", "node-b")
    stats.refuse_out("no_route")
    stats.peer_in("node-b").streams = 2
    stats.refuse_in("rbac_denied", "node-b")
    stats.wds_acks, stats.wds_nacks = 4, 1
    sup = HboneSupervisor(section(), tmp_path, "test")
    sup.stats_path.write_text(json.dumps(stats.as_dict()))
    registry = StatsRegistry()
    registry.register("hbone", sup.report)
    registry.register("hbone-again", sup.report)  # rows with the same peer and direction are summed
    report = registry.gather()
    rows = {(r.peer, r.direction): r for r in report.hbone}
    assert rows[("node-b", "outbound")].streams == 6 and rows[("node-b", "outbound")].refused == {"status_403": 2}
    assert rows[("-", "outbound")].refused == {"no_route": 2}
    assert rows[("node-b", "inbound")].refused == {"rbac_denied": 2}
    assert report.hbone_node[0].up == 0 and report.hbone_node[0].restarts == 0
    exposition = CollectorRegistry()
    exposition.register(PlanemeshCollector(registry))
    text = generate_latest(exposition).decode()
    assert "planemesh_hbone_streams" in text and "planemesh_hbone_refused" in text and "planemesh_hbone_up" in text
    assert report.hbone_node[0].wds_nacks == 1 and "planemesh_hbone_wds_responses" in text
    one = merge_reports([coerce_report(sup.report())])
    assert {(r.peer, r.direction) for r in one.hbone} == set(rows)


def test_planemesh_hbone_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser(argv=["hbone"]).parse_args(["hbone", "--config", "x.yaml", "--shared-routing"])
    assert args.config == "x.yaml" and args.shared_routing
    bad = write(tmp_path, {"planes": PLANES, "hbone": section(listen="nowhere")})
    assert main(["hbone", "--config", str(bad)]) == 2
    assert "hbone.listen" in capsys.readouterr().err


def test_the_supervised_child_never_imports_the_checkouts_folders(tmp_path: Path) -> None:
    """Started from a checkout (the working directory on sys.path), `python -m planemesh.agent.hbone` found the
    repository's xds/ folder instead of xds-protos and died: the child runs with -P like every product child."""
    argv = HboneSupervisor(section(), tmp_path, "test").argv()
    assert argv[1:5] == ["-P", "-OO", "-m", "planemesh.agent.hbone"]  # -OO: planemesh.module_argv
