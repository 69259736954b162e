"""The pure parts of the per-plane CPU groups: where the cpu controller is, our cgroup, v1 shares."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from planemesh.agent.cpu_groups import join_argv, own_cgroup, parse_mounts, v1_shares

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


def test_cpuset_and_memory_hierarchies_are_found_by_their_own_option() -> None:
    mounts = HYBRID_MOUNTS + "cgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0\ncgroup /m cgroup rw,memory 0 0\n"
    assert parse_mounts(mounts, "cpuset")[1] == Path("/sys/fs/cgroup/cpuset")  # not the "cpu" mount
    assert parse_mounts(mounts, "memory")[1] == Path("/m")
    assert parse_mounts(HYBRID_MOUNTS, "cpuset")[1] is None
    assert parse_mounts(mounts, "cpu")[1] == Path("/sys/fs/cgroup/cpu")  # not the "cpuset" mount


def test_v2_groups_get_every_controller_enabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from planemesh.agent.cpu_groups import _prepare_v2

    writes: list[tuple[str, str]] = []
    real_write = Path.write_text

    def recording(path: Path, text: str, *args: object, **kwargs: object) -> int:
        if path.name == "cgroup.subtree_control" and path.parent.name == "planemesh-1" and text == "+memory":
            raise OSError(16, "memory refused below the base")  # one controller failing leaves the others
        writes.append((path.parent.name, text))
        return real_write(path, text)

    monkeypatch.setattr(Path, "write_text", recording)
    hierarchy, enabled = _prepare_v2(tmp_path, "/", "planemesh-1", ["cpu", "cpuset", "memory"])
    assert hierarchy.base == tmp_path / "planemesh-1" and hierarchy.version == 2
    assert enabled == ["cpu", "cpuset"]
    own = tmp_path.name
    assert writes == [(own, "+cpu"), (own, "+cpuset"), (own, "+memory"), ("planemesh-1", "+cpu"),
                      ("planemesh-1", "+cpuset")]  # fmt: skip


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


# ---- cpusets and memory limits (model/plane_limits.py, and the writes against a fake cgroup tree) ----------


@pytest.mark.parametrize(
    ("spec", "online", "canonical"),
    [
        ("1", "0-1", "1"),
        ("0-1", "0-1", "0-1"),
        (" 0,1 ", "0-1", "0-1"),
        ("3,0-1", "0-3", "0-1,3"),
        ("0-1,1,0", "0-1", "0-1"),
        ("5", None, "5"),  # online CPUs unknown: the syntax alone is checked
        ("2-2,4-5", "0-7", "2,4-5"),
    ],
)
def test_cpu_lists_that_are_accepted(spec: str, online: str | None, canonical: str) -> None:
    from planemesh.model.plane_limits import check_cpus, parse_cpu_list

    assert check_cpus(spec, parse_cpu_list(online) if online else None) == canonical


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty cpu list"),
        ("  ", "empty cpu list"),
        ("a", "not a CPU number or range"),
        ("1-", "not a CPU number or range"),
        ("-1", "not a CPU number or range"),
        ("1,,2", "not a CPU number or range"),
        ("0-1:1/2", "not a CPU number or range"),  # the kernel's strides: not worth supporting
        ("+1", "not a CPU number or range"),
        ("\u0661", "not a CPU number or range"),  # a non-ASCII digit
        ("3-1", "runs backwards"),
        ("0-99999999999", "not a CPU number or range"),  # never materialised as a huge range
        ("9000", "beyond any kernel"),
        ("2", "CPU 2 not online on this node (online: 0-1)"),
        ("0-3", "CPU 2-3 not online"),
    ],
)
def test_cpu_lists_that_are_refused(spec: str, message: str) -> None:
    from planemesh.model.plane_limits import check_cpus

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_cpus(spec, frozenset({0, 1}))


@pytest.mark.parametrize(
    ("mb", "workers", "limits_mb"),
    [
        (256, 1, (320, 288)),  # 256 + 64 (a quarter); high = 90%
        (256, 2, (640, 576)),
        (64, 1, (96, 86)),  # the 32 MiB minimum margin; whole MiB
        (2048, 1, (2560, 2304)),
        (0, 3, None),  # 0: no limit
    ],
)
def test_group_memory_is_the_workers_caps_plus_margin(mb: int, workers: int, limits_mb: tuple | None) -> None:
    from planemesh.model.plane_limits import MIB, group_memory

    got = group_memory(mb, workers)
    if limits_mb is None:
        assert got is None
        return
    assert got is not None
    assert got == (limits_mb[0] * MIB, limits_mb[1] * MIB)
    assert got[1] > 0.95 * mb * MIB * workers  # memory.high above the workers' hard shed point


def _fake_tree(tmp_path: Path, version: int) -> dict:
    """A cgroup tree of plain files: what the writes leave behind can be read back."""
    from planemesh.agent.cpu_groups import Hierarchy

    base = tmp_path / "planemesh-1"
    base.mkdir()
    (base / "cpuset.cpus").write_text("0-1\n")
    (base / "cpuset.mems").write_text("0\n")
    return {c: Hierarchy(base, version) for c in ("cpuset", "memory")}


@pytest.mark.parametrize("version", [1, 2])
def test_limits_are_written_once_and_rewritten_on_change(tmp_path: Path, version: int) -> None:
    from planemesh.agent.cpu_groups import FILES, CpuGroups

    groups = CpuGroups(None, _fake_tree(tmp_path, version))
    plane = tmp_path / "planemesh-1" / "plane-oam"
    v = int(version == 1)
    plane.mkdir()
    (plane / FILES["cpus_effective"][v]).write_text("1\n")  # what the kernel would report for cpus 1
    groups.set_plane("oam", 100, 2, "1", 256)
    assert (plane / FILES["cpus"][v]).read_text() == "1"
    assert (plane / FILES["memory_max"][v]).read_text() == str(640 << 20)
    assert (plane / FILES["memory_high"][v]).read_text() == str(576 << 20)
    assert "cpuset" not in groups.not_applied["oam"] and "memory" not in groups.not_applied["oam"]
    (plane / FILES["memory_max"][v]).write_text("sentinel")
    groups.set_plane("oam", 100, 2, "1", 256)  # unchanged: nothing written
    assert (plane / FILES["memory_max"][v]).read_text() == "sentinel"
    groups.set_plane("oam", 100, 1, "1", 256)  # one worker fewer: the group's limit follows
    assert (plane / FILES["memory_max"][v]).read_text() == str(320 << 20)
    row = groups.report()["plane_groups"][0]
    assert row["cpus"] == "1" and row["cpus_effective"] == "1" and row["memory_max_bytes"] == 320 << 20


def test_a_cpuset_the_kernel_does_not_apply_is_reported(tmp_path: Path) -> None:
    from planemesh.agent.cpu_groups import CpuGroups

    groups = CpuGroups(None, _fake_tree(tmp_path, 2))
    plane = tmp_path / "planemesh-1" / "plane-oam"
    plane.mkdir()
    (plane / "cpuset.cpus.effective").write_text("0-1\n")  # v2 fell back to the parent's CPUs
    groups.set_plane("oam", 100, 1, "1", 256)
    assert groups.not_applied["oam"]["cpuset"] == "asked 1, the kernel applies 0-1"
    assert groups.report()["plane_groups"][0]["not_applied"] == {"cpuset": "asked 1, the kernel applies 0-1"}


def test_unavailable_controllers_are_reported_only_when_asked_for() -> None:
    from planemesh.agent.cpu_groups import CpuGroups

    groups = CpuGroups(None, {}, {"cpu": "no cpu", "cpuset": "no cpuset", "memory": "no memory"})
    groups.set_plane("oam", 100, 1, None, 0)
    assert set(groups.not_applied["oam"]) == {"cpu_weight"}  # a weight is always asked for
    groups.set_plane("oam", 100, 1, "1", 256)
    assert set(groups.not_applied["oam"]) == {"cpu_weight", "cpuset", "memory"}


@pytest.mark.parametrize(
    ("cpus", "reason"),
    [("0-a", "not a CPU number or range"), ("4000", "not online on this node"), ("", "empty cpu list"), (True, "")],
)
def test_static_config_refuses_a_bad_cpuset_naming_the_field(cpus: object, reason: str) -> None:
    import yaml

    from planemesh.model.config import ConfigError
    from planemesh.model.static_config import default_config_text, snapshot_from_dict

    raw = yaml.safe_load(default_config_text())
    raw["planes"][1]["sla"] = {"cpus": cpus}
    with pytest.raises(ConfigError, match=r"planes\[1\]\.sla\.cpus") as err:
        snapshot_from_dict(raw)
    assert reason in str(err.value)


def test_static_config_takes_a_cpuset_and_memory_cap() -> None:
    import yaml

    from planemesh.model.static_config import default_config_text, snapshot_from_dict

    raw = yaml.safe_load(default_config_text())
    raw["planes"][0]["sla"] = {"cpus": 0, "memory_max_mb": 128}  # YAML reads `cpus: 0` as a number
    sla = snapshot_from_dict(raw).planes[0].sla
    assert sla.cpus == "0" and sla.memory_max_mb == 128


def test_join_argv_writes_the_pid_that_then_execs(tmp_path: Path) -> None:
    """The shell writes its own pid, which the program keeps across exec; a file it cannot write is skipped."""
    files = [tmp_path / "cpu.procs", tmp_path / "missing-dir" / "cgroup.procs", tmp_path / "memory.procs"]
    program = [sys.executable, "-c", "import os, sys; print(os.getpid(), sys.argv[1:])", "a b", "--"]
    done = subprocess.run(join_argv([str(f) for f in files], program), capture_output=True, text=True, check=True)
    pid = done.stdout.split()[0]
    assert files[0].read_text().strip() == pid and files[2].read_text().strip() == pid
    assert done.stdout.strip() == f"{pid} ['a b', '--']"  # arguments pass through untouched
    assert join_argv([], program) == program
