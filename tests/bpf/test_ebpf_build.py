"""Programs built in the helper process (ebpf/build.py): fds handed over, pins re-used by content hash,
rebuilt when the hash or the pinned maps change, and a pinned map of another layout refused."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from planemesh.ebpf import build, libbpf
from planemesh.ebpf.abi import Action
from planemesh.ebpf.egress_shaper import SPEC as EGRESS
from planemesh.ebpf.loader import Datapath, DatapathError
from planemesh.ebpf.policy import PolicyRule, SourceRule
from tests.bpf.conftest import compile_here

pytestmark = pytest.mark.bpf


@pytest.fixture
def pin_dir(run_prefix: str) -> Iterator[str]:
    path = f"/sys/fs/bpf/{run_prefix}-build"
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    finally:
        for name in os.listdir(path) if os.path.isdir(path) else []:
            os.unlink(os.path.join(path, name))
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _load_id(spec: build.ProgramSpec, pin_dir: str) -> tuple[bool, int]:
    loaded = build.load(spec, pin_dir)
    try:
        return loaded.compiled, libbpf.prog_id(loaded.programs["pm_tc_egress"])
    finally:
        loaded.close()


def _pins(pin_dir: str) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(f"{pin_dir}/prog_pm_tc_egress_*"))


def test_same_hash_reuses_the_pinned_program_changed_source_or_flags_rebuild(pin_dir: str, tmp_path: Path) -> None:
    compiled, first = _load_id(EGRESS, pin_dir)
    assert compiled and _pins(pin_dir) == [f"prog_pm_tc_egress_{EGRESS.digest()}"]
    assert _load_id(EGRESS, pin_dir) == (False, first)  # the very program, nothing compiled

    flagged = replace(EGRESS, cflags=(*EGRESS.cflags, "-DPM_BUILD_TEST=1"))
    compiled, second = _load_id(flagged, pin_dir)
    assert compiled and second != first
    assert _pins(pin_dir) == [f"prog_pm_tc_egress_{flagged.digest()}"]  # the stale hash is unpinned

    shutil.copy(EGRESS.source, tmp_path / EGRESS.source.name)
    edited = replace(flagged, source=tmp_path / EGRESS.source.name)
    edited.source.write_text(edited.source.read_text() + "\n/* a changed source */\n")
    compiled, third = _load_id(edited, pin_dir)
    assert compiled and third not in (first, second)
    assert _load_id(edited, pin_dir) == (False, third)


def test_program_pinned_with_maps_since_replaced_is_rebuilt(pin_dir: str) -> None:
    dp = Datapath(pin_dir)
    dp.set_interface(3, 1)
    dp.close(detach=False)
    # Somebody replaced the pinned pm_config by another map of the same layout: the pinned program
    # still uses the old one, so re-using it would split the state. It is rebuilt on the pinned maps.
    other = compile_here(replace(EGRESS, source=Path(__file__).with_name("pm_config_twin.c"), cflags=()))
    try:
        os.unlink(f"{pin_dir}/pm_config")
        twin = other[b"pm_config"]
        libbpf.obj_pin(twin.map_fd, f"{pin_dir}/pm_config")
        twin_id = libbpf.map_info(twin.map_fd)[1]
    finally:
        other.cleanup()
    dp = Datapath(pin_dir)
    try:
        assert dp.compiled
        assert twin_id in libbpf.prog_map_ids(dp.prog_fd)
        assert dp.interfaces() == {3: (1, 0)}  # the other pinned maps were re-adopted
    finally:
        dp.close(detach=True)


def test_pins_of_an_agent_without_the_source_policy_map_are_upgraded(pin_dir: str) -> None:
    """An agent of the previous session pinned no pm_src_policy: the next one re-adopts the other pinned maps
    and creates (and pins) the new map, rather than refusing or losing state."""
    dp = Datapath(pin_dir)
    dp.set_interface(3, 1)
    dp.close(detach=False)
    os.unlink(f"{pin_dir}/pm_src_policy")  # what the older agent left: every map but this one
    dp = Datapath(pin_dir)
    try:
        assert os.path.exists(f"{pin_dir}/pm_src_policy") and dp.interfaces() == {3: (1, 0)}
        rule = {SourceRule("198.18.0.2", PolicyRule(1, 80)): Action.PROXY}
        dp.sync_source_policy(rule)
        assert dp.source_policy() == rule
    finally:
        dp.close(detach=True)


def test_pinned_map_of_another_layout_is_refused(pin_dir: str) -> None:
    other = compile_here(replace(EGRESS, source=Path(__file__).with_name("pm_config_twin.c"), cflags=("-DWRONG",)))
    try:
        libbpf.obj_pin(other[b"pm_config"].map_fd, f"{pin_dir}/pm_config")
    finally:
        other.cleanup()
    with pytest.raises(DatapathError, match=r"pm_config|pm_tc\.c"):
        Datapath(pin_dir)
