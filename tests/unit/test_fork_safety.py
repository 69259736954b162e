"""What a proxy module draws at random when it is imported is drawn again in a forked child: workers forked from
the zygote (agent/zygote.py) share the zygote's imported modules, and must not share request ids or dice."""

from __future__ import annotations

import os
from collections.abc import Callable

from planemesh.agent.proxy import retry
from planemesh.agent.proxy.request_head import new_request_id


def _in_child(draw: Callable[[], str]) -> str:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, draw().encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        out = os.read(read, 1024).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    return out


def test_forked_children_hand_out_request_ids_of_their_own() -> None:
    ids = {_in_child(lambda: new_request_id().decode()) for _ in range(3)} | {new_request_id().decode()}
    assert len({rid[:24] for rid in ids}) == 4, ids  # old code: one per-process part shared by every child


def test_forked_children_roll_their_own_dice() -> None:
    rolls = {_in_child(lambda: repr([retry.rng.random() for _ in range(4)])) for _ in range(3)}
    assert len(rolls) == 3, rolls
