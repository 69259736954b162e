"""ebpf/build.py's content hash: what makes a pinned program re-usable (pure: no BPF)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from planemesh.ebpf import build
from planemesh.ebpf.egress_shaper import SPEC as EGRESS
from planemesh.ebpf.loader import program_spec


def _copy(tmp_path: Path) -> build.ProgramSpec:
    for path in [EGRESS.source, *EGRESS.source.parent.glob("*.h")]:
        shutil.copy(path, tmp_path / path.name)
    return replace(EGRESS, source=tmp_path / EGRESS.source.name)


def test_same_content_same_hash(tmp_path: Path) -> None:
    assert _copy(tmp_path).digest() == EGRESS.digest()
    assert program_spec("/sys/fs/bpf/a").digest() == program_spec("/sys/fs/bpf/a").digest()


def test_source_header_flags_and_kernel_each_change_the_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _copy(tmp_path)
    seen = {spec.digest()}
    spec.source.write_text(spec.source.read_text() + "\n/* changed */\n")
    seen.add(spec.digest())
    header = tmp_path / "pm_abi.h"
    header.write_text(header.read_text() + "\n/* changed */\n")
    seen.add(spec.digest())
    seen.add(replace(spec, cflags=(*spec.cflags, "-DPM_EXTRA=1")).digest())
    assert program_spec("/sys/fs/bpf/a").digest() != program_spec("/sys/fs/bpf/b").digest()  # the pin dir is a flag
    monkeypatch.setattr(build, "kernel_release", lambda: "0.0.0-another-kernel")
    seen.add(spec.digest())
    assert len(seen) == 5


def test_spec_round_trips_to_the_helper() -> None:
    spec = program_spec("/sys/fs/bpf/x")
    assert build.ProgramSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    "reply, fds, rc",
    [(b"", [], 1), (b"not json", [], 0), (b'{"error": "boom"}', [], 1), (b'{"programs": ["p"], "maps": []}', [], 0)],
)
def test_a_failed_or_malformed_helper_reply_is_a_clear_error(reply: bytes, fds: list[int], rc: int) -> None:
    with pytest.raises(build.BuildError, match=r"cannot load pm_egress\.c"):
        build._decode_reply(EGRESS, reply, fds, rc, "some compiler error\n")
