"""Simulated GPUs played from a stage profile, so the whole system runs and is tested without GPUs.

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
`_SharedRecord`), because the sidecar sets a clock on every instruction's begin event.

Simulated seconds are wall seconds since the node's epoch divided by the time scale. The counter
the backend reports is the curve's value at the last update instant (every
``energy_update_interval_s`` of simulated time, with a per-GPU phase), like NVML's.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import json
import math
import mmap
import os
import random
import re
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from perseus_profiles import Measurement, ProfileError, StageProfile, read_profile
from perseus_sidecar.gpu.base import (
    GpuBackend,
    GpuError,
    GpuInfo,
    GpuNotFoundError,
    GpuNotSupportedError,
)

__all__ = [
    "NodeSettings",
    "SimulatedBackend",
    "SimulatedGpu",
    "open_node",
    "perturbed_profile",
    "simulated_uuid",
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


def _validate(
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


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _read_node(state_dir: Path) -> NodeSettings | None:
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
    settings = _read_node(path)
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


class _SharedRecord:
    """A small file mapped into memory by every process that uses it, holding one payload under a
    sequence lock: the writer (serialised by `flock`) makes the sequence odd, writes, makes it
    even; readers retry until they read the same even sequence before and after. Updates cost
    microseconds (no file creation or rename per write), and the mapping writes through to the
    file, so the state outlives any process."""

    HEADER = struct.Struct("<4sIQII")  # magic, kind, sequence, payload length, padding
    MAGIC = b"PSIM"

    def __init__(self, path: Path, kind: int, capacity: int) -> None:
        self.path = path
        self.kind = kind
        self.capacity = capacity
        self._size = self.HEADER.size + capacity
        self._map: mmap.mmap | None = None
        self._fd = -1
        self._thread_lock = threading.Lock()

    def _mapped(self) -> mmap.mmap:
        if self._map is not None:
            return self._map
        with self._thread_lock:
            if self._map is None:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    try:
                        header = os.pread(fd, self.HEADER.size, 0)
                        if os.fstat(fd).st_size != self._size or header[:4] != self.MAGIC:
                            os.ftruncate(fd, 0)
                            os.ftruncate(fd, self._size)
                            os.pwrite(fd, self.HEADER.pack(self.MAGIC, self.kind, 0, 0, 0), 0)
                    finally:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    self._map = mmap.mmap(fd, self._size)
                    self._fd = fd
                except OSError as exc:
                    raise GpuError(f"simulated GPU state {self.path} is unusable: {exc}") from None
        return self._map

    def read(self) -> bytes:
        m = self._mapped()
        for _ in range(200):
            seq = struct.unpack_from("<Q", m, 8)[0]
            if seq & 1:
                continue
            length = min(struct.unpack_from("<I", m, 16)[0], self.capacity)
            data = m[self.HEADER.size : self.HEADER.size + length]
            if struct.unpack_from("<Q", m, 8)[0] == seq:
                return data
        # A writer is slow or died mid-write: wait for the writers' locks (the thread lock too,
        # as flock does not exclude threads sharing this descriptor), then take what is there.
        with self.locked():
            length = min(struct.unpack_from("<I", m, 16)[0], self.capacity)
            return m[self.HEADER.size : self.HEADER.size + length]

    def close(self) -> None:
        with self._thread_lock:
            if self._map is not None:
                self._map.close()
                os.close(self._fd)
                self._map, self._fd = None, -1

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive writer access, across threads and processes."""
        self._mapped()
        with self._thread_lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def write(self, data: bytes) -> None:
        """Replace the payload; call inside :meth:`locked`."""
        if len(data) > self.capacity:
            raise ValueError(f"{len(data)} bytes exceed the record's {self.capacity}")
        m = self._mapped()
        seq = struct.unpack_from("<Q", m, 8)[0]
        struct.pack_into("<Q", m, 8, seq + 1 if seq % 2 == 0 else seq)
        m[self.HEADER.size : self.HEADER.size + len(data)] = data
        struct.pack_into("<I", m, 16, len(data))
        struct.pack_into("<Q", m, 8, (seq | 1) + 1)


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
        self._clock = _SharedRecord(state_dir / f"gpu-{index}.clock", 1, _CLOCK.size)
        self._energy = _SharedRecord(state_dir / f"gpu-{index}.energy", 2, _POINT.size * MAX_POINTS)
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


class SimulatedBackend(GpuBackend):
    """`num_gpus` simulated GPUs whose supported clocks are the profile's (see module doc)."""

    def __init__(
        self,
        profile: StageProfile,
        num_gpus: int,
        state_dir: Path,
        *,
        node_name: str = "sim",
        time_scale: float = 1.0,
        energy_update_interval_s: float = 0.05,
        blocking_power_w: float = 83.64,
        perturbation: float = 0.0,
        seed: int = 0,
    ) -> None:
        _validate(node_name, num_gpus, time_scale, energy_update_interval_s, blocking_power_w)
        truth = perturbed_profile(profile, perturbation, seed)
        self.profile = profile
        self.state_dir = Path(state_dir)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.settings = self._open_state(
                NodeSettings(
                    node_name=node_name,
                    num_gpus=num_gpus,
                    time_scale=time_scale,
                    epoch_wall_s=time.time(),
                    energy_update_interval_s=energy_update_interval_s,
                    blocking_power_w=blocking_power_w,
                    perturbation=perturbation,
                    seed=seed,
                ),
                truth,
            )
        except OSError as exc:
            raise GpuError(f"cannot use simulated GPU state dir {self.state_dir}: {exc}") from None
        self._clocks_mhz = profile.frequencies_mhz
        self._gpus = {
            gpu.uuid: gpu
            for gpu in (
                SimulatedGpu(self.state_dir, i, self.settings, profile.max_frequency_mhz)
                for i in range(num_gpus)
            )
        }
        self._reported_mj: dict[str, int] = {}
        now_s = self.settings.now_s()
        for gpu in self._gpus.values():
            gpu.ensure_energy(now_s)

    def _open_state(self, wanted: NodeSettings, truth: StageProfile) -> NodeSettings:
        """Keep an existing node's epoch (a restarted sidecar must not disturb a running trainer)
        unless the clockwork changed; then carry every counter over to a fresh epoch."""
        with _flocked(self.state_dir / "node.lock"):
            old = _read_node(self.state_dir)
            settings = wanted
            if old is not None and old.same_clockwork(wanted):
                settings = NodeSettings(**{**asdict(wanted), "epoch_wall_s": old.epoch_wall_s})
            elif old is not None:
                for i in range(min(old.num_gpus, wanted.num_gpus)):
                    old_gpu = SimulatedGpu(self.state_dir, i, old, truth.max_frequency_mhz)
                    old_gpu.rebase_energy(wanted.now_s())
                    old_gpu.close()
            _write_atomic(self.state_dir / PROFILE_FILE, truth.to_csv())
            _write_atomic(self.state_dir / NODE_FILE, json.dumps(asdict(settings)))
        return settings

    def _gpu(self, uuid: str) -> SimulatedGpu:
        try:
            return self._gpus[uuid]
        except KeyError:
            raise GpuNotFoundError(f"no simulated GPU {uuid!r} on this node") from None

    def gpu(self, uuid: str) -> SimulatedGpu:
        """The driver state of one GPU (for tests and the trainer in the same process)."""
        return self._gpu(uuid)

    def list_gpus(self) -> list[GpuInfo]:
        return [
            GpuInfo(
                index=gpu.index,
                uuid=gpu.uuid,
                name="Simulated GPU",
                supported_sm_clocks_mhz=self._clocks_mhz,
            )
            for gpu in self._gpus.values()
        ]

    def set_locked_sm_clock(self, uuid: str, clock_mhz: int) -> None:
        gpu = self._gpu(uuid)
        if clock_mhz not in self._clocks_mhz:
            raise GpuNotSupportedError(
                f"{clock_mhz} MHz is not a supported clock of {uuid} "
                f"({self._clocks_mhz[-1]}-{self._clocks_mhz[0]} MHz in the profile's steps)"
            )
        gpu.set_locked_sm_clock(clock_mhz)

    def reset_locked_clocks(self, uuid: str) -> None:
        self._gpu(uuid).set_locked_sm_clock(None)

    def locked_sm_clock_mhz(self, uuid: str) -> int | None:
        return self._gpu(uuid).locked_sm_clock_mhz()

    def total_energy_mj(self, uuid: str) -> int:
        gpu = self._gpu(uuid)
        value_mj = round(gpu.counter_energy_j(self.settings.now_s()) * 1000.0)
        # A trainer lagging behind its simulated schedule may record work after the counter's
        # update instant was read; a real counter never runs backwards.
        value_mj = max(value_mj, self._reported_mj.get(uuid, 0))
        self._reported_mj[uuid] = value_mj
        return value_mj

    def current_sm_clock_mhz(self, uuid: str) -> int:
        return self._gpu(uuid).effective_clock_mhz()

    def power_w(self, uuid: str) -> float:
        return self._gpu(uuid).power_w(self.settings.now_s())

    def close(self) -> None:
        for gpu in self._gpus.values():
            gpu.close()
