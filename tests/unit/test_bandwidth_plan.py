"""netplanes.htb_plan: the HTB tree planned from planes' SLAs, and the diff against what an interface has."""

from __future__ import annotations

import dataclasses

import pytest

from planemesh.ebpf import abi
from planemesh.model.config import ConfigError
from planemesh.model.planes import SLA, Plane
from planemesh.netplanes.htb_plan import (
    DEFAULT_CLASSID,
    QDISC_HANDLE,
    ROOT_CLASSID,
    HtbClass,
    ObservedEgress,
    OpKind,
    diff,
    egress_plan,
    mbit_to_bytes,
)


def plane(name: str, plane_id: int, mbit: float | None = None, prio: int = 3) -> Plane:
    return Plane(name, plane_id, (f"{name}*",), (), sla=SLA(bandwidth_mbit=mbit, priority=prio))


def summary(planes: list[Plane], link: float = 1000) -> dict[int, tuple[int, int, int, int]]:
    """classid -> (parent, rate Mbit, ceil Mbit, prio)."""
    return {
        c.classid: (c.parent, round(c.rate * 8 / 1e6, 3), round(c.ceil * 8 / 1e6, 3), c.prio)
        for c in egress_plan(planes, link).classes
    }


P1, P2, P5 = abi.plane_classid(1), abi.plane_classid(2), abi.plane_classid(5)


@pytest.mark.parametrize(
    ("planes", "link", "expected"),
    [
        pytest.param(
            [],
            1000,
            {ROOT_CLASSID: (QDISC_HANDLE, 1000, 1000, 3), DEFAULT_CLASSID: (ROOT_CLASSID, 1, 1000, 3)},
            id="no planes: root and default only",
        ),
        pytest.param(
            [plane("oam", 1, 40, 1), plane("media", 2, 10, 4)],
            1000,
            {
                ROOT_CLASSID: (QDISC_HANDLE, 1000, 1000, 3),
                P1: (ROOT_CLASSID, 40, 40, 1),
                P2: (ROOT_CLASSID, 10, 10, 4),
                DEFAULT_CLASSID: (ROOT_CLASSID, 1, 1000, 3),
            },
            id="bandwidth is a hard cap: rate = ceil",
        ),
        pytest.param(
            [plane("sig", 5, None, 0)],
            10_000,
            {
                ROOT_CLASSID: (QDISC_HANDLE, 10_000, 10_000, 3),
                P5: (ROOT_CLASSID, 1, 10_000, 0),
                DEFAULT_CLASSID: (ROOT_CLASSID, 1, 10_000, 3),
            },
            id="no bandwidth: floor rate, borrows up to the link",
        ),
        pytest.param(
            [plane("oam", 1, 0.5, 7)],
            100,
            {
                ROOT_CLASSID: (QDISC_HANDLE, 100, 100, 3),
                P1: (ROOT_CLASSID, 0.5, 0.5, 7),
                DEFAULT_CLASSID: (ROOT_CLASSID, 1, 100, 3),
            },
            id="below the floor is allowed",
        ),
    ],
)
def test_plan(planes: list[Plane], link: float, expected: dict) -> None:
    assert summary(planes, link) == expected


def test_plan_orders_root_first_then_leaves_by_id() -> None:
    classes = egress_plan([plane("b", 9, 5), plane("a", 2, 5)], 100).classes
    assert [c.classid for c in classes] == [ROOT_CLASSID, abi.plane_classid(2), abi.plane_classid(9), DEFAULT_CLASSID]
    assert [c.plane_id for c in classes] == [None, 2, 9, None]


@pytest.mark.parametrize(
    ("planes", "link", "field"),
    [
        ([plane("oam", 1, 2000)], 1000, "planes.oam.sla.bandwidth_mbit"),
        ([plane("oam", 1, 0)], 1000, "planes.oam.sla.bandwidth_mbit"),
        ([plane("oam", 1, -3)], 1000, "planes.oam.sla.bandwidth_mbit"),
        ([plane("oam", 1, 10, 8)], 1000, "planes.oam.sla.priority"),
        ([plane("oam", 1, 10, -1)], 1000, "planes.oam.sla.priority"),
        ([plane("oam", 1), plane("media", 1)], 1000, "planes.media.plane_id"),
        ([plane("oam", 64)], 1000, "planes.oam.plane_id"),
        ([], 0, "link_mbit"),
        ([], float("nan"), "link_mbit"),
    ],
)
def test_bad_input_is_a_config_error_naming_the_field(planes: list[Plane], link: float, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        egress_plan(planes, link)
    assert err.value.path == field


def test_quantum_and_burst_stay_in_htb_range() -> None:
    for cls in egress_plan([plane("a", 1, 0.01), plane("b", 2, 9000)], 10_000).classes:
        assert 1600 <= cls.quantum <= 200_000
        assert cls.burst >= 65536 and cls.cburst >= cls.burst


def observed_from(planes: list[Plane], link: float = 1000) -> ObservedEgress:
    plan = egress_plan(planes, link)
    # The kernel reports no plane ids: observed classes carry None there.
    classes = {c.classid: dataclasses.replace(c, plane_id=None) for c in plan.classes}
    return ObservedEgress("htb", QDISC_HANDLE, 0xFFFF, classes)


def kinds(ops) -> list[tuple[str, int | None]]:  # type: ignore[no-untyped-def]
    return [(o.kind.value, o.cls.classid if o.cls else None) for o in ops]


@pytest.mark.parametrize(
    ("observed", "planes", "link", "expected"),
    [
        pytest.param(
            ObservedEgress("noqueue", 0),
            [plane("oam", 1, 40)],
            1000,
            [("qdisc", None), ("add", ROOT_CLASSID), ("add", P1), ("add", DEFAULT_CLASSID)],
            id="fresh interface: our qdisc, then parents before leaves",
        ),
        pytest.param(
            ObservedEgress("htb", 0x10000, 0x10),
            [plane("oam", 1, 40)],
            1000,
            [("qdisc", None), ("add", ROOT_CLASSID), ("add", P1), ("add", DEFAULT_CLASSID)],
            id="someone else's HTB is replaced, not edited",
        ),
        pytest.param(observed_from([plane("oam", 1, 40)]), [plane("oam", 1, 40)], 1000, [], id="unchanged: nothing"),
        pytest.param(
            observed_from([plane("oam", 1, 40)]),
            [plane("oam", 1, 20)],
            1000,
            [("change", P1)],
            id="rate change: one change",
        ),
        pytest.param(
            observed_from([plane("oam", 1, 40, 1)]), [plane("oam", 1, 40, 2)], 1000, [("change", P1)], id="prio change"
        ),
        pytest.param(
            observed_from([plane("oam", 1, 40)]),
            [plane("oam", 1, 40), plane("media", 2, 10)],
            1000,
            [("add", P2)],
            id="new plane: one add",
        ),
        pytest.param(
            observed_from([plane("oam", 1, 40), plane("media", 2, 10)]),
            [plane("media", 2, 10)],
            1000,
            [("delete", P1)],
            id="plane gone: one delete",
        ),
        pytest.param(
            observed_from([plane("oam", 1, 40)], link=1000),
            [plane("oam", 1, 40)],
            2000,
            [("change", ROOT_CLASSID), ("change", DEFAULT_CLASSID)],
            id="link rate change: root and default follow",
        ),
        pytest.param(
            dataclasses.replace(observed_from([plane("oam", 1, 40)]), default_minor=0x10),
            [plane("oam", 1, 40)],
            1000,
            [("default", None)],
            id="default class id drifted",
        ),
    ],
)
def test_diff(observed: ObservedEgress, planes: list[Plane], link: float, expected: list) -> None:
    assert kinds(diff(egress_plan(planes, link), observed)) == expected


def test_diff_ignores_kernel_rounding() -> None:
    observed = observed_from([plane("oam", 1, 40)])
    rounded = {k: dataclasses.replace(c, rate=c.rate + 3, ceil=c.ceil - 3) for k, c in observed.classes.items()}
    assert diff(egress_plan([plane("oam", 1, 40)], 1000), dataclasses.replace(observed, classes=rounded)) == []


def test_stray_classes_are_deleted_after_the_adds() -> None:
    stray_root = HtbClass(ROOT_CLASSID, QDISC_HANDLE, mbit_to_bytes(1), mbit_to_bytes(1))
    stray_leaf = HtbClass(abi.htb_classid(0x42), ROOT_CLASSID, mbit_to_bytes(1), mbit_to_bytes(1))
    observed = ObservedEgress("htb", QDISC_HANDLE, 0xFFFF, {ROOT_CLASSID: stray_root, stray_leaf.classid: stray_leaf})
    ops = diff(egress_plan([], 1), observed)
    assert [o.kind for o in ops if o.kind is OpKind.DELETE] == [OpKind.DELETE]
    assert ops[-1].cls == stray_leaf
