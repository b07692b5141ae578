"""Per-call cost of the training hooks on the training thread (target: under 50 us per call).

Measures `instruction_begin`/`instruction_end` pairs against the tests' fake sidecar (it speaks
the sidecar's side of the hooks' contract), against no sidecar at all (down: events buffered and
dropped), and, as the baseline in the same process, a plain Python method call and the disabled
(no-op) hooks. Prints mean/p50/p99/max per call in microseconds and the ratio to the baseline.

    .venv/bin/python bench/hooks.py [--calls 200000]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import perseus_hooks as hooks
from perseus_hooks import InstructionKind

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fake sidecar of the tests
from tests.sidecar.fake_sidecar import FakeSidecar

TOKEN = "bench-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _measure(
    begin: Callable[[InstructionKind, int], None],
    end: Callable[[InstructionKind, int], None],
    calls: int,
    gap_s: float = 0.0,
) -> list[float]:
    """Per-call times in microseconds (each begin and each end timed separately), less the
    timer's own cost. With `gap_s`, the thread sleeps between pairs, as a training thread waits
    in GPU/C++ code with the GIL released (the sender then runs in between)."""
    samples: list[float] = []
    clock = time.perf_counter_ns
    for m in range(calls // 2):
        t0 = clock()
        begin("forward", m)
        t1 = clock()
        end("forward", m)
        t2 = clock()
        samples.append((t1 - t0) / 1000)
        samples.append((t2 - t1) / 1000)
        if gap_s:
            time.sleep(gap_s)
    # Remove the timer's own cost, measured the same way.
    overhead = statistics.median((-clock() + clock()) / -1000 for _ in range(10000))
    return [max(s - overhead, 0.0) for s in samples]


def _summary(name: str, samples: list[float], baseline_us: float | None) -> float:
    ordered = sorted(samples)
    mean = statistics.fmean(samples)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[int(len(ordered) * 0.99)]
    ratio = f"{mean / baseline_us:7.1f}x" if baseline_us else "   base "
    print(
        f"{name:<34} mean {mean:7.2f} us  p50 {p50:7.2f}  p99 {p99:7.2f}  "
        f"max {ordered[-1]:9.1f}  {ratio}"
    )
    return mean


class _Plain:
    def begin(self, kind: InstructionKind, microbatch: int) -> None:
        return None

    def end(self, kind: InstructionKind, microbatch: int) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    calls = args.calls

    plain = _Plain()
    base = _summary("baseline: empty method call", _measure(plain.begin, plain.end, calls), None)
    noop = hooks.Hooks(None, sync=None)
    noop_samples = _measure(noop.instruction_begin, noop.instruction_end, calls)
    _summary("hooks disabled (no sidecar host)", noop_samples, base)

    sink = FakeSidecar(token=TOKEN, record_events=False).start()

    live = hooks.register(
        rank=0, pipeline_rank=0, data_rank=0, gpu_uuid="GPU-bench", host="127.0.0.1",
        port=sink.http_port, job_token=TOKEN, sync=None, make_default=False,
    )  # fmt: skip
    if not live.wait_connected(5):
        raise SystemExit("bench: could not connect to the local event sink")
    live_mean = _summary(
        "hooks streaming to a local sink",
        _measure(live.instruction_begin, live.instruction_end, calls),
        base,
    )
    live.flush(30)
    print(
        f"  burst of {calls} calls back to back: {live.dropped_events} dropped beyond the "
        f"{8192}-event buffer"
    )
    paced_calls = min(calls, 20_000)
    paced_mean = _summary(
        "  same, paced: 1 pair per 100 us",
        _measure(live.instruction_begin, live.instruction_end, paced_calls, gap_s=100e-6),
        base,
    )
    live.flush(30)
    before = live.dropped_events
    live.close()
    dropped = live.dropped_events - before
    print(f"  sink saw {sink.lines_received} events in all; paced run dropped {dropped}")
    sink.stop()

    down = hooks.register(
        rank=0, pipeline_rank=0, data_rank=0, gpu_uuid="GPU-bench", host="127.0.0.1",
        port=_free_port(), job_token=TOKEN, sync=None, make_default=False,
    )  # fmt: skip
    _summary(
        "hooks with the sidecar down",
        _measure(down.instruction_begin, down.instruction_end, calls),
        base,
    )
    print(f"  dropped while down (bounded buffer): {down.dropped_events}")
    down.close(0.1)
    worst = max(live_mean, paced_mean)
    verdict = "meets" if worst < 50 else "MISSES"
    print(f"per-call cost (worst mean of the live runs) {worst:.2f} us {verdict} the 50 us budget")


if __name__ == "__main__":
    main()
