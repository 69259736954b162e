"""Longer fuzzing runs of the network-facing parsers and xDS translation (tests/fuzz/):

    python -m bench fuzz [--seconds N] [--target NAME ...] [--grow]

Each target runs under atheris for N seconds (default 300). New coverage-increasing inputs are kept in
/tmp/planemesh-fuzz/<target>/new (with --grow: added to the repository corpus, tests/fuzz/corpus/<target>/);
a finding leaves a crash-* reproducer in /tmp/planemesh-fuzz/<target>/ and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from tests.fuzz.targets import TARGETS
from tests.fuzz.test_fuzz import CORPUS, fuzz

WORK = Path("/tmp/planemesh-fuzz")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench fuzz")
    ap.add_argument("--seconds", type=int, default=300, help="per target")
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: all")
    ap.add_argument("--grow", action="store_true", help="merge new inputs into the repository corpus")
    args = ap.parse_args(argv)
    failed = []
    for target in args.target or list(TARGETS):
        work = WORK / target
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        result = fuzz(target, args.seconds, work, "-print_final_stats=1")
        lines = result.stderr.splitlines()
        progress = [ln.split(None, 2)[-1] for ln in lines if ln.startswith("#") and " cov: " in ln]
        runs = [ln.split()[-1] for ln in lines if ln.startswith("stat::number_of_executed_units")]
        crashes = sorted(work.glob("crash-*")) + sorted(work.glob("timeout-*")) + sorted(work.glob("oom-*"))
        print(f"{target}: {time.monotonic() - t0:.0f} s, exit {result.returncode}, {runs[-1] if runs else '?'} runs, "
              f"{progress[-1] if progress else 'no progress line'}; findings: {[str(c) for c in crashes] or 'none'}")
        if result.returncode != 0 or crashes:
            failed.append(target)
            print(result.stderr[-4000:], file=sys.stderr)
        if args.grow:  # libFuzzer's merge keeps only the inputs that add coverage
            fuzz(target, 60, work, "-merge=1", str(CORPUS / target), str(work / "new"))
            shutil.rmtree(work / "new", ignore_errors=True)
    sys.exit(1 if failed else 0)
