#!/usr/bin/env python3
"""Session-4 package re-layout (issue #12): the module moves and renames, and a rewrite of every mention.

    python3 scripts/relayout.py [--move] [--check] TREE...

The moves (MOVES below) were made with `git mv` on branch s4-layout. Branches written against the old
module paths are merged first; then this script, run on the merged tree, rewrites what they still say:
dotted module names (`from planemesh.agent.config import X`, `"planemesh.agent.worker"`, mock.patch
targets) and repository paths (`agent/config.py` in comments and docs). With --move it also `git mv`s a
file still at its old path (a branch that re-created it) when the new path is free, and reports a file
present at both paths (merge by hand). --check changes nothing and exits 1 when something would change.

Idempotent: no new name contains an old one, so a second run finds nothing to do. Afterwards run
`ruff check --select I --fix .` (a moved import may need re-sorting). tests/unit/test_relayout.py
checks that the tree mentions no old path.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

# old repository path -> new repository path (the package is planemesh.<folder>: package-dir in pyproject.toml)
MOVES: dict[str, str] = {
    # The shared configuration model: every layer imports it, none has to import the daemon's folder for it.
    "agent/config.py": "model/config.py",
    "agent/validation.py": "model/validation.py",
    "agent/static_config.py": "model/static_config.py",
    "agent/snapshot_json.py": "model/snapshot_json.py",
    "agent/tls_config.py": "model/tls_config.py",
    "agent/safe_regex.py": "model/safe_regex.py",
    "agent/plane_limits.py": "model/plane_limits.py",
    "agent/default-config.yaml": "model/default-config.yaml",
    "netplanes/model.py": "model/planes.py",
    # Twins renamed so that each name says its job.
    "agent/host_mode.py": "agent/host_attach.py",  # which cgroups host mode intercepts, kept attached
    "ebpf/hostmode.py": "ebpf/host_redirect.py",  # the connect()-redirect BPF programs and their maps
    "agent/worker.py": "agent/worker_process.py",  # the plane worker process itself (python -m ...)
    "agent/workers.py": "agent/worker_supervisor.py",  # the agent's side: spawn, configure, supervise
    "netplanes/bandwidth.py": "netplanes/htb_plan.py",  # the desired HTB tree and its diff (pure)
    "ebpf/bandwidth.py": "ebpf/egress_shaper.py",  # applies the plan + the pm_egress.c classifier
}

FOLDER_PACKAGE = {"agent": "planemesh.agent", "model": "planemesh.model", "netplanes": "planemesh.netplanes",
                  "ebpf": "planemesh.ebpf", "xds": "planemesh.xds", "labs": "planemesh.labs"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".cfg", ".ini", ".txt", ".service", ".env",
                 ".c", ".h", ".json", ""}
SKIP_DIRS = {".git", ".venv", "__pycache__", "planemesh.egg-info", ".pytest_cache", ".ruff_cache", "node_modules"}
SKIP_FILES = {"scripts/relayout.py", "tests/unit/test_relayout.py"}  # these name the old paths on purpose


def module_of(path: str) -> str | None:
    folder, _, rest = path.partition("/")
    if not rest.endswith(".py") or folder not in FOLDER_PACKAGE:
        return None
    return FOLDER_PACKAGE[folder] + "." + rest[:-3].replace("/", ".")


def rewrites() -> list[tuple[re.Pattern[str], str]]:
    out = []
    for old, new in MOVES.items():
        old_mod, new_mod = module_of(old), module_of(new)
        if old_mod and new_mod:  # planemesh.agent.worker, not planemesh.agent.worker_channel / .workers
            out.append((re.compile(rf"(?<![\w.]){re.escape(old_mod)}(?![\w])"), new_mod))
        # agent/worker.py as a path, not tests/agent/worker.py or agent/worker.pyc
        out.append((re.compile(rf"(?<![\w./-]){re.escape(old)}(?![\w])"), new))
    return out


FROM_PACKAGE = re.compile(r"^(?P<indent>[ \t]*)from (?P<pkg>planemesh(?:\.\w+)+) import (?P<names>[\w, \t]+?)[ \t]*$",
                          re.MULTILINE)


def _from_package(match: re.Match[str]) -> str:
    """`from planemesh.agent import workers as w, x` -> one line per package the names now live in."""
    moved = {module_of(o): module_of(n) for o, n in MOVES.items() if module_of(o)}
    indent, pkg = match["indent"], match["pkg"]
    lines: dict[str, list[str]] = {}
    for item in match["names"].split(","):
        name, _, alias = (part.strip() for part in item.strip().partition(" as "))
        if not name:
            continue
        new = moved.get(f"{pkg}.{name}")
        if new is None:
            lines.setdefault(pkg, []).append(f"{name} as {alias}" if alias else name)
            continue
        new_pkg, _, new_name = new.rpartition(".")
        alias = alias or name  # code keeps saying `workers.X`
        lines.setdefault(new_pkg, []).append(new_name if alias == new_name else f"{new_name} as {alias}")
    return "\n".join(f"{indent}from {p} import {', '.join(names)}" for p, names in lines.items())


def rewrite_text(text: str) -> str:
    text = FROM_PACKAGE.sub(_from_package, text)
    for pattern, new in rewrites():
        text = pattern.sub(new, text)
    return text


def files_under(tree: Path):
    for path in sorted(tree.rglob("*")):
        rel = path.relative_to(tree)
        if any(part in SKIP_DIRS for part in rel.parts) or not path.is_file() or path.is_symlink():
            continue
        if rel.as_posix() in SKIP_FILES or path.suffix not in TEXT_SUFFIXES:
            continue
        yield path


def move_files(tree: Path, check: bool) -> list[str]:
    notes = []
    for old, new in MOVES.items():
        src, dst = tree / old, tree / new
        if not src.exists():
            continue
        if dst.exists():
            notes.append(f"BOTH {old} and {new} exist: merge {old} into {new} by hand, then git rm {old}")
            continue
        notes.append(f"move {old} -> {new}")
        if not check:
            dst.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["git", "mv", old, new], cwd=tree, check=True)
    return notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs="+", type=Path)
    ap.add_argument("--move", action="store_true", help="git mv files still at an old path (run in a git tree)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything would change")
    args = ap.parse_args(argv)
    changed = 0
    for tree in args.trees:
        tree = tree.resolve()
        if args.move:
            for note in move_files(tree, args.check):
                print(note)
                changed += not note.startswith("BOTH")
        for path in files_under(tree):
            try:
                text = path.read_text()
            except (UnicodeDecodeError, OSError):
                continue  # binary (a fuzz corpus entry): nothing to rewrite
            new = rewrite_text(text)
            if new != text:
                changed += 1
                print(f"rewrite {path.relative_to(tree)}")
                if not args.check:
                    path.write_text(new)
    print(f"{changed} change(s){' needed' if args.check else ''}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
