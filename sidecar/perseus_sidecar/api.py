"""Request and response models of the sidecar's HTTP API (`/v1`), shared with the operator (which
sends announcements, schedules and profiling requests and reads timings) and documented in the
OpenAPI schema. Every request model forbids unknown fields and non-finite floats and is strict
(`"1410"` is not an integer, `true` is not a number), so a malformed body is a 422 with a message,
never a half-applied change.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    model_validator,
)

from perseus_hooks.pipeline import MAX_CHUNKS, parse_instruction

__all__ = [
    "ClockResetResponse",
    "ErrorOut",
    "EventIn",
    "EventKind",
    "EventsAccepted",
    "EventsIn",
    "GpuOut",
    "GpusOut",
    "HealthOut",
    "InstructionName",
    "InstructionTiming",
    "JobAnnouncement",
    "JobOut",
    "PipelineTimings",
    "PodAnnouncement",
    "ProfilingMeasurement",
    "ProfilingRequest",
    "ProfilingState",
    "ProfilingStatus",
    "RankRegistered",
    "RankRegistration",
    "RankTimings",
    "ReadyOut",
    "ScheduleEntry",
    "ScheduleIn",
    "ScheduleOut",
    "StageTimings",
    "TimingsOut",
]

EventKind = Literal["FB", "FE", "BB", "BE", "IE"]
InstructionName = Literal["forward", "backward"]
ProfilingState = Literal["running", "done", "cancelled"]

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
Namespace = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=_DNS_LABEL)]
ObjectName = Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN)]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
GpuUuid = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]
FrequencyMhz = Annotated[int, Field(gt=0, le=100_000)]
RankIndex = Annotated[int, Field(ge=0, le=1_000_000)]


class _Model(BaseModel):
    """Requests: unknown fields are an error (a typo never passes silently), and no type is
    coerced (a quoted number is a client bug, not a number)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, strict=True)


class _Out(BaseModel):
    """Responses: unknown fields are ignored, so an older operator reads a newer sidecar."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class ErrorOut(_Out):
    """Every non-validation error: one readable line."""

    detail: str


# ---- health and inventory ------------------------------------------------------------------


class HealthOut(_Out):
    status: Literal["ok"] = "ok"


class ReadyOut(_Out):
    ready: bool
    reason: str = ""
    usable_gpus: int = 0


class GpuOut(_Out):
    index: int
    uuid: str
    name: str
    supported_sm_clocks_mhz: list[int]
    max_sm_clock_mhz: int
    usable: bool
    reason: str = ""
    locked_by_sidecar: bool = False
    applied_sm_clock_mhz: int | None = None


class GpusOut(_Out):
    node_name: str
    gpus: list[GpuOut]


# ---- job announcements (operator) -----------------------------------------------------------


class PodAnnouncement(_Model):
    namespace: Namespace
    name: ObjectName
    uid: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    ip: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    host_network: bool = False
    gpu_uuids: Annotated[list[GpuUuid], Field(max_length=64)] | None = None
    """The GPUs the pod was given, where the operator knows them from a trusted source (the
    simulated cluster's kubelet). Used only where the node has no kubelet pod-resources socket,
    which is the source of truth on real nodes; None: unknown (its ranks cannot register there)."""


class JobAnnouncement(_Model):
    """The operator's view of one job (EnergyPolicy) on this node: its pods and its token hash."""

    token_sha256: Sha256Hex
    pods: Annotated[list[PodAnnouncement], Field(max_length=4096)]
    microbatches: Annotated[int, Field(ge=1, le=4096)] | None = None
    """Forwards (and backwards) per rank and iteration: the microbatches, times the model chunks
    of an interleaved pipeline. Bounds what the sidecar keeps per rank and iteration. None: the
    sidecar's own limit applies."""

    @model_validator(mode="after")
    def _distinct_pods(self) -> JobAnnouncement:
        names = [(p.namespace, p.name) for p in self.pods]
        if len(set(names)) != len(names):
            raise ValueError("pods must be distinct (namespace, name) pairs")
        gpus = [g for p in self.pods for g in p.gpu_uuids or ()]
        if len(set(gpus)) != len(gpus):
            raise ValueError("a GPU can be given to only one pod")
        return self


class JobOut(_Out):
    namespace: str
    name: str
    pods: list[PodAnnouncement]
    ranks: list[str]
    schedule_entries: int
    profiling: bool


# ---- ranks and events (training hooks) ------------------------------------------------------


class RankRegistration(_Model):
    namespace: Namespace
    pod: ObjectName
    rank: RankIndex
    pipeline_rank: RankIndex
    data_rank: RankIndex
    tensor_rank: RankIndex
    gpu_uuid: GpuUuid


class RankRegistered(_Out):
    rank_id: str
    event_port: int
    schedule_active: bool


class EventIn(_Model):
    kind: EventKind
    microbatch: Annotated[int, Field(ge=-1, le=1_000_000)]
    t_ns: Annotated[int, Field(ge=0, le=2**63 - 1)]
    chunk: Annotated[int, Field(ge=0, lt=MAX_CHUNKS)] = 0
    """The model chunk of the stage (interleaved pipelines; 0 otherwise)."""

    @model_validator(mode="after")
    def _microbatch_matches_kind(self) -> EventIn:
        if (self.kind == "IE") != (self.microbatch == -1):
            raise ValueError("microbatch is -1 exactly for IE (iteration end)")
        if self.kind == "IE" and self.chunk:
            raise ValueError("chunk is 0 for IE (iteration end)")
        return self


class EventsIn(_Model):
    events: Annotated[list[EventIn], Field(min_length=1, max_length=10_000)]


class EventsAccepted(_Out):
    accepted: int
    schedule_active: bool


# ---- schedules (operator) --------------------------------------------------------------------


class ScheduleEntry(_Model):
    """Stage `pipeline_rank` of pipeline `data_rank`: its instruction order and the SM clock to
    lock as each instruction begins (all tensor ranks of the stage follow it). An interleaved
    pipeline's stage names every instruction with its model chunk (`F<m>c<chunk>`)."""

    data_rank: RankIndex
    pipeline_rank: RankIndex
    order: Annotated[list[str], Field(min_length=2, max_length=20_000)]
    frequencies_mhz: Annotated[list[FrequencyMhz], Field(min_length=2, max_length=20_000)]
    _chunks: int = PrivateAttr(default=1)

    @model_validator(mode="after")
    def _valid_order(self) -> ScheduleEntry:
        where = f"entry (data_rank {self.data_rank}, pipeline_rank {self.pipeline_rank})"
        if len(self.order) != len(self.frequencies_mhz):
            raise ValueError(
                f"{where}: order has {len(self.order)} instructions but frequencies_mhz has "
                f"{len(self.frequencies_mhz)}"
            )
        parsed = []
        for text in self.order:
            try:
                parsed.append(parse_instruction(text))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        named = {c is not None for _, _, c in parsed}
        if len(named) > 1:
            raise ValueError(f"{where}: order mixes F<m> and F<m>c<chunk> names")
        chunks = self._chunks = max((c for _, _, c in parsed if c is not None), default=0) + 1
        if len(self.order) % (2 * chunks):
            per = "microbatch" if chunks == 1 else f"microbatch and each of {chunks} chunks"
            raise ValueError(f"{where}: order must hold one F<m> and one B<m> per {per}")
        microbatches = len(self.order) // (2 * chunks)
        forward_seen: set[tuple[int, int]] = set()
        backward_seen: set[tuple[int, int]] = set()
        for text, (is_forward, m, c) in zip(self.order, parsed, strict=True):
            if m >= microbatches:
                raise ValueError(f"{where}: {text} is out of range for {microbatches} microbatches")
            seen = forward_seen if is_forward else backward_seen
            key = (m, c or 0)
            if key in seen:
                raise ValueError(f"{where}: {text} appears twice")
            if not is_forward and key not in forward_seen:
                raise ValueError(f"{where}: {text} comes before {'F' + text[1:]}")
            seen.add(key)
        return self

    @property
    def chunks(self) -> int:
        """Model chunks of the stage: 1 unless the order names chunks."""
        return self._chunks

    @property
    def microbatches(self) -> int:
        return len(self.order) // (2 * self.chunks)


class ScheduleIn(_Model):
    entries: Annotated[list[ScheduleEntry], Field(min_length=1, max_length=4096)]

    @model_validator(mode="after")
    def _consistent(self) -> ScheduleIn:
        keys = [(e.data_rank, e.pipeline_rank) for e in self.entries]
        if len(set(keys)) != len(keys):
            raise ValueError("entries must be distinct (data_rank, pipeline_rank) pairs")
        if len({e.microbatches for e in self.entries}) != 1:
            raise ValueError("every entry must have the same number of microbatches")
        if len({e.chunks for e in self.entries}) != 1:
            raise ValueError("every entry must have the same number of model chunks")
        return self


class ScheduleOut(_Out):
    namespace: str
    name: str
    entries: list[ScheduleEntry]
    active_ranks: list[str]


# ---- profiling (operator) --------------------------------------------------------------------


class ProfilingRequest(_Model):
    """Lock each frequency in turn on every rank of the job on this node, for `warmup_iterations`
    then `iterations_per_frequency` real iterations, and measure each instruction."""

    frequencies_mhz: Annotated[list[FrequencyMhz], Field(min_length=1, max_length=512)]
    iterations_per_frequency: Annotated[int, Field(ge=1, le=10_000)]
    warmup_iterations: Annotated[int, Field(ge=0, le=1_000)] = 1

    @model_validator(mode="after")
    def _distinct(self) -> ProfilingRequest:
        if len(set(self.frequencies_mhz)) != len(self.frequencies_mhz):
            raise ValueError("frequencies_mhz must be distinct")
        return self


class ProfilingMeasurement(_Out):
    """Mean time and energy of one instruction of one stage at one frequency on this node, with
    the standard error of each mean. `energy_j` is estimated from the coarse energy counter."""

    pipeline_rank: int
    instruction: InstructionName
    frequency_mhz: int
    time_s: float
    time_stderr_s: float
    energy_j: float
    energy_stderr_j: float
    samples: int


class ProfilingStatus(_Out):
    namespace: str
    name: str
    state: ProfilingState
    frequencies_mhz: list[int]
    iterations_per_frequency: int
    warmup_iterations: int
    ranks_done: int
    ranks_total: int
    measurements: list[ProfilingMeasurement]
    blocking_power_w: float | None = None
    """Estimated power while the GPUs wait (between instructions), averaged over frequencies."""


# ---- timings (operator) ----------------------------------------------------------------------


class InstructionTiming(_Out):
    instruction: InstructionName
    count: int
    mean_s: float
    std_s: float


class RankTimings(_Out):
    rank_id: str
    pod: str
    rank: int
    pipeline_rank: int
    data_rank: int
    tensor_rank: int
    gpu_uuid: str
    iterations: int
    instructions: list[InstructionTiming]
    iteration_time_mean_s: float | None
    compute_span_mean_s: float | None
    energy_per_iteration_mean_j: float | None
    seconds_since_last_event: float | None
    schedule_active: bool
    stale: bool
    events_dropped: int = 0
    """Events refused because they exceeded the announced pipeline shape (see the sidecar's
    `perseus_sidecar_events_dropped` metric)."""


class StageTimings(_Out):
    """One pipeline stage on this node, pooled over its ranks (data-parallel and tensor)."""

    pipeline_rank: int
    ranks: int
    instructions: list[InstructionTiming]
    energy_per_iteration_mean_j: float | None
    """Mean over this stage's GPUs of the energy one GPU spends per iteration."""


class PipelineTimings(_Out):
    """Per data-parallel pipeline: its stage-0 compute span (first instruction begin to last
    instruction end of an iteration), which the operator compares across pipelines to spot a
    straggler."""

    data_rank: int
    iterations: int
    stage0_span_mean_s: float | None
    stage0_span_std_s: float | None
    stage0_span_last_s: float | None
    iteration_time_mean_s: float | None


class TimingsOut(_Out):
    namespace: str
    name: str
    window_s: float
    ranks: list[RankTimings]
    pipelines: list[PipelineTimings]
    stages: list[StageTimings] = Field(default_factory=list)


# ---- reset (operator) ------------------------------------------------------------------------


class ClockResetResponse(_Out):
    reset_gpus: list[str]
    schedules_removed: int
