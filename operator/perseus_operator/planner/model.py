"""The energy model: each instruction's profiled (time, energy) options and the blocking-power term.

A plan with durations d_i, energies e_i and makespan T on S GPUs costs
``E = sum(e_i) + P_b * (S*T - sum(d_i)) = sum(e_i - P_b*d_i) + P_b*S*T``: each GPU draws blocking
power whenever it is not computing. So an instruction's option is worth its *effective cost*
``c = e - P_b*t``; `E - P_b*S*T` is the sum of effective costs, which no plan can push below every
instruction at its cheapest option.

Options are grouped in classes (one per stage, model chunk and instruction kind: all forwards of
a stage's chunk share a profile). Only *efficient* options are kept: sorted by time, each strictly
cheaper than every faster one. Anything else is both slower and costlier than some option, in
every plan.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt

from perseus_operator.planner.pipeline import PipelineDag, PipelineShape
from perseus_profiles import INSTRUCTIONS, ProfileError, StageProfile

__all__ = [
    "OptionTable",
    "build_options",
    "check_profile_shape",
    "option_classes",
    "sorted_unique",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class OptionTable:
    """Efficient options per class `2*unit + kind` (unit: stage * chunks + chunk), padded to a
    common width with `inf` time and cost (never chosen). Column 0 is the fastest option,
    `count[c]-1` the cheapest."""

    time_s: FloatArray  # (classes, K)
    energy_j: FloatArray
    cost_j: FloatArray  # effective cost e - P_b * t
    frequency_mhz: IntArray
    count: IntArray
    blocking_power_w: float
    max_clock_time_s: FloatArray  # (classes,) the all-max-clock option, the baseline
    max_clock_energy_j: FloatArray
    max_clock_mhz: IntArray

    @property
    def num_classes(self) -> int:
        return len(self.count)

    def hull_indices(self, c: int) -> list[int]:
        """Class c's options on the lower convex hull of its (t, c) points, fastest first."""
        return list(self._hulls[c])

    @cached_property
    def _hulls(self) -> tuple[tuple[int, ...], ...]:
        """Every class's hull, computed once: the planner asks for them hundreds of times."""
        return tuple(tuple(self._hull_of(c)) for c in range(self.num_classes))

    def _hull_of(self, c: int) -> list[int]:
        n = int(self.count[c])
        t, cost = self.time_s[c, :n], self.cost_j[c, :n]
        hull = [0]
        for k in range(1, n):
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                if (t[b] - t[a]) * (cost[k] - cost[a]) - (cost[b] - cost[a]) * (t[k] - t[a]) > 0:
                    break
                hull.pop()
            hull.append(k)
        return hull

    def relaxed_cost_j(self, cls: IntArray, duration_s: FloatArray) -> float:
        """The summed effective cost of relaxed durations (one per node of class `cls`), each on
        its class's lower convex hull."""
        total = 0.0
        for c in range(self.num_classes):
            nodes = np.nonzero(cls == c)[0]
            hull = self.hull_indices(c)
            total += float(
                np.interp(duration_s[nodes], self.time_s[c, hull], self.cost_j[c, hull]).sum()
            )
        return total

    def hull_slopes(self) -> FloatArray:
        """Every price of time (J/s) at which some class's best option under `c + price*t`
        changes: the slopes of the lower convex hulls of the (t, c) points."""
        slopes: list[float] = []
        for c in range(self.num_classes):
            hull = self.hull_indices(c)
            t, cost = self.time_s[c], self.cost_j[c]
            slopes += [
                float((cost[a] - cost[b]) / (t[b] - t[a])) for a, b in itertools.pairwise(hull)
            ]
        return sorted_unique(np.asarray(slopes, dtype=np.float64))


def check_profile_shape(profile: StageProfile, shape: PipelineShape) -> None:
    """A ProfileError (a ValueError) unless the profile has the pipeline's stages and chunks."""
    if shape.stages != profile.num_stages:
        raise ProfileError(
            f"pipeline has {shape.stages} stages but the profile has {profile.num_stages}"
        )
    if shape.virtual_stages != profile.chunks:
        hint = (
            "; split each stage evenly across its chunks (perseus plan --split-chunks) or "
            "profile every chunk"
            if profile.chunks == 1
            else ""
        )
        raise ProfileError(
            f"pipeline has {shape.virtual_stages} model chunk(s) per stage but the profile has "
            f"{profile.chunks}{hint}"
        )


def sorted_unique(values: FloatArray) -> FloatArray:
    """The distinct values, sorted. (`np.unique` imports `numpy.ma` on first use, 8 ms.)"""
    out = np.sort(values)
    keep = np.ones(len(out), dtype=bool)
    keep[1:] = out[1:] != out[:-1]
    result: FloatArray = out[keep]
    return result


def option_classes(dag: PipelineDag) -> IntArray:
    """Each node's class, the row of its options in an `OptionTable`: ``2*unit + kind``, the
    unit being the node's stage and chunk (``2*stage + kind`` with one chunk per stage)."""
    out: IntArray = 2 * dag.unit + dag.kind
    return out


def build_options(profile: StageProfile, dag: PipelineDag, blocking_power_w: float) -> OptionTable:
    """The option table of the stages the pipeline uses (its stage count must match the profile,
    and its model chunks per stage the profile's)."""
    check_profile_shape(profile, dag.shape)
    per_class: list[list[tuple[float, float, int]]] = []
    for s in range(len(profile.options)):
        for kind in range(len(INSTRUCTIONS)):
            opts = sorted(
                ((m.time_s, m.energy_j, m.frequency_mhz) for m in profile.options[s][kind]),
                key=lambda o: (o[0], o[1] - blocking_power_w * o[0]),
            )
            kept: list[tuple[float, float, int]] = []
            for t, e, f in opts:
                cost = e - blocking_power_w * t
                if not kept or cost < kept[-1][1] - blocking_power_w * kept[-1][0]:
                    kept.append((t, e, f))
            per_class.append(kept)
    width = max(len(k) for k in per_class)
    classes = len(per_class)
    time_s = np.full((classes, width), np.inf)
    energy_j = np.full((classes, width), np.inf)
    frequency = np.zeros((classes, width), dtype=np.int64)
    for c, kept in enumerate(per_class):
        arr = np.asarray(kept, dtype=np.float64)
        time_s[c, : len(kept)] = arr[:, 0]
        energy_j[c, : len(kept)] = arr[:, 1]
        frequency[c, : len(kept)] = arr[:, 2].astype(np.int64)
    cost_j = np.full((classes, width), np.inf)
    for c, kept in enumerate(per_class):
        cost_j[c, : len(kept)] = (
            energy_j[c, : len(kept)] - blocking_power_w * time_s[c, : len(kept)]
        )
    max_clock = [profile.options[c // 2][c % 2][0] for c in range(classes)]
    return OptionTable(
        time_s=time_s,
        energy_j=energy_j,
        cost_j=cost_j,
        frequency_mhz=frequency,
        count=np.asarray([len(k) for k in per_class], dtype=np.int64),
        blocking_power_w=float(blocking_power_w),
        max_clock_time_s=np.asarray([m.time_s for m in max_clock]),
        max_clock_energy_j=np.asarray([m.energy_j for m in max_clock]),
        max_clock_mhz=np.asarray([m.frequency_mhz for m in max_clock], dtype=np.int64),
    )
