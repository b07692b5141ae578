"""Run the planner where its memory cannot take the operator down: a child process
(`plan_worker`) with an address-space limit and a deadline.

A policy's pipeline can ask for more memory or time than the operator has (the planner's needs
grow with stages x microbatches); in the operator's own process that is an OOM kill and, after
the restart, the same plan again. Here it is a :class:`PlanningError` with a one-line message.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from perseus_operator.plan_worker import CODE_BASE, EXIT_OUT_OF_MEMORY, EXIT_REFUSED
from perseus_operator.planner import Frontier, PipelineShape, Plan, instruction_order
from perseus_profiles import StageProfile

__all__ = ["Planner", "PlanningError", "plan_in_subprocess"]

Planner = Callable[[StageProfile, PipelineShape, float], Awaitable[Frontier]]
"""(profile, pipeline shape, blocking power W) -> frontier, or PlanningError."""

# One thread each, and few malloc arenas: virtual reservations (OpenBLAS buffers per core, 64 MB
# arenas per thread) would otherwise count against the address-space limit on a big node.
_CHILD_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
}


class PlanningError(Exception):
    """Planning failed; `reason` and `message` go into the Planned condition."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


async def plan_in_subprocess(
    profile: StageProfile,
    shape: PipelineShape,
    blocking_power_w: float,
    *,
    memory_mib: int,
    timeout_s: float,
) -> Frontier:
    """The frontier, computed in a child limited to `memory_mib` MiB of address space and
    `timeout_s` seconds (killed past it; also when the caller is cancelled)."""
    request = json.dumps(
        {
            "profile_csv": profile.to_csv(),
            "stages": shape.stages,
            "microbatches": shape.microbatches,
            "schedule": shape.schedule,
            "virtual_stages": shape.virtual_stages,
            "blocking_power_w": blocking_power_w,
        }
    ).encode()
    size = f"{shape.stages} stages x {shape.microbatches} microbatches"
    if shape.virtual_stages > 1:
        size += f" x {shape.virtual_stages} model chunks"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "perseus_operator.plan_worker",
        str(memory_mib),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **_CHILD_ENV},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(request), timeout_s)
    except TimeoutError:
        raise PlanningError(
            "PlanningFailed",
            f"the planner did not finish {size} within {timeout_s:g} s"
            " (PERSEUS_OPERATOR_PLANNER_TIMEOUT_S)",
        ) from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    code = proc.returncode
    assert code is not None  # communicate() returned: the child has exited
    lines = err.decode(errors="replace").strip().splitlines()
    last = lines[-1][:300] if lines else ""
    if code == 0:
        return await asyncio.to_thread(_frontier, out, profile, shape, blocking_power_w)
    if code == EXIT_REFUSED:
        raise PlanningError("PlanningFailed", f"the planner refused: {last}")
    if code in (EXIT_OUT_OF_MEMORY, -signal.SIGKILL):
        raise PlanningError(
            "PlanningFailed",
            f"the planner ran out of memory planning {size} (limit {memory_mib} MiB,"
            " PERSEUS_OPERATOR_PLANNER_MEMORY_MIB)",
        )
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    raise PlanningError("PlanningFailed", f"the planner failed ({how}): {last or 'no message'}")


def _frontier(
    out: bytes, profile: StageProfile, shape: PipelineShape, blocking_power_w: float
) -> Frontier:
    """The child's answer as a Frontier. Our own process wrote it, so this checks the structure
    (cheaply), not every plan's cost (`frontier_io.load_frontier` does that for files)."""
    try:
        doc = json.loads(out)
        # The profile's own int objects: every plan shares them.
        decode = {CODE_BASE + i: f for i, f in enumerate(profile.frequencies_mhz)}
        order = instruction_order(shape)
        plans = tuple(_plan(raw, decode, order) for raw in doc["plans"])
        t0_s, e0_j = _positive(doc["t0_s"]), _positive(doc["baseline_energy_j"])
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise PlanningError("PlanningFailed", f"the planner's answer is malformed: {exc}") from None
    if not plans:
        raise PlanningError("PlanningFailed", "the planner returned no plan")
    return Frontier(shape, blocking_power_w, order, plans, t0_s, e0_j)


def _positive(value: Any) -> float:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{value!r} is not a positive number")
    return float(value)


def _plan(raw: Any, decode: dict[int, int], order: tuple[tuple[str, ...], ...]) -> Plan:
    time_s, energy_j, rows = raw
    if len(rows) != len(order) or any(len(r) != len(o) for r, o in zip(rows, order, strict=True)):
        raise ValueError("a plan's clocks do not match the instruction order")
    clocks = tuple(tuple(map(decode.__getitem__, map(ord, row))) for row in rows)
    return Plan(_positive(time_s), _positive(energy_j), clocks)
