"""The node's state as Prometheus gauges, read at scrape time (`Metrics.add_state_collector`)."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from perseus_sidecar.clocks import ClockController
from perseus_sidecar.gpu.base import GpuBackend, GpuError
from perseus_sidecar.ranks import Rank

__all__ = ["state_metrics"]


def state_metrics(
    backend: GpuBackend,
    gpu_uuids: Iterable[str],
    clocks: ClockController,
    ranks: Collection[Rank],
    *,
    tenant_labels: bool,
) -> Iterator[Metric]:
    """The GPUs' clocks, energy and power, the clocks this sidecar locked and which ranks follow a
    schedule; with `tenant_labels`, per job and rank too."""
    clock = GaugeMetricFamily(
        "perseus_sidecar_gpu_sm_clock_mhz", "Current SM clock of each GPU.", labels=["gpu"]
    )
    locked = GaugeMetricFamily(
        "perseus_sidecar_gpu_locked_sm_clock_mhz",
        "SM clock this sidecar locked (0 when it holds no lock).",
        labels=["gpu"],
    )
    energy = GaugeMetricFamily(
        "perseus_sidecar_gpu_energy_joules", "Total energy counter of each GPU.", labels=["gpu"]
    )
    power = GaugeMetricFamily(
        "perseus_sidecar_gpu_power_watts", "Power draw of each GPU.", labels=["gpu"]
    )
    for uuid in gpu_uuids:
        with contextlib.suppress(GpuError):
            clock.add_metric([uuid], backend.current_sm_clock_mhz(uuid))
            energy.add_metric([uuid], backend.total_energy_mj(uuid) / 1000.0)
            power.add_metric([uuid], backend.power_w(uuid))
        locked.add_metric([uuid], clocks.applied_mhz(uuid) or 0)
    controlled = GaugeMetricFamily(
        "perseus_sidecar_gpu_schedule_active",
        "1 while the rank on the GPU follows a schedule or a profiling session.",
        labels=["gpu"],
    )
    for rank in ranks:
        controlled.add_metric([rank.gpu_uuid], 1.0 if rank.controlled else 0.0)
    yield from (clock, locked, energy, power, controlled)
    if tenant_labels:  # GET /metrics has no auth: tenants' names are opt-in
        active = GaugeMetricFamily(
            "perseus_sidecar_schedule_active",
            "1 while a rank's clock follows a schedule or a profiling session.",
            labels=["namespace", "job", "rank"],
        )
        for rank in ranks:
            active.add_metric(
                [rank.job_key[0], rank.job_key[1], str(rank.rank)],
                1.0 if rank.controlled else 0.0,
            )
        yield active
