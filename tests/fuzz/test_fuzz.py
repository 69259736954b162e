"""The fuzz targets in CI: every corpus input replayed (a regression test per past finding), then each target
fuzzed by atheris for a few seconds in a subprocess (libFuzzer ends its process). Longer runs:
`python -m bench fuzz --seconds N`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS
from tests.support.procs import dev_module_argv

pytestmark = pytest.mark.unit
CORPUS = Path(__file__).parent / "corpus"
REPO = Path(__file__).parents[2]
CI_SECONDS = 3  # per target: with start-up, 5 targets take about 25 s


def corpus_inputs() -> list[tuple[str, Path]]:
    return [(target, path) for target in TARGETS for path in sorted((CORPUS / target).iterdir())]


@pytest.mark.parametrize(("target", "path"), corpus_inputs(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_corpus_replays_cleanly(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())  # raises on a finding


def fuzz(target: str, seconds: int, work: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """atheris on `target` for `seconds`; new inputs go to `work`/new, findings to `work`/crash-*."""
    new = work / "new"
    new.mkdir(parents=True, exist_ok=True)
    cmd = [*dev_module_argv("tests.fuzz.run", target), f"-max_total_time={seconds}", "-timeout=10",
           "-rss_limit_mb=1024", f"-artifact_prefix={work}/", *extra, str(new), str(CORPUS / target)]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=seconds + 60)


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_target_briefly(target: str, tmp_path: Path) -> None:
    result = fuzz(target, CI_SECONDS, tmp_path)
    crashes = sorted(p.name for p in tmp_path.glob("crash-*")) + sorted(p.name for p in tmp_path.glob("timeout-*"))
    assert result.returncode == 0 and not crashes, f"{crashes}\n{result.stderr[-3000:]}"
    assert "Done " in result.stderr, result.stderr[-2000:]  # it really fuzzed: libFuzzer's summary line
