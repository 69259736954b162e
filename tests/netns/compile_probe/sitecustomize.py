"""Test probe (tests/netns/test_agent_footprint.py): on PYTHONPATH, records every source file this process compiles
(the `compile` audit event importlib raises when it has no usable .pyc) in $PLANEMESH_COMPILE_LOG.<pid>."""

import os
import sys

_log = os.environ.get("PLANEMESH_COMPILE_LOG")


def _hook(event: str, args: tuple) -> None:
    if event == "compile" and len(args) > 1 and str(args[1]).endswith(".py"):
        with open(f"{_log}.{os.getpid()}", "a") as f:
            f.write(f"{args[1]}\n")


if _log:
    sys.addaudithook(_hook)
