"""Host-mode configuration: slices to cgroup paths, the `host_mode:` section and --host-cgroup values,
resolution against the cgroup v2 mount (a bad path is a ConfigError naming it), mountinfo parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from planemesh.agent.host_attach import load_host_cgroups, resolve
from planemesh.ebpf.host_redirect import cgroup2_mounts_in
from planemesh.model.config import ConfigError
from planemesh.model.host_mode import HostModeConfig, cli_specs, host_mode_from_dict, slice_cgroup
from planemesh.model.static_config import load_static_config


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("telecom.slice", "telecom.slice"),
        ("telecom-media.slice", "telecom.slice/telecom-media.slice"),
        ("a-b-c.slice", "a.slice/a-b.slice/a-b-c.slice"),
        ("system.slice", "system.slice"),
        ("-.slice", "."),
    ],
)
def test_slice_names_map_to_their_nested_cgroup(name: str, path: str) -> None:
    assert slice_cgroup(name) == path


@pytest.mark.parametrize("name", ["telecom", "telecom.service", "-a.slice", "a-.slice", "a--b.slice", "a/b.slice", ""])
def test_bad_slice_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="not a systemd slice name"):
        slice_cgroup(name, "host_mode.slices[0]")


def test_host_mode_section() -> None:
    assert host_mode_from_dict(None) == HostModeConfig()
    assert host_mode_from_dict({"slices": ["telecom.slice"], "cgroups": ["system.slice/ims.service"]}) == (
        HostModeConfig(cgroups=("system.slice/ims.service",), slices=("telecom.slice",))
    )


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (["telecom.slice"], "host_mode"),
        ({"slice": ["telecom.slice"]}, "host_mode.slice"),
        ({"cgroups": "system.slice"}, "host_mode.cgroups"),
        ({"cgroups": ["ok", 7]}, "host_mode.cgroups[1]"),
        ({"cgroups": [""]}, "host_mode.cgroups[0]"),
        ({"slices": ["telecom.slice", "telecom"]}, "host_mode.slices[1]"),
    ],
)
def test_bad_host_mode_sections_name_the_field(raw: object, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        host_mode_from_dict(raw)
    assert err.value.path == field


def test_cli_values_slices_paths_and_commas() -> None:
    assert cli_specs(["telecom.slice", "system.slice/ims.service,/sys/fs/cgroup/x", " a-b.slice , "]) == HostModeConfig(
        cgroups=("system.slice/ims.service", "/sys/fs/cgroup/x"), slices=("telecom.slice", "a-b.slice")
    )


MOUNTINFO = r"""31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 / /mnt/with\040space rw shared:5 - cgroup2 none rw
"""


def test_cgroup2_mounts_from_mountinfo() -> None:
    assert cgroup2_mounts_in(MOUNTINFO) == ["/sys/fs/cgroup/unified", "/mnt/with space"]
    assert cgroup2_mounts_in("garbage\n\n1 2 3 - cgroup2\n") == []


@pytest.fixture
def hierarchy(tmp_path: Path) -> Path:
    """A directory tree shaped like a cgroup v2 hierarchy (each cgroup has cgroup.controllers)."""
    for rel in (".", "telecom.slice", "telecom.slice/telecom-media.slice", "system.slice", "system.slice/ims.service"):
        (tmp_path / rel).mkdir(parents=True, exist_ok=True)
        (tmp_path / rel / "cgroup.controllers").write_text("cpu\n")
    (tmp_path / "plain").mkdir()
    return tmp_path


def test_resolve_slices_and_paths(hierarchy: Path) -> None:
    config = HostModeConfig(
        cgroups=("system.slice/ims.service", str(hierarchy / "telecom.slice")),
        slices=("telecom-media.slice", "telecom.slice"),
    )
    assert resolve(config, mounts=[str(hierarchy)]) == (
        str(hierarchy / "telecom.slice/telecom-media.slice"),
        str(hierarchy / "telecom.slice"),  # named twice, attached once
        str(hierarchy / "system.slice/ims.service"),
    )


@pytest.mark.parametrize(
    ("config", "field", "why"),
    [
        (HostModeConfig(slices=("absent.slice",)), "host_mode.slices[0]", "not a cgroup v2 directory"),
        (HostModeConfig(cgroups=("plain",)), "host_mode.cgroups[0]", "not a cgroup v2 directory"),
        (HostModeConfig(cgroups=("system.slice", "/etc")), "host_mode.cgroups[1]", "not below a cgroup v2 mount"),
        (HostModeConfig(cgroups=("system.slice/../..",)), "host_mode.cgroups[0]", "not below a cgroup v2 mount"),
    ],
)
def test_bad_paths_are_config_errors_naming_them(hierarchy: Path, config: HostModeConfig, field: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as err:
        resolve(config, mounts=[str(hierarchy)])
    assert err.value.path == field


def test_no_cgroup2_mount_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no cgroup v2 hierarchy"):
        resolve(HostModeConfig(slices=("telecom.slice",)), mounts=[])
    assert resolve(HostModeConfig(), mounts=[]) == ()  # host mode off needs nothing


def test_static_config_and_command_line_together(hierarchy: Path, tmp_path: Path) -> None:
    config = tmp_path / "planemesh.yaml"
    config.write_text(
        "planes:\n  - {name: oam, id: 1, interfaces: [eth1], cidrs: [198.18.1.0/24]}\n"
        "host_mode:\n  slices: [telecom.slice]\n"
    )
    assert len(load_static_config(config).planes) == 1  # the snapshot loader accepts the section
    mounts = [str(hierarchy)]
    assert load_host_cgroups(["system.slice/ims.service", "telecom.slice"], config, mounts) == (
        str(hierarchy / "telecom.slice"),
        str(hierarchy / "system.slice/ims.service"),
    )
    assert load_host_cgroups([], None, mounts) == ()
    with pytest.raises(ConfigError) as err:
        load_host_cgroups(["nope.slice"], config, mounts)
    assert err.value.path == "--host-cgroup" and "nope.slice" in str(err.value)
    config.write_text(config.read_text().replace("telecom.slice", "telecom"))
    with pytest.raises(ConfigError) as err:
        load_host_cgroups([], config, mounts)
    assert err.value.path == "host_mode.slices[0]"
