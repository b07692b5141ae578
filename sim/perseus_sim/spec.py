"""What a simulated job is (nodes, pipelines, stragglers, crashes; `SimConfig`, validated up front),
where its ranks run (`RankPlacement`) and what each iteration measured (`IterationResult`): shared
by the in-process trainer, the multi-process ranks and their coordinator (`CoordinatorConfig`)."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path

from perseus_sim import wire

__all__ = [
    "CoordinatorConfig",
    "Crash",
    "IterationResult",
    "NodeSpec",
    "RankPlacement",
    "SimConfig",
    "SimulationError",
    "Straggler",
    "straggle_factor",
]


class SimulationError(RuntimeError):
    """The simulation cannot run as configured; one readable line."""


@dataclass(frozen=True)
class NodeSpec:
    """A simulated node: its sidecar's address and the state dir of its simulated GPUs."""

    host: str
    port: int
    state_dir: Path


@dataclass(frozen=True)
class Straggler:
    """Pipeline `pipeline` runs `factor` times slower from iteration `from_iteration` on."""

    pipeline: int
    factor: float
    from_iteration: int = 0


def straggle_factor(stragglers: tuple[Straggler, ...], pipeline: int, iteration: int) -> float:
    """How many times slower `pipeline` runs in `iteration` (stragglers compound)."""
    factor = 1.0
    for s in stragglers:
        if s.pipeline == pipeline and iteration >= s.from_iteration:
            factor *= s.factor
    return factor


@dataclass(frozen=True)
class Crash:
    """Rank `rank` dies halfway through iteration `at_iteration` (its event stream drops, its GPU
    idles, the job stalls behind it) and restarts after `down_s` wall seconds, registering again
    and redoing that iteration's remaining instructions, as a job restarted from its last
    checkpoint would, only faster to simulate."""

    rank: int
    at_iteration: int
    down_s: float


@dataclass(frozen=True)
class SimConfig:
    nodes: tuple[NodeSpec, ...]
    pipelines: int
    microbatches: int
    iterations: int
    job_token: str
    namespace: str = "default"
    job: str = "sim"
    pod_prefix: str | None = None
    """Rank r runs in pod ``<pod_prefix>-<r>`` (default: the job name)."""
    pod_ip_base: str | None = None
    """Rank r's pod has IP base + r and its hooks bind to it; None: pods on the host network."""
    stragglers: tuple[Straggler, ...] = ()
    crashes: tuple[Crash, ...] = ()
    allreduce_s: float = 0.0
    """Simulated seconds between the pipelines' end and the next iteration (GPUs idle)."""
    max_lag_s: float = 0.05
    """Host lag (wall seconds) absorbed by the GPU timeline, as a launch queue absorbs it."""
    connect_timeout_s: float = 10.0
    """How long to wait for every rank's event stream before starting (wall seconds)."""

    def __post_init__(self) -> None:
        if not self.nodes:
            raise SimulationError("at least one simulated node (sidecar) is needed")
        for label, value in (
            ("pipelines", self.pipelines),
            ("microbatches", self.microbatches),
            ("iterations", self.iterations),
        ):
            if value < 1:
                raise SimulationError(f"{label} must be >= 1, got {value}")
        for label, number in (
            ("allreduce_s", self.allreduce_s),
            ("max_lag_s", self.max_lag_s),
            ("connect_timeout_s", self.connect_timeout_s),
        ):
            if not math.isfinite(number) or number < 0:
                raise SimulationError(f"{label} must be a finite number >= 0, got {number}")
        for s in self.stragglers:
            if not 0 <= s.pipeline < self.pipelines:
                raise SimulationError(
                    f"straggler pipeline {s.pipeline} is not one of 0..{self.pipelines - 1}"
                )
            if not math.isfinite(s.factor) or s.factor <= 0:
                raise SimulationError(f"straggler factor must be > 0, got {s.factor}")
            if s.from_iteration < 0:
                raise SimulationError("straggler iteration must be >= 0")
        for c in self.crashes:
            if c.at_iteration < 0 or not math.isfinite(c.down_s) or c.down_s < 0:
                raise SimulationError("a crash needs an iteration >= 0 and a down time >= 0 s")
        if self.pod_ip_base is not None:
            try:
                ipaddress.ip_address(self.pod_ip_base)
            except ValueError:
                raise SimulationError(f"pod IP base {self.pod_ip_base!r} is not an IP") from None

    def pod_name(self, rank: int) -> str:
        return f"{self.pod_prefix or self.job}-{rank}"

    def pod_ip(self, rank: int) -> str | None:
        if self.pod_ip_base is None:
            return None
        return str(ipaddress.ip_address(self.pod_ip_base) + rank)

    def straggle_factor(self, pipeline: int, iteration: int) -> float:
        return straggle_factor(self.stragglers, pipeline, iteration)


@dataclass(frozen=True)
class RankPlacement:
    rank: int
    data_rank: int
    stage: int
    node: int
    gpu_index: int
    gpu_uuid: str


@dataclass(frozen=True)
class IterationResult:
    iteration: int
    time_s: float
    """Measured on the wall clock (barrier to barrier), in simulated seconds."""
    timeline_s: float
    """On the simulated GPUs' timeline."""
    expected_s: float
    """All GPUs at maximum clock: the longest path of the pipeline's DAG (slowest pipeline)."""
    energy_j: float
    """All the job's GPUs, from their exact energy curves."""
    late_starts: int
    """Instructions that started late because the host fell behind by more than max_lag_s."""


@dataclass(frozen=True)
class CoordinatorConfig:
    """A multi-process job as its coordinator (`coordinator.Coordinator`) runs it."""

    stages: int
    pipelines: int
    microbatches: int
    iterations: int
    host: str = "0.0.0.0"
    port: int = 29400
    allreduce_s: float = 0.0
    stragglers: tuple[Straggler, ...] = ()
    time_scale: float | None = None
    """When set, every rank's node must run at this time scale."""
    join_timeout_s: float = 600.0
    rejoin_timeout_s: float = 120.0
    rank_timeout_s: float = 30.0
    """Silence after which a rank counts as gone (ranks ping every 2 s)."""
    start_margin_s: float = 0.05
    """Wall seconds between sending a start and the instant it names."""
    stop_file: Path | None = None
    """Once this file exists, the job ends after the iteration in progress, as if its last."""

    def __post_init__(self) -> None:
        for label, value in (
            ("stages", self.stages),
            ("pipelines", self.pipelines),
            ("microbatches", self.microbatches),
            ("iterations", self.iterations),
        ):
            if value < 1:
                raise SimulationError(f"{label} must be >= 1, got {value}")
        if self.stages * self.pipelines > wire.MAX_RANKS:
            raise SimulationError(f"at most {wire.MAX_RANKS} ranks")
        for label, number in (
            ("allreduce_s", self.allreduce_s),
            ("join_timeout_s", self.join_timeout_s),
            ("rejoin_timeout_s", self.rejoin_timeout_s),
            ("rank_timeout_s", self.rank_timeout_s),
            ("start_margin_s", self.start_margin_s),
        ):
            if not math.isfinite(number) or number < 0:
                raise SimulationError(f"{label} must be a finite number >= 0, got {number}")
        if self.time_scale is not None and not (
            math.isfinite(self.time_scale) and self.time_scale > 0
        ):
            raise SimulationError(f"time scale must be > 0, got {self.time_scale}")
        for s in self.stragglers:
            if not 0 <= s.pipeline < self.pipelines:
                raise SimulationError(
                    f"straggler pipeline {s.pipeline} is not one of 0..{self.pipelines - 1}"
                )

    @property
    def ranks(self) -> int:
        return self.stages * self.pipelines

    def factor(self, pipeline: int, iteration: int) -> float:
        return straggle_factor(self.stragglers, pipeline, iteration)
