"""What one job token can make the sidecar hold is bounded by the announced pipeline shape:
events beyond it are dropped and counted (metrics, timings), completed iterations are kept up to
an instruction budget, profiling keeps a capped sample, and the energy estimator's memory grows
with instructions + counter updates, not their product. Counts, never wall clock."""

from __future__ import annotations

import itertools
import time
import tracemalloc
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from perseus_sidecar import profiling, ranks
from perseus_sidecar.estimator import estimate_energy
from perseus_sidecar.ranks import BACKWARD_BEGIN, BACKWARD_END, FORWARD_BEGIN, FORWARD_END

from .conftest import JOB, NAME, NS, OP, announce, node_of, register


def _post(client: TestClient, rank_id: str, events: list[tuple[str, int]]) -> None:
    t = time.time_ns()
    body = {
        "events": [{"kind": k, "microbatch": m, "t_ns": t + i} for i, (k, m) in enumerate(events)]
    }
    r = client.post(f"/v1/ranks/{rank_id}/events", json=body, headers=JOB)
    assert r.status_code == 200, r.text


def test_events_beyond_the_announced_shape_are_dropped_and_counted(client: TestClient) -> None:
    announce(client, microbatches=4)
    rank_id = register(client)
    rank = node_of(client).ranks[rank_id]
    # 5,000 distinct open microbatches: only 0..3 exist in a 4-microbatch pipeline.
    _post(client, rank_id, [("FB", m) for m in range(5000)])
    assert len(rank.open_forward) == 4
    assert rank.events_dropped == 4996
    # Forward 0 finished 1,000 times without an iteration end: 4 per iteration at most.
    _post(client, rank_id, [e for _ in range(1000) for e in (("FB", 0), ("FE", 0))])
    assert len(rank.cur_forward) == 4
    assert rank.events_dropped == 4996 + 996
    text = client.get("/metrics").text
    assert 'perseus_sidecar_events_dropped_total{reason="microbatch-out-of-range"} 4996.0' in text
    assert 'perseus_sidecar_events_dropped_total{reason="iteration-overflow"} 996.0' in text
    timings = client.get(f"/v1/jobs/{NS}/{NAME}/timings", headers=OP).json()
    assert timings["ranks"][0]["events_dropped"] == 5992


def test_without_a_shape_the_node_limit_applies(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_microbatches=8)
    announce(client)
    rank_id = register(client)
    _post(client, rank_id, [("BB", m) for m in range(100)])
    assert len(node_of(client).ranks[rank_id].open_backward) == 8


def test_history_keeps_an_instruction_budget(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ranks, "HISTORY_INSTRUCTIONS", 50)
    announce(client, microbatches=4)
    rank_id = register(client)
    rank = node_of(client).ranks[rank_id]
    t = 0
    for _ in range(30):  # 30 iterations of 4 forwards + 4 backwards
        for m in range(4):
            for code in (FORWARD_BEGIN, FORWARD_END, BACKWARD_BEGIN, BACKWARD_END):
                t += 1000
                rank.on_event(code, m, t)
        rank.on_event(ranks.ITERATION_END, -1, t)
    kept = sum(len(r.forward_s) + len(r.backward_s) for r in rank.history)
    assert kept <= 50 and len(rank.history) == 6
    assert rank._history_instructions == kept


def test_profiling_keeps_a_capped_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profiling, "MAX_INSTRUCTIONS", 10)
    monkeypatch.setattr(profiling, "MAX_SAMPLES", 3)
    rp = profiling.RankProfiling("GPU", 0, (1410,), 0, 1, 1e-9)
    rp.end_iteration(0)
    for i in range(100):
        rp.record_instruction(True, 10 + i, 11 + i)
        rp.record_energy(i)
    assert len(rp.instructions) == 10
    assert len(rp.samples) == 3


def _reference(
    instructions: list[tuple[bool, int, int]], samples: list[tuple[int, int]]
) -> list[tuple[float, float, float]]:
    """Per counter window: summed forward and backward fractions and idle ns, by brute force."""
    out = []
    for (a, _), (b, _) in itertools.pairwise(samples):
        f = g = busy = 0.0
        for fwd, s, e in instructions:
            overlap = max(0, min(e, b) - max(s, a))
            busy += overlap
            if fwd:
                f += overlap / max(e - s, 1)
            else:
                g += overlap / max(e - s, 1)
        out.append((f, g, max(0.0, (b - a) - busy)))
    return out


def test_estimator_solves_the_windows_it_is_given() -> None:
    """Energies built from known per-instruction values over the brute-force windows come
    back exactly: the cumulative-sum design matrix equals the pairwise one."""
    t0 = 1_700_000_000_000_000_000
    instructions, t = [], t0
    for i in range(60):
        d = 40_000_000 + 7_000_000 * (i % 5)
        instructions.append((i % 3 != 0, t, t + d))
        t += d + 3_000_000 * (i % 4)
    times = list(range(t0 - 5_000_000, t + 50_000_000, 23_000_000))
    windows = _reference(instructions, [(x, 0) for x in times])
    energy_mj, samples = 0.0, [(times[0], 0)]
    for (f, g, idle_ns), x in zip(windows, times[1:], strict=True):
        energy_mj += (f * 30.0 + g * 55.0 + idle_ns * 1e-9 * 80.0) * 1000
        samples.append((x, round(energy_mj)))
    est = estimate_energy(instructions, samples)
    assert est is not None
    assert est.forward_j == pytest.approx(30.0, rel=1e-3)
    assert est.backward_j == pytest.approx(55.0, rel=1e-3)
    assert est.idle_w == pytest.approx(80.0, rel=1e-2)


def test_estimator_memory_grows_with_the_sum_not_the_product() -> None:
    """3,000 instructions x 3,000 counter updates: a pairwise matrix is 72 MB per array."""
    n = 3000
    instructions = [(i % 2 == 0, i * 100_000_000, i * 100_000_000 + 90_000_000) for i in range(n)]
    samples = [(k * 100_000_000 + 5, k * 7000 + (k % 3)) for k in range(n)]
    tracemalloc.start()
    try:
        estimate_energy(instructions, samples)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20
