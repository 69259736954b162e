"""Prometheus text exposition (format 0.0.4) for the admin's /metrics: the metric family classes, a registry
and the process collector the agent took from prometheus_client, whose package import alone (http.server,
email, urllib, wsgiref...) was ~3.6 MB of the agent's ~35 MB RSS (bench/footprint.py). Same class shapes
(CounterMetricFamily(name, help, labels=[...]).add_metric(values, n)), same bytes out:
tests/unit/test_metrics_text.py renders the same families with prometheus_client (a test dependency) and here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple, Protocol

CONTENT_TYPE_PLAIN_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"
CPU_HELP = "Total user and system CPU time spent in seconds."
START_HELP = "Start time of the process since unix epoch in seconds."


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float
    timestamp: float | None = None  # never set by the agent; read by prometheus_client's writer in the tests


class Metric:
    """One family: its name (a counter's without `_total`), help text, type and samples."""

    def __init__(self, name: str, documentation: str, typ: str, labels: Sequence[str] | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.type = typ
        self.samples: list[Sample] = []
        self._labelnames = tuple(labels or ())

    def _labels(self, values: Sequence[str]) -> dict[str, str]:
        return dict(zip(self._labelnames, values, strict=False))


class CounterMetricFamily(Metric):
    def __init__(self, name: str, documentation: str, value: float | None = None, labels: Sequence[str] | None = None):
        super().__init__(name.removesuffix("_total"), documentation, "counter", labels)
        if value is not None:
            self.add_metric([], value)

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append(Sample(self.name + "_total", self._labels(labels), value))


class GaugeMetricFamily(Metric):
    def __init__(self, name: str, documentation: str, value: float | None = None, labels: Sequence[str] | None = None):
        super().__init__(name, documentation, "gauge", labels)
        if value is not None:
            self.add_metric([], value)

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append(Sample(self.name, self._labels(labels), value))


class HistogramMetricFamily(Metric):
    def __init__(self, name: str, documentation: str, labels: Sequence[str] | None = None) -> None:
        super().__init__(name, documentation, "histogram", labels)

    def add_metric(self, labels: Sequence[str], buckets: Sequence[tuple[str, float]], sum_value: float | None) -> None:
        """`buckets`: (upper bound, cumulative count) pairs, sorted, "+Inf" last (it is the count)."""
        for bound, count in buckets:
            self.samples.append(Sample(self.name + "_bucket", {**self._labels(labels), "le": bound}, count))
        if float(buckets[0][0]) >= 0 and sum_value is not None:
            self.samples.append(Sample(self.name + "_count", self._labels(labels), buckets[-1][1]))
            self.samples.append(Sample(self.name + "_sum", self._labels(labels), sum_value))


class Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class CollectorRegistry:
    def __init__(self) -> None:
        self._collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        self._collectors.append(collector)

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


def float_text(d: float) -> str:
    """A value as Prometheus (Go) writes it: 1.0, 1e+06-style exponents past 6 digits, +Inf, NaN."""
    d = float(d)
    if math.isinf(d):
        return "+Inf" if d > 0 else "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _escape(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _sample_line(s: Sample) -> str:
    labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(s.labels.items()))
    return f"{s.name}{{{labels}}} {float_text(s.value)}\n" if labels else f"{s.name} {float_text(s.value)}\n"


def generate_latest(registry: CollectorRegistry) -> bytes:
    """Every family of every collector, in the text format."""
    out: list[str] = []
    for metric in registry.collect():
        name = metric.name + "_total" if metric.type == "counter" else metric.name
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {metric.type}\n")
        out.extend(_sample_line(s) for s in metric.samples)
    return "".join(out).encode()


class ProcessCollector:
    """process_* families of this process (prometheus_client's ProcessCollector, Linux /proc)."""

    def __init__(self, registry: CollectorRegistry | None = None, proc: str = "/proc/self") -> None:
        self._proc = proc
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._pagesize = os.sysconf("SC_PAGE_SIZE")
        self._btime = 0.0
        try:
            with open("/proc/stat", "rb") as f:
                self._btime = next((float(line.split()[1]) for line in f if line.startswith(b"btime ")), 0.0)
        except OSError:
            pass
        if registry is not None:
            registry.register(self)

    def collect(self) -> list[Metric]:
        if not self._btime:
            return []
        result: list[Metric] = []
        try:
            with open(f"{self._proc}/stat", "rb") as f:
                parts = f.read().split(b")")[-1].split()
            start = float(parts[19]) / self._ticks + self._btime
            cpu = (float(parts[11]) + float(parts[12])) / self._ticks
            rss = float(parts[21]) * self._pagesize
            result += [
                GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.", float(parts[20])),
                GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.", rss),
                GaugeMetricFamily("process_start_time_seconds", START_HELP, start),
                CounterMetricFamily("process_cpu_seconds_total", CPU_HELP, cpu),
            ]
        except OSError:
            pass
        try:
            with open(f"{self._proc}/limits", "rb") as f:
                max_fds = next(float(line.split()[3]) for line in f if line.startswith(b"Max open file"))
            open_fds = len(os.listdir(f"{self._proc}/fd"))
            result += [
                GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", open_fds),
                GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.", max_fds),
            ]
        except (OSError, StopIteration):
            pass
        return result
