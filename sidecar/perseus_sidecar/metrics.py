"""Prometheus metrics. Each app owns its registry (tests build many apps). Hot-path counters are
updated in place; GPU and rank state is read at scrape time by a collector."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["LATENCY_BUCKETS_S", "Metrics"]

_LATENCY_BUCKETS_US = (25, 50, 75, 100, 150, 200, 300, 400, 500, 750, 1000, 1500, 2000, 3000, 5000)
LATENCY_BUCKETS_S = (*(us * 1e-6 for us in _LATENCY_BUCKETS_US), 0.01, 0.05, 0.25, 1.0)


class _StateCollector(Collector):
    def __init__(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        return self._collect()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.events = Counter(
            "perseus_sidecar_events",
            "Instruction events accepted, by transport.",
            ["transport"],
            registry=self.registry,
        )
        self.events_tcp = self.events.labels(transport="tcp")
        self.events_http = self.events.labels(transport="http")
        self.event_latency = Histogram(
            "perseus_sidecar_event_apply_latency_seconds",
            "From the event's t_ns on the training host to its clock decision applied.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.event_processing = Histogram(
            "perseus_sidecar_event_processing_seconds",
            "From the sidecar taking an event batch (TCP: bytes read; HTTP: body parsed) to its "
            "clock decision applied: the part of the apply latency spent in the sidecar and the "
            "GPU driver.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.events_dropped = Counter(
            "perseus_sidecar_events_dropped",
            "Events dropped because they exceed the announced pipeline shape or a buffer "
            "bound, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "perseus_sidecar_connections_refused",
            "Connections closed at once because a connection cap was reached, by transport.",
            ["transport"],
            registry=self.registry,
        )
        self.connections_timed_out = Counter(
            "perseus_sidecar_connections_timed_out",
            "HTTP connections closed because request headers did not arrive in time.",
            registry=self.registry,
        )
        self.clock_changes = Counter(
            "perseus_sidecar_clock_changes",
            "SM clock lock calls made (only when the clock changes).",
            registry=self.registry,
        )
        self.clock_resets = Counter(
            "perseus_sidecar_clock_resets",
            "GPU clock resets, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.gpu_errors = Counter(
            "perseus_sidecar_gpu_errors",
            "GPU backend errors on the hot path, by error type.",
            ["error"],
            registry=self.registry,
        )
        self.iteration_seconds = Histogram(
            "perseus_sidecar_iteration_seconds",
            "Iteration time (iteration end to iteration end) of registered ranks.",
            buckets=(0.5, 1, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 60),
            registry=self.registry,
        )

    def add_state_collector(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self.registry.register(_StateCollector(collect))


def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)
