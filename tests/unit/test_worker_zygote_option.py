"""Workers are exec'd by default (the least RSS, docs/benchmarks.md "Lean 3"); --worker-zygote or
PLANEMESH_WORKER_ZYGOTE=1 forks them from the zygote; --no-worker-zygote (or its variable) wins over both."""

from __future__ import annotations

import pytest

from planemesh.agent.agent_options import options_from_args
from planemesh.agent.cli import build_parser


@pytest.mark.parametrize(
    ("env", "flags", "zygote"),
    [
        ({}, [], False),
        ({}, ["--worker-zygote"], True),
        ({"PLANEMESH_WORKER_ZYGOTE": "1"}, [], True),
        ({"PLANEMESH_WORKER_ZYGOTE": "1"}, ["--no-worker-zygote"], False),
        ({}, ["--worker-zygote", "--no-worker-zygote"], False),
        ({"PLANEMESH_NO_WORKER_ZYGOTE": "1"}, ["--worker-zygote"], False),
    ],
)
def test_exec_by_default_and_no_zygote_wins(monkeypatch, env: dict[str, str], flags: list[str], zygote: bool) -> None:
    for name in ("PLANEMESH_WORKER_ZYGOTE", "PLANEMESH_NO_WORKER_ZYGOTE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = build_parser(argv=["agent"]).parse_args(["agent", *flags])
    assert options_from_args(args).worker_zygote is zygote
