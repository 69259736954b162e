"""scripts/relayout.py: the session-4 module moves, and the rewrite of old module paths in a merged tree."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("relayout", ROOT / "scripts" / "relayout.py")
relayout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(relayout)

OLD = '''from planemesh.agent.config import Snapshot
from planemesh.agent.worker_channel import encode
import planemesh.agent.worker, planemesh.agent.workers
from planemesh.netplanes.model import SLA
mock.patch("planemesh.agent.workers.STALL_RESTART_S", 1)
from planemesh.agent import workers as workers_mod
    from planemesh.agent import daemon, worker, config as cfg
from planemesh.netplanes import discovery
# see agent/worker.py and agent/workers.py, not agent/worker_channel.py;
# ebpf/hostmode.py, netplanes/bandwidth.py
'''
NEW = '''from planemesh.model.config import Snapshot
from planemesh.agent.worker_channel import encode
import planemesh.agent.worker_process, planemesh.agent.worker_supervisor
from planemesh.model.planes import SLA
mock.patch("planemesh.agent.worker_supervisor.STALL_RESTART_S", 1)
from planemesh.agent import worker_supervisor as workers_mod
    from planemesh.agent import daemon, worker_process as worker
    from planemesh.model import config as cfg
from planemesh.netplanes import discovery
# see agent/worker_process.py and agent/worker_supervisor.py, not agent/worker_channel.py;
# ebpf/host_redirect.py, netplanes/htb_plan.py
'''


def test_rewrites_imports_patch_targets_and_paths() -> None:
    assert relayout.rewrite_text(OLD) == NEW


def test_idempotent() -> None:
    assert relayout.rewrite_text(NEW) == NEW


def test_every_move_is_done_in_this_tree() -> None:
    for old, new in relayout.MOVES.items():
        assert (ROOT / new).exists() and not (ROOT / old).exists(), (old, new)


LEAD_WRITES = {"README.md", "docs/not-done.md", "docs/threat-model.md"}  # rewritten by the lead's run of the script


def test_no_old_path_is_mentioned_in_this_tree() -> None:  # a merged branch that still does: run the script
    stale = []
    for path in relayout.files_under(ROOT):
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text(errors="replace")
        if rel not in LEAD_WRITES and relayout.rewrite_text(text) != text:
            stale.append(rel)
    assert not stale


def test_move_reports_a_file_at_both_paths(tmp_path: Path) -> None:
    (tmp_path / "agent").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "agent" / "config.py").write_text("x = 1\n")
    (tmp_path / "model" / "config.py").write_text("x = 2\n")
    notes = relayout.move_files(tmp_path, check=True)
    assert notes == ["BOTH agent/config.py and model/config.py exist: merge agent/config.py into model/config.py "
                     "by hand, then git rm agent/config.py"]
