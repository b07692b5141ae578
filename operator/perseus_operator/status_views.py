"""Pure helpers of the controller: runtime state and planner results as status fields and as
the views `reconcile.decide` reads; for writing the status, the conditions merged with their
history, the Events of a transition and the JSON merge patch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from perseus_operator import reconcile as rc
from perseus_operator.model import EnergyPolicySpec
from perseus_operator.planner import Frontier, Plan, stage_spans
from perseus_operator.state import PolicyRuntime
from perseus_profiles import ProfileError, StageProfile

__all__ = [
    "TIME_NOISE",
    "ImplausibleProfileError",
    "check_plausible",
    "check_profile",
    "effective_blocking_w",
    "events_between",
    "frontier_view",
    "merge_conditions",
    "merge_patch",
    "plan_view",
    "regime_name",
    "straggler_status",
]


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning `old` into `new`: keys that went are set to null at every
    level (a nested object is merged, not replaced, by the API server)."""
    patch: dict[str, Any] = {}
    for key in old.keys() | new.keys():
        before, after = old.get(key), new.get(key)
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            patch[key] = merge_patch(before, after)
        elif key not in new or after is None:
            if before is not None:
                patch[key] = None
        else:
            patch[key] = after
    return patch


def effective_blocking_w(rt: PolicyRuntime, spec: EnergyPolicySpec) -> float:
    """The spec's blocking power, else the one profiling measured (the spec requires one of
    them: an import needs blockingPowerW, a sweep that measured none fails)."""
    value = spec.blocking_power_w if spec.blocking_power_w is not None else rt.blocking_w
    return float(value or 0.0)


def regime_name(rt: PolicyRuntime) -> str:
    plan = rt.straggler_plan if rt.straggler_plan is not None else rt.plan
    if plan is None:
        return "none"
    return f"plan:{rt.straggler.straggler}:{plan.iteration_time_s:.6f}"


def straggler_status(rt: PolicyRuntime, old: Mapping[str, Any]) -> dict[str, Any]:
    state = rt.straggler
    if state.straggler is None or state.pace_s is None or rt.plan is None:
        return {"detected": False}
    previous = old.get("straggler") or {}
    since = previous.get("since") if previous.get("dataRank") == state.straggler else None
    return {
        "detected": True,
        "dataRank": state.straggler,
        "iterationTimeSeconds": round(state.pace_s, 4),
        "slowdownPercent": round(100 * (state.pace_s / rt.plan.stage0_span_s - 1), 2),
        "since": since or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


TIME_NOISE = 0.15
"""How much faster an instruction may look at a lower clock than at a higher one before the
profile is refused: measurement noise, not physics (the paper's A40 profiles reach 9.5%)."""


class ImplausibleProfileError(ProfileError):
    """A well-formed profile whose figures cannot be real measurements."""


def check_plausible(profile: StageProfile, noise: float = TIME_NOISE) -> StageProfile:
    """Refuse a profile that would steer the planner into slowing the job: an instruction whose
    time falls, beyond `noise`, as its clock falls (the planner would pick that clock as both
    faster and cheaper), or a time or energy that is not a finite positive number."""
    for s, per_instr in enumerate(profile.options):
        for name, opts in zip(("forward", "backward"), per_instr, strict=True):
            slowest_above: tuple[float, int] | None = None
            for m in opts:  # highest clock first
                for label, value in (("time", m.time_s), ("energy", m.energy_j)):
                    if not math.isfinite(value) or value <= 0:
                        raise ImplausibleProfileError(
                            f"stage {s} {name} at {m.frequency_mhz} MHz: {label} must be a"
                            f" finite positive number, got {value}"
                        )
                if slowest_above is not None and m.time_s < slowest_above[0] * (1 - noise):
                    raise ImplausibleProfileError(
                        f"stage {s} {name} takes {m.time_s:.6g} s at {m.frequency_mhz} MHz but"
                        f" {slowest_above[0]:.6g} s at {slowest_above[1]} MHz: time must not fall"
                        f" as the clock falls (more than {noise:.0%} is beyond noise)"
                    )
                if slowest_above is None or m.time_s > slowest_above[0]:
                    slowest_above = (m.time_s, m.frequency_mhz)
    return profile


def check_profile(
    profile: StageProfile, spec: EnergyPolicySpec, clocks: frozenset[int]
) -> StageProfile:
    """A profile fit for this policy: its shape, the nodes' clocks, then plausibility."""
    if profile.num_stages != spec.pipeline.stages:
        raise ProfileError(
            f"profile has {profile.num_stages} stages but spec.pipeline.stages is"
            f" {spec.pipeline.stages}"
        )
    if profile.chunks != spec.pipeline.virtual_stages:
        raise ProfileError(
            f"profile has {profile.chunks} model chunk(s) per stage but"
            f" spec.pipeline.virtualStages is {spec.pipeline.virtual_stages}"
            + (
                " (interleaved-1f1b needs per-chunk rows: a chunk column)"
                if profile.chunks == 1
                else ""
            )
        )
    unsupported = sorted(set(profile.frequencies_mhz) - clocks)
    if clocks and unsupported:
        shown = ", ".join(str(f) for f in unsupported[:5])
        more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        raise ProfileError(f"clocks {shown}{more} MHz are not supported by the nodes' GPUs")
    return check_plausible(profile)


def plan_view(profile: StageProfile, frontier: Frontier, plan: Plan) -> rc.PlanView:
    spans = stage_spans(profile, frontier.pipeline, plan.frequencies_mhz)
    return rc.PlanView(
        plan.iteration_time_s,
        plan.energy_j,
        frontier.order,
        plan.frequencies_mhz,
        spans[0][1] - spans[0][0],
    )


def frontier_view(frontier: Frontier) -> rc.FrontierView:
    star = frontier.t_star
    return rc.FrontierView(
        plans=len(frontier.plans),
        min_time_s=frontier.fastest.iteration_time_s,
        energy_at_min_time_j=frontier.fastest.energy_j,
        min_energy_time_s=star.iteration_time_s,
        min_energy_j=star.energy_j,
        baseline_time_s=frontier.t0_s,
        baseline_energy_j=frontier.baseline_energy_j,
    )


def merge_conditions(
    old: Sequence[Mapping[str, Any]], new: Sequence[rc.CondSpec], generation: int, now: str
) -> list[dict[str, Any]]:
    """Kubernetes conditions: lastTransitionTime moves only when the status flips."""
    previous = {c.get("type"): c for c in old}
    out = []
    for c in new:
        prev = previous.get(c.type)
        changed = prev is None or prev.get("status") != c.status
        since = now if changed or prev is None else prev.get("lastTransitionTime", now)
        cond: dict[str, Any] = {
            "type": c.type,
            "status": c.status,
            "reason": c.reason,
            "observedGeneration": generation,
            "lastTransitionTime": since,
        }
        if c.message:  # the Kubernetes client turns an empty string into null
            cond["message"] = c.message
        out.append(cond)
    return out


def events_between(
    old_phase: str | None,
    old: Sequence[Mapping[str, Any]],
    new_phase: str,
    new: Sequence[rc.CondSpec],
) -> list[rc.EventSpec]:
    """An event for the phase change and for each condition whose status or reason changed."""
    events: list[rc.EventSpec] = []
    warn = new_phase in ("Failed", "Degraded")
    previous = {c.get("type"): c for c in old}
    ready = next((c for c in new if c.type == "Ready"), None)
    if old_phase != new_phase:
        detail = f": {ready.reason}: {ready.message}" if ready and ready.message else ""
        events.append(
            rc.EventSpec(
                "Warning" if warn else "Normal",
                new_phase,
                f"phase {old_phase or 'none'} -> {new_phase}{detail}",
            )
        )
    for c in new:
        prev = previous.get(c.type)
        if prev is None and c.status == "Unknown":
            continue
        if prev is None or prev.get("status") != c.status or prev.get("reason") != c.reason:
            kind: Literal["Normal", "Warning"] = (
                "Warning" if warn and c.status == "False" else "Normal"
            )
            text = f"{c.type}={c.status} ({c.reason})" + (f": {c.message}" if c.message else "")
            events.append(rc.EventSpec(kind, c.reason, text))
    return events
