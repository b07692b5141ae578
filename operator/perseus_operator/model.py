"""EnergyPolicy spec and status: the source of truth for the CRD schema (`crd.py` renders it).

Field limits here become the OpenAPI schema's ranges, enums and required lists, so the API server
rejects most bad specs by itself. Rules a 1.20 structural schema cannot say (no CEL) live in
:func:`cross_field_errors` and surface as a Failed condition with reason Invalid.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from perseus_hooks.pipeline import MAX_CHUNKS, Schedule
from perseus_sidecar.validation import one_line

__all__ = [
    "CLUSTER_SCOPE",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "Condition",
    "EnergyPolicySpec",
    "EnergyPolicyStatus",
    "FrequencyRange",
    "FrontierSummary",
    "ImportProfile",
    "LabelSelector",
    "Measure",
    "MeasuredBaseline",
    "Mode",
    "Phase",
    "Pipeline",
    "PlanFailure",
    "ProfileSource",
    "SpecError",
    "StragglerStatus",
    "Stragglers",
    "cross_field_errors",
    "parse_spec",
]

GROUP = "perseus.dev"
VERSION = "v1alpha1"
KIND = "EnergyPolicy"
PLURAL = "energypolicies"

Mode = Literal["Optimize", "Observe"]
Phase = Literal["Pending", "Profiling", "Planning", "Optimizing", "Degraded", "Completed", "Failed"]
PHASES: tuple[str, ...] = (
    "Pending",
    "Profiling",
    "Planning",
    "Optimizing",
    "Degraded",
    "Completed",
    "Failed",
)
CLUSTER_SCOPE = "*cluster*"
"""The scope of profiles shared across namespaces (`profileScope: Cluster`): no namespace can be
named so, so a namespace's own profiles never mix with the shared ones."""
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
CONFIGMAP_KEY = r"^[-._a-zA-Z0-9]+$"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid"
    )


class LabelSelector(_Model):
    """Labels every pod of the training job carries (all must match)."""

    match_labels: dict[str, str] = Field(min_length=1)

    def as_query(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.match_labels.items()))

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items())


class Pipeline(_Model):
    """The job's shape: stages x dataParallel pipelines, each stage on tensorParallel GPUs.
    `interleaved-1f1b` is Megatron-LM's interleaved schedule: each stage holds `virtualStages`
    model chunks (microbatches a multiple of the stages, as Megatron-LM requires)."""

    stages: int = Field(ge=1, le=256)
    microbatches: int = Field(ge=1, le=4096)
    schedule: Schedule = "1f1b"
    virtual_stages: int = Field(
        default=1,
        ge=1,
        le=MAX_CHUNKS,
        description="model chunks per stage: 1 for 1f1b, 2 or more for interleaved-1f1b",
    )
    data_parallel: int = Field(default=1, ge=1, le=4096)
    tensor_parallel: int = Field(default=1, ge=1, le=64)

    @property
    def ranks(self) -> int:
        return self.stages * self.data_parallel * self.tensor_parallel


class FrequencyRange(_Model):
    """SM clocks to profile: every supported clock in [minMHz, maxMHz], at least stepMHz apart."""

    min_mhz: int = Field(alias="minMHz", ge=1, le=10000)
    max_mhz: int = Field(alias="maxMHz", ge=1, le=10000)
    step_mhz: int = Field(default=15, alias="stepMHz", ge=1, le=10000)


class Measure(_Model):
    """Profile through the sidecars: sweep clocks downwards from the maximum."""

    frequencies: FrequencyRange | None = None
    iterations_per_frequency: int = Field(default=3, ge=1, le=100)
    early_stop_after: int = Field(
        default=3,
        ge=1,
        le=50,
        description="stop the sweep once energy rose at this many lower clocks in a row",
    )


class ImportProfile(_Model):
    """A stage-profile CSV stored in a ConfigMap of the policy's namespace."""

    config_map: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)
    key: str = Field(default="profile.csv", min_length=1, max_length=253, pattern=CONFIGMAP_KEY)


class ProfileSource(_Model):
    """Exactly one of measure or import."""

    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["measure"]}, {"required": ["import"]}]}
    )

    measure: Measure | None = None
    import_: ImportProfile | None = Field(default=None, alias="import")


class Stragglers(_Model):
    """Straggler handling: a pipeline whose stage-0 span exceeds its plan's prediction by
    `threshold` (a fraction) for `iterations` iterations in a row is a straggler."""

    enabled: bool = True
    threshold: float = Field(default=0.05, gt=0, le=1)
    iterations: int = Field(default=3, ge=1, le=100)


class EnergyPolicySpec(_Model):
    """What to optimise and how."""

    selector: LabelSelector
    pipeline: Pipeline
    mode: Mode = "Optimize"
    suspend: bool = False
    profile_key: str = Field(
        default="default",
        min_length=1,
        max_length=63,
        pattern=DNS_SUBDOMAIN,
        description="names what makes a profile reusable (model, microbatch size, sequence length)",
    )
    profile_scope: Literal["Namespace", "Cluster"] = Field(
        default="Namespace",
        description="who shares stored profiles: policies of this namespace only, or (opt-in)"
        " every policy of the cluster that also sets Cluster",
    )
    profile: ProfileSource
    blocking_power_w: float | None = Field(
        default=None,
        alias="blockingPowerW",
        gt=0,
        le=2000,
        description="GPU power while waiting, watts; omit it to measure it while profiling",
    )
    stragglers: Stragglers = Stragglers()
    max_slowdown: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="deliberate slowdown allowed with no straggler, as a fraction of all-max time",
    )


class SpecError(ValueError):
    """A spec the operator cannot act on; the message is one line for the Invalid condition."""


def parse_spec(raw: Any) -> EnergyPolicySpec:
    """Validate a spec as read from the API server, as one readable line on failure."""
    try:
        spec = EnergyPolicySpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(one_line(exc, root="spec")) from None
    errors = cross_field_errors(spec)
    if errors:
        raise SpecError("; ".join(errors))
    return spec


def cross_field_errors(spec: EnergyPolicySpec) -> list[str]:
    """Rules spanning several fields, which a 1.20 structural schema cannot express."""
    errors: list[str] = []
    source = spec.profile
    if (source.measure is None) == (source.import_ is None):
        errors.append("spec.profile: set exactly one of measure or import")
    if spec.blocking_power_w is None and source.measure is None:
        errors.append(
            "spec.blockingPowerW: required with an imported profile (profiling measures it)"
        )
    errors += _pipeline_errors(spec.pipeline)
    if source.measure is not None and spec.pipeline.virtual_stages > 1:
        errors.append(
            "spec.profile.measure: profiling measures one row per stage; an interleaved-1f1b"
            " policy needs per-chunk rows: import them (a CSV with a chunk column)"
        )
    if source.measure is not None and source.measure.frequencies is not None:
        rng = source.measure.frequencies
        if rng.min_mhz > rng.max_mhz:
            errors.append(
                f"spec.profile.measure.frequencies: minMHz ({rng.min_mhz}) exceeds"
                f" maxMHz ({rng.max_mhz})"
            )
    return errors


def _pipeline_errors(pipeline: Pipeline) -> list[str]:
    """The schedule's rules (those of the planner's `PipelineShape`, named by spec field)."""
    v, stages, mbs = pipeline.virtual_stages, pipeline.stages, pipeline.microbatches
    if pipeline.schedule == "1f1b":
        if v != 1:
            return [
                f"spec.pipeline.virtualStages: {v} model chunks per stage need schedule"
                " interleaved-1f1b"
            ]
        return []
    errors = []
    if v < 2:
        errors.append("spec.pipeline.virtualStages: interleaved-1f1b needs 2 or more")
    if stages < 2:
        errors.append("spec.pipeline.stages: interleaved-1f1b needs 2 or more")
    elif mbs % stages:
        errors.append(
            f"spec.pipeline.microbatches: interleaved-1f1b needs a multiple of the stages"
            f" ({stages}), as Megatron-LM does; got {mbs}"
        )
    return errors


class Condition(_Model):
    """A standard Kubernetes condition."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    type: Literal["Ready", "Profiled", "Planned", "ScheduleApplied"]
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(min_length=1)
    message: str = ""
    observed_generation: int | None = None
    last_transition_time: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}
    )


class FrontierSummary(_Model):
    """A few points of the planner's frontier: never the whole frontier (etcd size limits)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    plans: int
    min_iteration_time_seconds: float
    energy_at_min_time_joules: float
    min_energy_iteration_time_seconds: float
    min_energy_joules: float
    baseline_iteration_time_seconds: float
    baseline_energy_joules: float


class StragglerStatus(_Model):
    """The straggler being followed, if any: its pipeline (data rank) and pace."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    detected: bool
    data_rank: int | None = None
    iteration_time_seconds: float | None = None
    slowdown_percent: float | None = None
    since: str | None = None


class MeasuredBaseline(_Model):
    """Energy per iteration of the whole job with every GPU at its maximum clock, measured before
    the first schedule; kept so an operator restart does not measure it again."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    energy_joules: float
    iteration_time_seconds: float
    gpus: int


class PlanFailure(_Model):
    """Planning failed for this spec generation: not tried again, even after a restart."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    generation: int
    reason: str
    message: str


class EnergyPolicyStatus(_Model):
    """What the operator observed and did; small by design."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    phase: Phase | None = None
    observed_generation: int | None = None
    conditions: list[Condition] = []
    expected_ranks: int | None = None
    registered_ranks: int | None = None
    profile_config_map: str | None = None
    frontier: FrontierSummary | None = None
    iteration_time_seconds: float | None = None
    predicted_saving_percent: float | None = None
    measured_saving_percent: float | None = None
    straggler: StragglerStatus | None = None
    measured_baseline: MeasuredBaseline | None = None
    plan_failure: PlanFailure | None = None
    blocking_power_w: float | None = Field(
        default=None,
        alias="blockingPowerW",
        description="blocking power measured while profiling, watts",
    )
