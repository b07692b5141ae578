"""`perseus-sidecar doctor`: a read-only check of this node's GPUs through NVML.

It lists each GPU (name, UUID, whether the sidecar may lock it and why not), its supported SM
clocks, current clocks and power, and measures how often NVML's total-energy counter really
updates, which bounds how finely the sidecar can attribute energy to one instruction. It only
queries: it never locks, resets or sets anything, so it is safe on a node running jobs.

Its imports are the standard library and the NVML backend alone, so it runs wherever
`nvidia-ml-py` does (`python -m perseus_sidecar.doctor` needs neither pydantic nor uvicorn).
Exit codes: 0 every GPU is usable, 1 a GPU is unusable or none is visible, 2 the check could not
run (no driver, no NVML bindings, bad flag)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Any, TypeVar

from perseus_sidecar.gpu.base import GpuError, GpuInfo

if TYPE_CHECKING:
    from perseus_sidecar.gpu.nvml import NvmlBackend

__all__ = [
    "CounterPeriod",
    "GpuReport",
    "NodeReport",
    "Spread",
    "clock_steps_mhz",
    "format_text",
    "inspect_node",
    "main",
    "measure_counter_period",
    "to_json",
]

PROG = "perseus-sidecar doctor"
DEFAULT_ENERGY_S = 2.5
TIME_SLICED_ENV = "PERSEUS_SIDECAR_TIME_SLICED"
# The spellings pydantic accepts for the sidecar's own boolean setting.
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no", ""})

T = TypeVar("T")


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values))


@dataclass(frozen=True)
class CounterPeriod:
    """How the total-energy counter moved while read in a tight loop. `interval_ms` is the time
    between consecutive changes (needs two changes), `increment_mj` the size of each change;
    `read_us` is the mean time of one read, loop included."""

    duration_s: float
    reads: int
    updates: int
    interval_ms: Spread | None
    increment_mj: Spread | None
    read_us: float
    counter_power_w: float | None


def measure_counter_period(
    read_mj: Callable[[], int], duration_s: float, now_s: Callable[[], float]
) -> CounterPeriod:
    """Poll `read_mj` for `duration_s` and time the changes of its value. A change is dated by
    the first read that sees it, so the timing error is one read's latency (microseconds)."""
    start_s = now_s()
    last_mj = read_mj()
    reads = 1
    change_s: list[float] = []
    increments_mj: list[int] = []
    while True:
        value_mj = read_mj()
        t_s = now_s()
        reads += 1
        if value_mj != last_mj:
            change_s.append(t_s)
            increments_mj.append(value_mj - last_mj)
            last_mj = value_mj
        if t_s - start_s >= duration_s:
            break
    elapsed_s = t_s - start_s
    intervals_ms = [(b - a) * 1000.0 for a, b in pairwise(change_s)]
    power_w = None
    if len(change_s) >= 2 and change_s[-1] > change_s[0]:
        # Energy of the updates after the first, over the time they span.
        power_w = sum(increments_mj[1:]) / 1000.0 / (change_s[-1] - change_s[0])
    return CounterPeriod(
        duration_s=elapsed_s,
        reads=reads,
        updates=len(change_s),
        interval_ms=Spread.of(intervals_ms),
        increment_mj=Spread.of(increments_mj),
        read_us=elapsed_s / reads * 1e6,
        counter_power_w=power_w,
    )


def clock_steps_mhz(clocks_mhz: Sequence[int]) -> dict[int, int]:
    """How often each gap between neighbouring supported clocks occurs, most frequent first."""
    ordered = sorted(set(clocks_mhz))
    gaps = Counter(b - a for a, b in pairwise(ordered))
    return dict(sorted(gaps.items(), key=lambda item: (-item[1], item[0])))


@dataclass
class GpuReport:
    index: int
    uuid: str
    name: str
    usable: bool
    reason: str
    mig_enabled: bool | None = None
    sm_clocks_mhz: tuple[int, ...] | None = None
    memory_clocks_mhz: tuple[int, ...] | None = None
    max_rated_sm_clock_mhz: int | None = None
    current_sm_clock_mhz: int | None = None
    current_memory_clock_mhz: int | None = None
    clock_event_reasons: tuple[str, ...] | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    energy_counter: CounterPeriod | None = None
    errors: dict[str, str] = field(default_factory=dict)
    """Readings that failed, by field name, with NVML's message (e.g. not supported)."""


@dataclass(frozen=True)
class NodeReport:
    driver_version: str | None
    gpus: list[GpuReport]
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def all_usable(self) -> bool:
        return bool(self.gpus) and all(g.usable for g in self.gpus)


def _inspect_gpu(
    backend: NvmlBackend, gpu: GpuInfo, energy_s: float, now_s: Callable[[], float]
) -> GpuReport:
    uuid = gpu.uuid
    report = GpuReport(gpu.index, uuid, gpu.name, gpu.usable, gpu.reason)
    e = report.errors
    report.mig_enabled = _read(e, "mig_enabled", lambda: backend.mig_enabled(uuid))
    report.sm_clocks_mhz = _read(e, "sm_clocks_mhz", lambda: backend.supported_sm_clocks_mhz(uuid))
    report.memory_clocks_mhz = _read(
        e, "memory_clocks_mhz", lambda: backend.supported_memory_clocks_mhz(uuid)
    )
    report.max_rated_sm_clock_mhz = _read(
        e, "max_rated_sm_clock_mhz", lambda: backend.max_rated_sm_clock_mhz(uuid)
    )
    report.current_sm_clock_mhz = _read(
        e, "current_sm_clock_mhz", lambda: backend.current_sm_clock_mhz(uuid)
    )
    report.current_memory_clock_mhz = _read(
        e, "current_memory_clock_mhz", lambda: backend.current_memory_clock_mhz(uuid)
    )
    report.clock_event_reasons = _read(
        e, "clock_event_reasons", lambda: backend.clock_event_reasons(uuid)
    )
    report.power_w = _read(e, "power_w", lambda: backend.power_w(uuid))
    report.power_limit_w = _read(e, "power_limit_w", lambda: backend.power_limit_w(uuid))
    if energy_s > 0:
        report.energy_counter = _read(
            e,
            "energy_counter",
            lambda: measure_counter_period(lambda: backend.total_energy_mj(uuid), energy_s, now_s),
        )
    return report


def _read(errors: dict[str, str], name: str, read: Callable[[], T]) -> T | None:
    try:
        return read()
    except GpuError as exc:
        errors[name] = str(exc)
        return None


def inspect_node(
    backend: NvmlBackend, energy_s: float, now_s: Callable[[], float] = time.perf_counter
) -> NodeReport:
    """Every reading the doctor reports, GPU by GPU. Only a failure to reach NVML at all (or to
    list the GPUs) raises; a reading a GPU does not support is recorded in its `errors`."""
    gpus = backend.list_gpus()
    node_errors: dict[str, str] = {}
    driver = _read(node_errors, "driver_version", backend.driver_version)
    reports = [_inspect_gpu(backend, gpu, energy_s, now_s) for gpu in gpus]
    return NodeReport(driver_version=driver, gpus=reports, errors=node_errors)


# ---- output ---------------------------------------------------------------------------------


def _clock_summary(clocks_mhz: Sequence[int]) -> dict[str, Any]:
    return {
        "count": len(clocks_mhz),
        "min_mhz": min(clocks_mhz) if clocks_mhz else None,
        "max_mhz": max(clocks_mhz) if clocks_mhz else None,
        "steps_mhz": {str(step): n for step, n in clock_steps_mhz(clocks_mhz).items()},
        "values_mhz": list(clocks_mhz),
    }


def to_json(report: NodeReport) -> dict[str, Any]:
    """The report as plain JSON types; supported SM clocks get their summary next to the list."""
    gpus = []
    for gpu in report.gpus:
        out = asdict(gpu)
        out["sm_clocks"] = None if gpu.sm_clocks_mhz is None else _clock_summary(gpu.sm_clocks_mhz)
        del out["sm_clocks_mhz"]
        gpus.append(out)
    return {
        "driver_version": report.driver_version,
        "all_usable": report.all_usable,
        "gpus": gpus,
        "errors": report.errors,
    }


def _na(errors: dict[str, str], name: str) -> str:
    return f"n/a ({errors[name]})" if name in errors else "n/a"


def _steps_text(clocks_mhz: Sequence[int]) -> str:
    steps = clock_steps_mhz(clocks_mhz)
    return ", ".join(f"{step} MHz x{n}" for step, n in steps.items()) or "none"


def _energy_text(period: CounterPeriod) -> str:
    head = f"{period.updates} updates in {period.duration_s:.1f} s, {period.read_us:.1f} us/read"
    if period.interval_ms is None:
        return f"no update period measurable ({head})"
    iv = period.interval_ms
    text = f"updates every {iv.median:.1f} ms median (min {iv.min:.1f}, max {iv.max:.1f}; {head})"
    if period.increment_mj is not None:
        inc = period.increment_mj
        text += f"; +{inc.median:.0f} mJ median per update (min {inc.min:.0f}, max {inc.max:.0f})"
    if period.counter_power_w is not None:
        text += f"; {period.counter_power_w:.1f} W by the counter"
    return text


def _gpu_lines(gpu: GpuReport) -> list[str]:
    e = gpu.errors
    lines = [f"GPU {gpu.index}  {gpu.name}  {gpu.uuid}"]
    lines.append("  usable: yes" if gpu.usable else f"  usable: NO - {gpu.reason}")
    if gpu.mig_enabled is None:
        lines.append(f"  MIG: {_na(e, 'mig_enabled')}")
    else:
        lines.append(f"  MIG: {'enabled' if gpu.mig_enabled else 'disabled'}")
    if gpu.sm_clocks_mhz:
        c = gpu.sm_clocks_mhz
        lines.append(
            f"  supported SM clocks: {len(c)}, {min(c)}-{max(c)} MHz, steps {_steps_text(c)}"
        )
    else:
        lines.append(f"  supported SM clocks: {_na(e, 'sm_clocks_mhz')}")
    mem = gpu.memory_clocks_mhz
    lines.append(
        "  supported memory clocks: "
        + (", ".join(f"{m}" for m in mem) + " MHz" if mem else _na(e, "memory_clocks_mhz"))
    )
    sm_now = gpu.current_sm_clock_mhz
    mem_now = gpu.current_memory_clock_mhz
    rated = gpu.max_rated_sm_clock_mhz
    lines.append(
        f"  current clocks: SM {sm_now if sm_now is not None else _na(e, 'current_sm_clock_mhz')}"
        f" MHz, memory {mem_now if mem_now is not None else 'n/a'} MHz;"
        f" max rated SM {rated if rated is not None else 'n/a'} MHz"
    )
    reasons = gpu.clock_event_reasons
    if reasons is not None:
        lines.append(f"  clock event reasons: {', '.join(reasons) or 'none'}")
    else:
        lines.append(f"  clock event reasons: {_na(e, 'clock_event_reasons')}")
    power = f"{gpu.power_w:.1f} W" if gpu.power_w is not None else _na(e, "power_w")
    limit = f"{gpu.power_limit_w:.0f} W" if gpu.power_limit_w is not None else "n/a"
    lines.append(f"  power: {power} (enforced limit {limit})")
    if gpu.energy_counter is not None:
        lines.append(f"  energy counter: {_energy_text(gpu.energy_counter)}")
    elif "energy_counter" in e:
        lines.append(f"  energy counter: {_na(e, 'energy_counter')}")
    return lines


def format_text(report: NodeReport) -> str:
    driver = report.driver_version or _na(report.errors, "driver_version")
    n = len(report.gpus)
    lines = [f"NVIDIA driver {driver}; {n} GPU{'s' if n != 1 else ''} visible"]
    for gpu in report.gpus:
        lines.extend(_gpu_lines(gpu))
    if not report.gpus:
        lines.append("no GPU visible: the sidecar would not become ready")
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 60:
        raise argparse.ArgumentTypeError(f"must be between 0 and 60 seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Check this node's GPUs through NVML, read-only: nothing is locked or set.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--energy-s",
        type=_seconds,
        default=DEFAULT_ENERGY_S,
        help=f"seconds to poll each GPU's energy counter (default {DEFAULT_ENERGY_S}; 0 skips)",
    )
    p.add_argument(
        "--time-sliced",
        action="store_true",
        help=f"GPUs are shared by time slicing, like the sidecar flag (default ${TIME_SLICED_ENV})",
    )
    return p


def _time_sliced_from_env() -> bool:
    """What the sidecar in the same pod was told: the chart sets this variable."""
    value = os.environ.get(TIME_SLICED_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{TIME_SLICED_ENV} must be true or false, got {value!r}")


def main(argv: Sequence[str] | None = None, now_s: Callable[[], float] = time.perf_counter) -> int:
    args = build_parser().parse_args(argv)
    try:
        time_sliced = args.time_sliced or _time_sliced_from_env()
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        from perseus_sidecar.gpu.nvml import NvmlBackend
    except ImportError as exc:
        print(
            f"{PROG}: error: the NVML bindings are missing (nvidia-ml-py): {exc}", file=sys.stderr
        )
        return 2
    backend = NvmlBackend(time_sliced=time_sliced)
    try:
        report = inspect_node(backend, args.energy_s, now_s)
    except GpuError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        backend.close()
    print(json.dumps(to_json(report), indent=2) if args.json else format_text(report))
    return 0 if report.all_usable else 1


if __name__ == "__main__":
    sys.exit(main())
