"""The driver state of a simulated node's GPUs, shared by its sidecar (`simulated.SimulatedBackend`)
and the simulated trainer that plays their workload (`open_node`).

The "driver" state lives in files under a state directory, as a real driver keeps clock locks past
a process's death: it survives a SIGKILLed sidecar and is shared with the simulated trainer, which
plays the GPUs' workload. Readers never block writers; writers take an `flock`, so a restarted
sidecar racing its predecessor, or two trainer threads, cannot interleave a read-modify-write.

- ``node.json``: the settings both sides must agree on (time scale and epoch, energy update
  interval, blocking power); ``profile.csv``: the ground-truth (perturbed) profile to play.
  Both rarely change and are replaced atomically (`os.replace`).
- ``gpu-<i>.clock``: the locked SM clock (written by the sidecar's backend).
- ``gpu-<i>.energy``: the energy curve as breakpoints ``(t_s, energy_j)`` in simulated
  seconds, piecewise linear, continuing at blocking power after the last point (written by the
  trainer, which records each instruction it plays).

Both GPU files are small binary records mapped into memory under a sequence lock (see
`simrecord.SharedRecord`), because the sidecar sets a clock on every instruction's begin event.

Simulated seconds are wall seconds since the node's epoch divided by the time scale. The counter
the backend reports is the curve's value at the last update instant (every
``energy_update_interval_s`` of simulated time, with a per-GPU phase), like NVML's.
"""

from __future__ import annotations

import bisect
import json
import math
import random
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from perseus_profiles import Measurement, ProfileError, StageProfile, read_profile
from perseus_sidecar.gpu.base import GpuError
from perseus_sidecar.gpu.simrecord import SharedRecord

__all__ = [
    "NODE_FILE",
    "PROFILE_FILE",
    "NodeSettings",
    "SimulatedGpu",
    "open_node",
    "perturbed_profile",
    "read_node",
    "simulated_uuid",
    "validate_settings",
]

NODE_FILE = "node.json"
PROFILE_FILE = "profile.csv"
HISTORY_S = 1.0
"""Simulated seconds of energy history kept (at least four update intervals): readers look back
one update interval; the trainer reads each iteration's end as it happens. Short, because the
trainer rewrites the curve at every instruction."""
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def simulated_uuid(node_name: str, index: int) -> str:
    return f"GPU-sim-{node_name}-{index}"


def perturbed_profile(profile: StageProfile, perturbation: float, seed: int) -> StageProfile:
    """The profile with every time and energy scaled by an independent factor drawn uniformly
    from [1 - perturbation, 1 + perturbation]: deterministic in (profile, perturbation, seed).

    It is the simulated GPUs' ground truth, so measured results are not the planner's own
    numbers played back (and the real profiles' identical stages 0-6 become distinct)."""
    if not math.isfinite(perturbation) or not 0.0 <= perturbation < 1.0:
        raise ValueError(f"perturbation must be in [0, 1), got {perturbation}")
    if perturbation == 0.0:
        return profile
    rng = random.Random(f"perseus-sim:{seed}")
    stages = []
    for per_instr in profile.options:
        instrs = []
        for opts in per_instr:
            instrs.append(
                tuple(
                    Measurement(
                        m.frequency_mhz,
                        m.time_s * rng.uniform(1 - perturbation, 1 + perturbation),
                        m.energy_j * rng.uniform(1 - perturbation, 1 + perturbation),
                    )
                    for m in opts
                )
            )
        stages.append((instrs[0], instrs[1]))
    return StageProfile(tuple(stages), profile.chunks)


@dataclass(frozen=True)
class NodeSettings:
    """What the sidecar and the trainer of one simulated node must agree on (``node.json``)."""

    node_name: str
    num_gpus: int
    time_scale: float
    epoch_wall_s: float
    energy_update_interval_s: float
    blocking_power_w: float
    perturbation: float
    seed: int

    def now_s(self) -> float:
        """The node's simulated time now."""
        return (time.time() - self.epoch_wall_s) / self.time_scale

    def wall_s(self, sim_s: float) -> float:
        """The wall-clock time (``time.time()`` scale) of a simulated instant."""
        return self.epoch_wall_s + sim_s * self.time_scale

    def same_clockwork(self, other: NodeSettings) -> bool:
        """True when energy curves recorded under `other` stay valid under these settings."""
        return (
            self.time_scale == other.time_scale
            and self.energy_update_interval_s == other.energy_update_interval_s
            and self.blocking_power_w == other.blocking_power_w
        )


def validate_settings(
    node_name: str,
    num_gpus: int,
    time_scale: float,
    energy_update_interval_s: float,
    blocking_power_w: float,
) -> None:
    if not _NODE_NAME.match(node_name):
        raise ValueError(
            f"node name must be 1-63 letters, digits, '.', '_' or '-', got {node_name!r}"
        )
    if num_gpus < 0:
        raise ValueError(f"number of simulated GPUs must be >= 0, got {num_gpus}")
    for label, value in (
        ("time scale", time_scale),
        ("energy update interval", energy_update_interval_s),
    ):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{label} must be a finite positive number, got {value}")
    if not math.isfinite(blocking_power_w) or blocking_power_w < 0:
        raise ValueError(f"blocking power must be a finite number >= 0 W, got {blocking_power_w}")


def read_node(state_dir: Path) -> NodeSettings | None:
    """The node's settings, or None where no sidecar created the node yet."""
    try:
        raw = json.loads((state_dir / NODE_FILE).read_text(encoding="utf-8"))
        return NodeSettings(**raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise GpuError(
            f"simulated GPU state {state_dir / NODE_FILE} is unreadable: {exc}"
        ) from None


def open_node(state_dir: str | Path) -> tuple[NodeSettings, StageProfile, list[SimulatedGpu]]:
    """Attach to the simulated node a sidecar created in `state_dir` (the trainer's entry point):
    its settings, the ground-truth profile to play, and its GPUs."""
    path = Path(state_dir)
    settings = read_node(path)
    if settings is None:
        raise GpuError(
            f"no simulated GPU state in {path}: start perseus-sidecar --gpu-backend simulated "
            f"--state-dir {path} first"
        )
    try:
        profile = read_profile(path / PROFILE_FILE)
    except ProfileError as exc:
        raise GpuError(f"simulated GPU state in {path} has no usable profile: {exc}") from None
    gpus = [
        SimulatedGpu(path, i, settings, profile.max_frequency_mhz) for i in range(settings.num_gpus)
    ]
    return settings, profile, gpus


_CLOCK = struct.Struct("<q")
_POINT = struct.Struct("<dd")
MAX_POINTS = 256
"""Breakpoints kept per energy curve (at least HISTORY_S of them unless instructions are tiny)."""


class SimulatedGpu:
    """One simulated GPU's driver state. The sidecar writes its clock, the trainer its energy."""

    def __init__(
        self, state_dir: Path, index: int, settings: NodeSettings, max_clock_mhz: int
    ) -> None:
        self.index = index
        self.uuid = simulated_uuid(settings.node_name, index)
        self.settings = settings
        self.max_clock_mhz = max_clock_mhz
        self._clock = SharedRecord(state_dir / f"gpu-{index}.clock", 1, _CLOCK.size)
        self._energy = SharedRecord(state_dir / f"gpu-{index}.energy", 2, _POINT.size * MAX_POINTS)
        # NVML counters of different GPUs update out of phase; keep that, deterministically.
        self._phase_s = settings.energy_update_interval_s * ((index * 0.618034) % 1.0)

    def close(self) -> None:
        """Unmap the state files (they stay on disk)."""
        self._clock.close()
        self._energy.close()

    # Clock -----------------------------------------------------------------------------------

    def locked_sm_clock_mhz(self) -> int | None:
        """The locked clock, or None when unlocked (a few microseconds: polled by the trainer)."""
        data = self._clock.read()
        clock: int = _CLOCK.unpack(data)[0] if len(data) == _CLOCK.size else 0
        return clock if clock > 0 else None

    def effective_clock_mhz(self) -> int:
        """The clock the GPU runs at: the locked one, else the maximum."""
        locked = self.locked_sm_clock_mhz()
        return self.max_clock_mhz if locked is None else locked

    def set_locked_sm_clock(self, clock_mhz: int | None) -> None:
        """Lock to `clock_mhz`, or unlock with None."""
        with self._clock.locked():
            self._clock.write(_CLOCK.pack(clock_mhz or 0))

    # Energy ----------------------------------------------------------------------------------

    def _points(self) -> list[tuple[float, float]]:
        data = self._energy.read()
        return list(_POINT.iter_unpack(data[: len(data) - len(data) % _POINT.size]))

    def _write_points(self, points: list[tuple[float, float]]) -> None:
        self._energy.write(b"".join(_POINT.pack(t, e) for t, e in points[-MAX_POINTS:]))

    def _value(self, points: list[tuple[float, float]], t_s: float) -> float:
        if not points:
            return 0.0
        times = [p[0] for p in points]
        i = bisect.bisect_right(times, t_s)
        if i == 0:
            return points[0][1]
        t0, e0 = points[i - 1]
        if i == len(points):
            return e0 + self.settings.blocking_power_w * (t_s - t0)
        t1, e1 = points[i]
        return e0 + (e1 - e0) * (t_s - t0) / (t1 - t0) if t1 > t0 else e1

    def energy_j(self, t_s: float) -> float:
        """The exact (unquantised) energy at simulated time `t_s`: the trainer's ground truth."""
        return self._value(self._points(), t_s)

    def counter_energy_j(self, now_s: float) -> float:
        """What the driver's counter shows at `now_s`: the value at the last update instant."""
        interval = self.settings.energy_update_interval_s
        update_s = math.floor((now_s - self._phase_s) / interval) * interval + self._phase_s
        return self._value(self._points(), update_s)

    def power_w(self, t_s: float) -> float:
        """The power drawn at `t_s`: the curve's slope there."""
        points = self._points()
        i = bisect.bisect_right([p[0] for p in points], t_s)
        if 0 < i < len(points):
            (t0, e0), (t1, e1) = points[i - 1], points[i]
            if t1 > t0:
                return (e1 - e0) / (t1 - t0)
        return self.settings.blocking_power_w

    def ensure_energy(self, now_s: float) -> None:
        """Start the energy curve at zero if there is none yet."""
        if self._points():
            return
        with self._energy.locked():
            if not self._points():
                self._write_points([(now_s, 0.0)])

    def rebase_energy(self, new_now_s: float) -> None:
        """Carry the counter over to new settings (time scale, interval): its value now under
        this GPU's settings becomes the start of the new curve, as a reloaded driver keeps it."""
        with self._energy.locked():
            value = self.energy_j(self.settings.now_s())
            self._write_points([(new_now_s, value)])

    def record_work(self, start_s: float, duration_s: float, energy_j: float) -> None:
        """The GPU works from `start_s` for `duration_s` simulated seconds, spending `energy_j`.
        Anything the curve held after `start_s` is replaced, so an instruction whose clock
        changes midway is re-recorded from the change on. Idle gaps accrue blocking power."""
        if not (math.isfinite(duration_s) and duration_s >= 0):
            raise ValueError(f"duration must be a finite number >= 0 s, got {duration_s}")
        if not (math.isfinite(energy_j) and energy_j >= 0):
            raise ValueError(f"energy must be a finite number >= 0 J, got {energy_j}")
        with self._energy.locked():
            points = self._points()
            start_e = self._value(points, start_s)
            times = [p[0] for p in points]
            kept = points[: bisect.bisect_left(times, start_s)]
            horizon = start_s - max(HISTORY_S, 4 * self.settings.energy_update_interval_s)
            first = max(0, bisect.bisect_left([p[0] for p in kept], horizon) - 1)
            kept = kept[first:]
            kept.append((start_s, start_e))
            kept.append((start_s + duration_s, start_e + energy_j))
            self._write_points(kept)
