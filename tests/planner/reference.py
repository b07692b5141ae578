"""An independent reference for tests: plan cost by memoised recursion over the 1F1B rules, written
from DESIGN.md without the planner's DAG code, plus brute force over tiny pipelines."""

from __future__ import annotations

import itertools
from functools import cache

from perseus_profiles import Measurement, StageProfile


def order_1f1b(stages: int, microbatches: int) -> list[list[tuple[str, int]]]:
    out = []
    for s in range(stages):
        warm = min(stages - s - 1, microbatches)
        seq = [("F", m) for m in range(warm)]
        nf, nb = warm, 0
        while nf < microbatches:
            seq += [("F", nf), ("B", nb)]
            nf, nb = nf + 1, nb + 1
        seq += [("B", m) for m in range(nb, microbatches)]
        out.append(seq)
    return out


def cost(
    profile: StageProfile,
    microbatches: int,
    blocking_w: float,
    freqs: list[list[int]] | tuple[tuple[int, ...], ...],
) -> tuple[float, float]:
    stages = profile.num_stages
    order = order_1f1b(stages, microbatches)
    where = {(s, k, m): p for s in range(stages) for p, (k, m) in enumerate(order[s])}

    def meas(s: int, p: int) -> Measurement:
        kind = 0 if order[s][p][0] == "F" else 1
        return next(x for x in profile.options[s][kind] if x.frequency_mhz == freqs[s][p])

    @cache
    def finish(s: int, p: int) -> float:
        k, m = order[s][p]
        ready = finish(s, p - 1) if p > 0 else 0.0
        other = (s - 1, k, m) if k == "F" else (s + 1, k, m)
        if other in where:
            ready = max(ready, finish(other[0], where[other]))
        return ready + meas(s, p).time_s

    t = max(finish(s, len(order[s]) - 1) for s in range(stages))
    busy = sum(meas(s, p).time_s for s in range(stages) for p in range(len(order[s])))
    energy = sum(meas(s, p).energy_j for s in range(stages) for p in range(len(order[s])))
    return t, energy + blocking_w * (stages * t - busy)


def brute_force_useful(
    profile: StageProfile, microbatches: int, blocking_w: float
) -> list[tuple[float, float]]:
    """Every plan's (time, energy); keep those whose energy - P_b*S*t beats all faster plans."""
    stages = profile.num_stages
    order = order_1f1b(stages, microbatches)
    slots = [(s, p) for s in range(stages) for p in range(len(order[s]))]
    choices = [
        [m.frequency_mhz for m in profile.options[s][0 if order[s][p][0] == "F" else 1]]
        for s, p in slots
    ]
    points = []
    for combo in itertools.product(*choices):
        freqs = [[0] * len(order[s]) for s in range(stages)]
        for (s, p), f in zip(slots, combo, strict=True):
            freqs[s][p] = f
        points.append(cost(profile, microbatches, blocking_w, freqs))
    points.sort()
    idle_w = blocking_w * stages
    out: list[tuple[float, float]] = []
    for t, e in points:
        if not out or e - idle_w * t < out[-1][1] - idle_w * out[-1][0] - 1e-9:
            if out and abs(t - out[-1][0]) < 1e-12:
                out.pop()
            out.append((t, e))
    return out


# ---- interleaved 1F1B, written from Megatron-LM's schedule loop -------------------------------


def order_interleaved(
    stages: int, microbatches: int, chunks: int
) -> list[list[tuple[str, int, int]]]:
    """Each stage's (kind, microbatch, chunk) sequence, as Megatron-LM's
    `forward_backward_pipelining_with_interleaving` steps through it: a virtual microbatch
    counter per direction, mapped to a model chunk (backwards reversed) and a microbatch."""
    total = microbatches * chunks

    def chunk_of(k: int, forward: bool) -> int:
        in_group = k % (stages * chunks)
        c = in_group // stages
        return c if forward else chunks - c - 1

    def microbatch_of(k: int) -> int:
        group, rest = divmod(k, stages * chunks)
        return group * stages + rest % stages

    out = []
    for rank in range(stages):
        if microbatches == stages:
            warmup = total
        else:
            warmup = min((stages - rank - 1) * 2 + (chunks - 1) * stages, total)
        seq: list[tuple[str, int, int]] = []
        fwd = bwd = 0
        for _ in range(warmup):
            seq.append(("F", microbatch_of(fwd), chunk_of(fwd, True)))
            fwd += 1
        for _ in range(total - warmup):
            seq.append(("F", microbatch_of(fwd), chunk_of(fwd, True)))
            fwd += 1
            seq.append(("B", microbatch_of(bwd), chunk_of(bwd, False)))
            bwd += 1
        while bwd < total:
            seq.append(("B", microbatch_of(bwd), chunk_of(bwd, False)))
            bwd += 1
        out.append(seq)
    return out


def cost_interleaved(
    profile: StageProfile,
    microbatches: int,
    blocking_w: float,
    freqs: list[list[int]] | tuple[tuple[int, ...], ...],
) -> tuple[float, float]:
    """Exact (time, energy) of an interleaved plan: a microbatch's forward visits the model's
    pieces in order (stage 0 chunk 0, stage 1 chunk 0, ..., the last stage's last chunk), the
    backward in reverse; each stage runs its own sequence in order."""
    stages, chunks = profile.num_stages, profile.chunks
    order = order_interleaved(stages, microbatches, chunks)
    where = {(s, k, m, c): p for s in range(stages) for p, (k, m, c) in enumerate(order[s])}

    def meas(s: int, p: int) -> Measurement:
        k, _, c = order[s][p]
        opts = profile.options[s * chunks + c][0 if k == "F" else 1]
        return next(x for x in opts if x.frequency_mhz == freqs[s][p])

    @cache
    def finish(s: int, p: int) -> float:
        k, m, c = order[s][p]
        ready = finish(s, p - 1) if p > 0 else 0.0
        piece = c * stages + s + (-1 if k == "F" else 1)
        if 0 <= piece < stages * chunks:
            other = (piece % stages, k, m, piece // stages)
            ready = max(ready, finish(other[0], where[other]))
        if k == "B":  # the backward needs this piece's own forward (same stage)
            ready = max(ready, finish(s, where[(s, "F", m, c)]))
        return ready + meas(s, p).time_s

    t = max(finish(s, len(order[s]) - 1) for s in range(stages))
    busy = sum(meas(s, p).time_s for s in range(stages) for p in range(len(order[s])))
    energy = sum(meas(s, p).energy_j for s in range(stages) for p in range(len(order[s])))
    return t, energy + blocking_w * (stages * t - busy)


def brute_force_useful_interleaved(
    profile: StageProfile, microbatches: int, blocking_w: float
) -> list[tuple[float, float]]:
    """`brute_force_useful` for an interleaved pipeline (every plan enumerated)."""
    stages, chunks = profile.num_stages, profile.chunks
    order = order_interleaved(stages, microbatches, chunks)
    slots = [(s, p) for s in range(stages) for p in range(len(order[s]))]
    choices = [
        [
            m.frequency_mhz
            for m in profile.options[s * chunks + order[s][p][2]][0 if order[s][p][0] == "F" else 1]
        ]
        for s, p in slots
    ]
    points = []
    for combo in itertools.product(*choices):
        freqs = [[0] * len(order[s]) for s in range(stages)]
        for (s, p), f in zip(slots, combo, strict=True):
            freqs[s][p] = f
        points.append(cost_interleaved(profile, microbatches, blocking_w, freqs))
    return _useful(points, blocking_w * stages)


def _useful(points: list[tuple[float, float]], idle_w: float) -> list[tuple[float, float]]:
    points.sort()
    out: list[tuple[float, float]] = []
    for t, e in points:
        if not out or e - idle_w * t < out[-1][1] - idle_w * out[-1][0] - 1e-9:
            if out and abs(t - out[-1][0]) < 1e-12:
                out.pop()
            out.append((t, e))
    return out
