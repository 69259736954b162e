"""netplanes.routing's LocalDelivery spec: bad values are refused before anything touches netlink."""

from __future__ import annotations

import pytest

from planemesh.ebpf.abi import PM_MARK_LOCAL
from planemesh.netplanes.routing import DEFAULT_PRIORITY, DEFAULT_TABLE, LocalDelivery


def test_defaults_match_the_abi_mark() -> None:
    spec = LocalDelivery()
    assert (spec.mark, spec.mask, spec.table, spec.priority) == (PM_MARK_LOCAL, PM_MARK_LOCAL, DEFAULT_TABLE,
                                                                 DEFAULT_PRIORITY)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mark": 0},
        {"mark": 0x3, "mask": 0x1},
        {"table": 254},
        {"table": 0},
        {"priority": 0},
        {"priority": 32766},
        {"families": (99,)},
    ],
)
def test_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LocalDelivery(**kwargs)
