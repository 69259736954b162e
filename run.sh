#!/usr/bin/env bash
# planemesh developer entry point. Every command first runs the idempotent set-up.
#   ./run.sh demo            build the default lab, run the agent on its embedded config, show traffic
#   ./run.sh test [ARGS]     the whole test suite (unit, bpf, netns tiers); ARGS go to pytest
#   ./run.sh bench [NAME]    benchmarks in bench/ (not tests)
#   ./run.sh setup           only the set-up
set -euo pipefail
cd "$(dirname "$0")"
cmd="${1:-demo}"; shift || true
bash scripts/setup.sh
case "$cmd" in
    setup) ;;
    demo)  exec .venv/bin/planemesh demo "$@" ;;
    test)
        .venv/bin/ruff check .
        exec .venv/bin/python -P -m pytest "$@" ;;
    bench) exec .venv/bin/python -P scripts/run_module.py bench "$@" ;;
    *) echo "usage: $0 demo|test|bench|setup" >&2; exit 2 ;;
esac
