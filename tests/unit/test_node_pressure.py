"""Priority between planes under node-wide overload (agent/node_pressure.py, node_overload.py): the kernel's
text parsed, readings classified with hysteresis, shed steps filling the lowest-priority plane first and never
reaching the top one; the worker's overload manager refusing that share evenly; the config section checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from planemesh.agent.node_overload import NodeSampler, NodeShedding, node_overload_from_dict
from planemesh.agent.node_pressure import (
    CpuTimes,
    Pressure,
    ShedController,
    Signal,
    Stall,
    Thresholds,
    classify,
    parse_meminfo,
    parse_psi,
    parse_stall,
    parse_stat,
    sheddable_tiers,
    stall_share,
    steal_share,
)
from planemesh.agent.proxy.overload import MIB, SHED_MEMORY, SHED_NODE, OverloadManager
from planemesh.model.config import ConfigError

PSI = "some avg10=61.50 avg60=20.00 avg300=5.00 total=123\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=4\n"
MEMINFO = "MemTotal:        4000000 kB\nMemFree:          100000 kB\nMemAvailable:     300000 kB\n"
STAT = "cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 50 0 25 400 5 0 2 18 0 0\nprocs_running 7\nprocs_blocked 0\n"


def test_the_kernels_text_is_parsed() -> None:
    assert parse_psi(PSI) == 61.5
    assert parse_psi(PSI, "full") == 1.0
    assert parse_meminfo(MEMINFO) == pytest.approx(0.075)
    assert parse_stat(STAT) == CpuTimes(total=1000, steal=35, running=7)
    assert steal_share(CpuTimes(1000, 35, 1), CpuTimes(1200, 95, 1)) == pytest.approx(0.3)
    assert steal_share(CpuTimes(1000, 35, 1), CpuTimes(1000, 35, 1)) is None
    assert parse_stall(PSI) == Stall(61.5, 123)
    assert stall_share(Stall(0, 1_000_000), Stall(0, 1_400_000), 0.5) == pytest.approx(80.0)
    assert stall_share(Stall(0, 1_000_000), Stall(0, 9_000_000), 0.5) == 100.0  # clamped (coarse clocks)
    assert stall_share(Stall(7, 5), Stall(9, 5), 0.0) == 9  # no time passed: the kernel's own average


@pytest.mark.parametrize("text", ["", "some avg60=1", "some avg10=x", "garbage"])
def test_malformed_psi_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_psi(text)


def test_malformed_meminfo_and_stat_are_value_errors() -> None:
    with pytest.raises(ValueError):
        parse_meminfo("MemTotal: 0 kB\nMemAvailable: 0 kB\n")
    with pytest.raises(ValueError):
        parse_stat("cpu 1 2 3\n")


T = Thresholds()


@pytest.mark.parametrize(
    ("pressure", "signal"),
    [
        (Pressure(cpu_some=60.0, memory_some=0.0, memory_available=0.5), Signal.OVER),
        (Pressure(cpu_some=40.0, memory_some=0.0, memory_available=0.5), Signal.HOLD),  # between the marks
        (Pressure(cpu_some=10.0, memory_some=0.0, memory_available=0.5), Signal.UNDER),
        (Pressure(cpu_some=10.0, memory_some=11.0, memory_available=0.5), Signal.OVER),  # memory stalls
        (Pressure(cpu_some=10.0, memory_some=0.0, memory_available=0.04), Signal.OVER),  # OOM killer near
        (Pressure(cpu_some=10.0, memory_some=0.0, memory_available=0.07), Signal.HOLD),
        # no cpu PSI: the run queue and steal decide
        (Pressure(runnable_per_cpu=3.0, memory_available=0.5), Signal.OVER),
        (Pressure(runnable_per_cpu=0.5, steal=0.4, memory_available=0.5), Signal.OVER),
        (Pressure(runnable_per_cpu=0.5, steal=0.05, memory_available=0.5), Signal.UNDER),
        # with cpu PSI the run queue is not looked at (PSI already counts the waiting tasks)
        (Pressure(cpu_some=10.0, runnable_per_cpu=9.0, memory_available=0.5), Signal.UNDER),
        (Pressure(), Signal.HOLD),  # nothing known: nothing changes
    ],
)
def test_readings_are_classified_with_hysteresis(pressure: Pressure, signal: Signal) -> None:
    assert classify(pressure, T) is signal


def test_the_lowest_priority_plane_sheds_first_and_the_top_one_never() -> None:
    priorities = {"oam": 1, "media": 2, "bulk": 5}
    ctl = ShedController()
    seen = [ctl.update(Signal.OVER, priorities) for _ in range(10)]
    assert [s["bulk"] for s in seen[:4]] == [0.25, 0.5, 0.75, 1.0]
    assert all(s["media"] == 0.0 for s in seen[:4])  # media waits until bulk sheds everything
    assert [s["media"] for s in seen[4:8]] == [0.25, 0.5, 0.75, 1.0]
    assert all(s["oam"] == 0.0 for s in seen)  # the highest priority keeps its figures
    assert seen[9] == {"oam": 0.0, "media": 1.0, "bulk": 1.0}  # capped: no hidden steps to unwind later
    assert ctl.update(Signal.HOLD, priorities) == seen[9]
    back = ctl.update(Signal.UNDER, priorities)
    assert back == {"oam": 0.0, "media": 0.75, "bulk": 1.0}  # calm again: the higher tier recovers first
    for _ in range(8):
        back = ctl.update(Signal.UNDER, priorities)
    assert back == {"oam": 0.0, "media": 0.0, "bulk": 0.0}


def test_equal_priorities_shed_alike_and_one_tier_alone_never_sheds() -> None:
    assert sheddable_tiers({"a": 3, "b": 3}) == []
    ctl = ShedController()
    assert ctl.update(Signal.OVER, {"a": 3, "b": 3}) == {"a": 0.0, "b": 0.0}
    two = {"oam": 1, "media": 2, "video": 2}
    assert ctl.update(Signal.OVER, two) == {"oam": 0.0, "media": 0.25, "video": 0.25}


def test_steps_are_clamped_when_planes_go_away() -> None:
    ctl = ShedController()
    for _ in range(8):
        ctl.update(Signal.OVER, {"oam": 1, "media": 2, "bulk": 5})
    assert ctl.fractions({"oam": 1, "media": 2}) == {"oam": 0.0, "media": 1.0}
    assert ctl.update(Signal.UNDER, {"oam": 1, "media": 2}) == {"oam": 0.0, "media": 0.75}


def test_the_worker_refuses_its_share_evenly_and_stops_keep_alive() -> None:
    om = OverloadManager(memory_max_mb=100, max_connections=1000)
    assert om.keep_alive and om.refuse() is None
    om.set_node_shed(0.25)
    assert not om.keep_alive and not om.shedding  # new connections still welcome: requests are what is shed
    answers = [om.refuse() for _ in range(100)]
    assert answers.count(SHED_NODE) == 25 and answers.count(None) == 75
    assert SHED_NODE not in answers[:3]  # spread out: the first refusal after 4 requests, not in a burst
    om.set_node_shed(1.0)
    assert all(om.refuse() == SHED_NODE for _ in range(10))
    om.update(90 * MIB, 5)  # its own memory: that reason comes first
    assert om.refuse() == SHED_MEMORY
    om.update(1 * MIB, 5)
    om.set_node_shed(0.0)
    assert om.keep_alive and om.refuse() is None
    om.set_node_shed(7)  # out of range from a confused sender: clamped
    assert om.node_shed == 1.0


def test_the_config_section_is_checked_naming_the_field() -> None:
    assert not node_overload_from_dict(None).enabled
    config = node_overload_from_dict({"interval_s": 0.2, "thresholds": {"cpu_some_high": 80, "cpu_some_low": 40}})
    assert config.enabled and config.interval_s == 0.2 and config.thresholds.cpu_some_high == 80.0
    bad = [
        ({"speed": 1}, "node_overload.speed"),
        ({"enabled": "yes"}, "node_overload.enabled"),
        ({"interval_s": 0}, "node_overload.interval_s"),
        ({"proc_root": "proc"}, "node_overload.proc_root"),
        ({"thresholds": {"cpu_high": 1}}, "node_overload.thresholds.cpu_high"),
        ({"thresholds": {"cpu_some_high": -1}}, "node_overload.thresholds.cpu_some_high"),
        ({"thresholds": {"cpu_some_high": 10}}, "node_overload.thresholds: cpu_some"),  # below the low mark
        ([], "node_overload"),
    ]
    for raw, where in bad:
        with pytest.raises(ConfigError) as err:
            node_overload_from_dict(raw)
        assert str(err.value).startswith(where), (raw, str(err.value))


def _proc(root: Path, cpu: str | None, memory: str = "some avg10=0.00 avg60=0 avg300=0 total=0\n") -> Path:
    (root / "pressure").mkdir(parents=True, exist_ok=True)
    if cpu is not None:
        (root / "pressure" / "cpu").write_text(cpu)
    (root / "pressure" / "memory").write_text(memory)
    (root / "meminfo").write_text("MemTotal: 1000 kB\nMemAvailable: 500 kB\n")
    (root / "stat").write_text(STAT)
    return root


def test_the_sampler_reads_psi_or_falls_back_to_the_run_queue(tmp_path: Path) -> None:
    with_psi = NodeSampler(str(_proc(tmp_path / "a", PSI))).read()
    assert with_psi.cpu_some == 61.5 and with_psi.memory_available == 0.5 and with_psi.runnable_per_cpu is None
    no_psi = NodeSampler(str(_proc(tmp_path / "b", None))).read()
    assert no_psi.cpu_some is None and no_psi.runnable_per_cpu is not None and no_psi.runnable_per_cpu > 0
    broken = NodeSampler(str(_proc(tmp_path / "c", "some garbage\n"))).read()  # malformed: as absent
    assert broken.cpu_some is None


def test_after_the_first_sample_psi_is_read_as_the_stall_since_the_last(tmp_path: Path) -> None:
    root = _proc(tmp_path, "some avg10=0.00 avg60=0 avg300=0 total=1000000\n")
    now = [100.0]
    sampler = NodeSampler(str(root), clock=lambda: now[0])
    assert sampler.read().cpu_some == 0.0  # first: avg10
    now[0] += 0.25
    (root / "pressure" / "cpu").write_text("some avg10=0.00 avg60=0 avg300=0 total=1200000\n")  # 0.2 s stalled
    assert sampler.read().cpu_some == pytest.approx(80.0)  # the kernel's avg10 still says 0: the node stalls now
    now[0] += 0.25
    assert sampler.read().cpu_some == 0.0  # total did not move: no stall since


def test_the_loop_step_sheds_from_the_files(tmp_path: Path) -> None:
    root = _proc(tmp_path, PSI)
    shedding = NodeShedding(node_overload_from_dict({"proc_root": str(root)}))
    priorities = {"oam": 1, "media": 2}
    assert shedding.step(priorities) == {"oam": 0.0, "media": 0.25}  # avg10 61.5
    assert shedding.step(priorities) == {"oam": 0.0, "media": 0.0}  # total did not move: calm


def test_node_shedding_reaches_prometheus_per_plane(tmp_path: Path) -> None:
    """The loop's level per plane (planemesh_node_shed_fraction) and the requests the workers refused for the
    node's sake (planemesh_node_shed_requests), apart from those their own memory shed."""
    from planemesh.agent.proxy.stats import PlaneStats
    from planemesh.agent.stats_report import StatsRegistry
    from planemesh.agent.worker_process import stats_report
    from tests.unit.test_ops_metrics import _scrape

    shedding = NodeShedding(node_overload_from_dict({"proc_root": str(_proc(tmp_path, PSI))}))
    shedding.step({"oam": 1, "media": 2})  # media 25%
    om = OverloadManager(memory_max_mb=100, max_connections=1000)
    om.set_node_shed(0.25)
    answers = [om.refuse() for _ in range(40)]
    assert om.node_refused == answers.count(SHED_NODE) == 10
    registry = StatsRegistry()
    for plane, refused in (("media", om.node_refused), ("oam", 0)):
        report = stats_report(plane, PlaneStats())
        report["overload"][0]["node_shed_requests"] = refused  # as the worker's control loop adds it
        registry.register(f"worker-{plane}", lambda report=report: report)
    registry.register("node_overload", shedding.report)
    samples = _scrape(registry)
    assert samples[("planemesh_node_shed_fraction", (("plane", "media"),))] == 0.25
    assert samples[("planemesh_node_shed_fraction", (("plane", "oam"),))] == 0.0
    assert samples[("planemesh_node_shed_requests_total", (("plane", "media"),))] == 10
    assert samples[("planemesh_node_shed_requests_total", (("plane", "oam"),))] == 0


def test_reconfigure_keeps_the_shed_level_and_reads_the_new_root(tmp_path: Path) -> None:
    busy = _proc(tmp_path / "busy", PSI)
    shedding = NodeShedding(node_overload_from_dict({"proc_root": str(busy)}))
    assert shedding.step({"oam": 1, "media": 2})["media"] == 0.25
    calm = _proc(tmp_path / "calm", "some avg10=30.00 avg60=0 avg300=0 total=5\n")  # between the default marks
    shedding.reconfigure(node_overload_from_dict({"proc_root": str(calm), "interval_s": 2}))
    assert shedding.config.interval_s == 2.0
    assert shedding.step({"oam": 1, "media": 2})["media"] == 0.25  # HOLD on the new files: the level stays
    lower = {"cpu_some_high": 20, "cpu_some_low": 10}
    shedding.reconfigure(node_overload_from_dict({"proc_root": str(calm), "thresholds": lower}))
    (calm / "pressure" / "cpu").write_text("some avg10=30.00 avg60=0 avg300=0 total=5000000\n")
    assert shedding.step({"oam": 1, "media": 2})["media"] == 0.5  # 30% is over the new high mark
