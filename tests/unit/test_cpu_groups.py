"""The pure parts of the per-plane CPU groups: where the cpu controller is, our cgroup, v1 shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from planemesh.agent.cpu_groups import own_cgroup, parse_mounts, v1_shares

pytestmark = pytest.mark.unit

HYBRID_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
UNIFIED_MOUNTS = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n"


def test_hybrid_mounts_give_both_hierarchies() -> None:
    assert parse_mounts(HYBRID_MOUNTS) == (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/cpu"))


def test_unified_mounts_have_no_v1_cpu() -> None:
    assert parse_mounts(UNIFIED_MOUNTS) == (Path("/sys/fs/cgroup"), None)


def test_cpuacct_alone_is_not_the_cpu_controller() -> None:
    assert parse_mounts("cgroup /x cgroup rw,cpuacct 0 0\n") == (None, None)


def test_own_cgroup_v2_and_v1() -> None:
    text = "4:memory:/m\n2:cpu,cpuacct:/system.slice/planemesh.service\n0::/system.slice/planemesh.service\n"
    assert own_cgroup(text, None) == "/system.slice/planemesh.service"
    assert own_cgroup(text, "cpu") == "/system.slice/planemesh.service"
    assert own_cgroup("1:name=systemd:/\n", "cpu") == "/"


@pytest.mark.parametrize(("weight", "shares"), [(100, 1024), (1, 10), (10000, 102400), (50, 512)])
def test_v1_shares_follow_the_v2_weight(weight: int, shares: int) -> None:
    assert v1_shares(weight) == shares


def test_groups_of_dead_agents_are_removed_live_ones_kept(tmp_path: Path) -> None:
    import os

    from planemesh.agent.cpu_groups import remove_stale_groups

    dead = tmp_path / "planemesh-999999999"  # above pid_max: never alive
    (dead / "plane-oam").mkdir(parents=True)
    live = tmp_path / f"planemesh-{os.getpid()}"
    (live / "plane-oam").mkdir(parents=True)
    other = tmp_path / "planemesh-notapid"
    other.mkdir()
    assert remove_stale_groups(tmp_path) == [dead]
    assert not dead.exists() and (live / "plane-oam").exists() and other.exists()
