"""Sidecar under abuse: what one job token (event floods, a profiling session fed junk) and no
token at all (2,000 half-sent HTTP requests) can do to a real `perseus-sidecar` process
(simulated backend, 8 GPUs, loopback, the process limited to 1,024 file descriptors).

For each scenario: the sidecar's RSS (and its peak, VmHWM) and the latency of `GET /healthz` on a
fresh connection every 10 ms, as a kubelet probe would, while the abuse runs; probes that fail
count at 5 s. The baseline is the idle sidecar in the same run. Targets: RSS < 150 MB and
/healthz p99 < 50 ms under every scenario, and no half-sent request held past the header timeout.

    .venv/bin/python bench/sidecar_abuse.py [--header-timeout-s 2] [--slowloris 2000]
    .venv/bin/python bench/sidecar_abuse.py --unguarded   # limits off: the picture before them
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import multiprocessing as mp
import resource
import select
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx


def _load_base() -> ModuleType:
    """bench/sidecar.py (the process, the job, the ranks), under a name of its own: the repo's
    sidecar/ folder would shadow a plain `import sidecar`."""
    spec = importlib.util.spec_from_file_location(
        "bench_sidecar", Path(__file__).with_name("sidecar.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_sidecar"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


base = _load_base()

PROBE_TIMEOUT_S = 5.0
LOG_BYTES = [0]
"""Bytes the sidecar wrote to stderr so far (its JSON log)."""


class Prober:
    """GET /healthz on a new connection every `interval_s`, in a thread; latencies in ms."""

    def __init__(self, port: int, interval_s: float = 0.01) -> None:
        self.port = port
        self.interval_s = interval_s
        self.samples_ms: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=PROBE_TIMEOUT_S)
                conn.request("GET", "/healthz")
                ok = conn.getresponse().status == 200
                conn.close()
            except OSError:
                ok = False
            elapsed_ms = (time.perf_counter() - t0) * 1000
            if not ok:
                self.failures += 1
                elapsed_ms = PROBE_TIMEOUT_S * 1000
            self.samples_ms.append(elapsed_ms)
            self._stop.wait(max(0.0, self.interval_s - elapsed_ms / 1000))

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def quantile_ms(self, q: float) -> float:
        ordered = sorted(self.samples_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# ---- abusers (separate processes) ---------------------------------------------------------


def _event_flood(port: int, rank_id: str, lines: int, distinct: bool, done: Any) -> None:
    """One rank's TCP stream: `lines` events with no iteration end; `distinct`: every forward
    opens a new microbatch, else microbatch 0 begins and ends over and over."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"PERSEUS1 {rank_id} {base.JOB_TOKEN}\n".encode())
    assert s.makefile("rb").readline().startswith(b"OK")
    t = time.time_ns()
    chunk = 20_000
    for start in range(0, lines, chunk):
        if distinct:
            data = "".join(f"FB {m % 1_000_000} {t}\n" for m in range(start, start + chunk))
        else:
            data = f"FB 0 {t}\nFE 0 {t + 1}\n" * (chunk // 2)
        s.sendall(data.encode())
    s.sendall(b"FB 0 1\n")  # a last line, then wait until everything was read
    s.shutdown(socket.SHUT_WR)
    s.settimeout(600)
    while s.recv(4096):
        pass
    done.put(1)


def _profiling_feed(port: int, rank_id: str, iterations: int, done: Any) -> None:
    """Full iterations of 8 microbatches as fast as the socket takes them."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"PERSEUS1 {rank_id} {base.JOB_TOKEN}\n".encode())
    f = s.makefile("rb")
    assert f.readline().startswith(b"OK")
    t = time.time_ns()
    one = "".join(
        f"FB {m} {{t}}\nFE {m} {{t1}}\nBB {m} {{t2}}\nBE {m} {{t3}}\n"
        for m in range(base.MICROBATCHES)
    )
    for i in range(0, iterations, 100):
        batch = []
        for k in range(100):
            now = t + (i + k) * 10_000_000
            batch.append(
                one.format(t=now, t1=now + 1_000_000, t2=now + 2_000_000, t3=now + 3_000_000)
            )
            batch.append(f"IE -1 {now + 4_000_000}\n")
        s.sendall("".join(batch).encode())
    s.shutdown(socket.SHUT_WR)  # the server closes once it has read everything
    s.settimeout(600)
    while s.recv(4096):
        pass
    done.put(1)


def _slowloris(port: int, count: int, hold_s: float, result: Any) -> None:
    """Open `count` connections from 127.0.0.2 (the attacker's own pod address; the probes come
    from 127.0.0.1, as the kubelet's from the node's) that each send half a request and never
    finish it; report how many the server closed at once (caps) and after a while (timeout)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 256), hard))
    pending: list[socket.socket] = []
    for _ in range(count):  # non-blocking: a server that stopped accepting cannot stall us
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        pending.append(s)
    socks: list[socket.socket] = []
    refused = 0
    give_up = time.monotonic() + 10
    poller = select.poll()
    by_fd = {s.fileno(): s for s in pending}
    for fd in by_fd:
        poller.register(fd, select.POLLOUT)
    while pending and time.monotonic() < give_up:
        for fd, _ in poller.poll(100):
            poller.unregister(fd)
            s = by_fd[fd]
            pending.remove(s)
            try:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                    raise OSError
                s.send(b"GET /healthz HTTP/1.1\r\nHost: sidecar\r\nX-Slow: ")
                socks.append(s)
            except OSError:
                refused += 1
                s.close()
    refused += len(pending)
    for s in pending:
        s.close()
    opened = time.monotonic()
    closed_at: dict[int, float] = {}
    deadline = opened + hold_s
    while time.monotonic() < deadline and len(closed_at) < len(socks):
        for i, s in enumerate(socks):
            if i in closed_at:
                continue
            try:
                if s.recv(1) == b"":
                    closed_at[i] = time.monotonic() - opened
            except BlockingIOError:
                pass
            except OSError:
                closed_at[i] = time.monotonic() - opened
        time.sleep(0.05)
    for s in socks:
        s.close()
    times = sorted(closed_at.values())
    at_once = sum(1 for t in times if t < 0.5)
    result.put((len(socks), refused, at_once, len(times) - at_once, times[-1] if times else None))


# ---- scenarios ----------------------------------------------------------------------------


@contextmanager
def limited_sidecar(state: Path, extra: list[str]) -> Iterator[Any]:
    """bench/sidecar.py's process, with 1,024 file descriptors and these extra flags."""
    original = base.subprocess.Popen

    def popen(cmd: list[str], **kwargs: Any) -> Any:
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

        proc = original([*cmd, *extra], preexec_fn=limit, stderr=base.subprocess.PIPE, **kwargs)

        def count() -> None:  # the sidecar's log volume, without keeping it
            while chunk := proc.stderr.read(1 << 16):
                LOG_BYTES[0] += len(chunk)

        threading.Thread(target=count, daemon=True).start()
        return proc

    base.subprocess.Popen = popen
    try:
        with base.sidecar(state) as sc:
            yield sc
    finally:
        base.subprocess.Popen = original


def measure(
    sc: Any, port: int, name: str, action: Callable[[], str], baseline: dict[str, float]
) -> dict[str, float]:
    log_before = LOG_BYTES[0]
    with Prober(port) as probe:
        note = action()
    rss, hwm = sc.rss_mb()
    logged_kb = (LOG_BYTES[0] - log_before) / 1024
    row = {
        "rss": rss,
        "hwm": hwm,
        "p50": probe.quantile_ms(0.5),
        "p99": probe.quantile_ms(0.99),
        "max": max(probe.samples_ms, default=float("nan")),
        "fail": probe.failures,
        "n": len(probe.samples_ms),
    }
    ratio = f"  p99 x{row['p99'] / baseline['p99']:.1f}" if baseline else ""
    print(
        f"{name:<44} RSS {rss:6.1f} MB (peak {hwm:6.1f})  /healthz p50 {row['p50']:6.2f} ms  "
        f"p99 {row['p99']:7.2f} ms  max {row['max']:7.1f} ms  failed {row['fail']}/{row['n']}"
        f"{ratio}  log {logged_kb:.0f} kB  {note}",
        flush=True,
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--header-timeout-s", type=float, default=2.0)
    parser.add_argument("--slowloris", type=int, default=2000, help="half-sent requests")
    parser.add_argument("--distinct", type=int, default=1_000_000, help="open microbatches sent")
    parser.add_argument("--repeats", type=int, default=3_000_000, help="events with no IE")
    parser.add_argument("--profiling-iterations", type=int, default=10_000)
    parser.add_argument(
        "--unguarded", action="store_true", help="connection limits off (header timeout 1 h)"
    )
    args = parser.parse_args()
    extra = ["--http-header-timeout-s", str(args.header_timeout_s)]
    if args.unguarded:
        extra = [
            "--http-header-timeout-s=3600",
            "--http-max-connections=100000",
            "--http-max-connections-per-ip=100000",
        ]
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, limited_sidecar(Path(tmp), extra) as sc:
        port = int(sc.base.rsplit(":", 1)[1])
        rank_ids = base.setup_job(sc)
        op = base.OP

        def idle() -> str:
            time.sleep(3)
            return ""

        baseline = measure(sc, port, "baseline (idle, 8 ranks registered)", idle, {})
        rows = {}

        def flood(distinct: bool, lines: int) -> Callable[[], str]:
            def run() -> str:
                done = ctx.Queue()
                p = ctx.Process(
                    target=_event_flood, args=(sc.event_port, rank_ids[0], lines, distinct, done)
                )
                t0 = time.monotonic()
                p.start()
                done.get(timeout=900)
                p.join()
                return f"({lines / (time.monotonic() - t0) / 1000:.0f}k events/s)"

            return run

        rows["distinct"] = measure(
            sc, port, f"{args.distinct:,} distinct open microbatches", flood(True, args.distinct),
            baseline,
        )  # fmt: skip
        rows["repeats"] = measure(
            sc, port, f"{args.repeats:,} events, no iteration end", flood(False, args.repeats),
            baseline,
        )  # fmt: skip

        def timings() -> str:
            t0 = time.perf_counter()
            r = sc.http.get(f"/v1/jobs/{base.NS}/{base.JOB}/timings?window_s=86400", headers=op)
            r.raise_for_status()
            dropped = sum(x["events_dropped"] for x in r.json()["ranks"])
            return f"(GET timings {1000 * (time.perf_counter() - t0):.0f} ms; {dropped:,} dropped)"

        rows["timings"] = measure(sc, port, "GET timings after the floods", timings, baseline)

        def profile() -> str:
            clocks = sc.http.get("/v1/gpus", headers=op).json()["gpus"][0]
            freqs = clocks["supported_sm_clocks_mhz"][:4]
            body = {
                "frequencies_mhz": freqs,
                "iterations_per_frequency": 2_000,
                "warmup_iterations": 0,
            }
            url = f"/v1/jobs/{base.NS}/{base.JOB}/profiling"
            sc.http.post(url, json=body, headers=op).raise_for_status()
            done = ctx.Queue()
            p = ctx.Process(
                target=_profiling_feed,
                args=(sc.event_port, rank_ids[1], args.profiling_iterations, done),
            )
            p.start()
            done.get(timeout=900)
            p.join()
            t0 = time.perf_counter()
            status = sc.http.get(url, headers=op).json()
            took_ms = 1000 * (time.perf_counter() - t0)
            sc.http.delete(url, headers=op)
            events = args.profiling_iterations * (4 * base.MICROBATCHES + 1)
            found = len(status["measurements"])
            return f"({events:,} events; status {took_ms:.0f} ms, {found} measurements)"

        rows["profiling"] = measure(
            sc, port, "profiling session fed at full speed", profile, baseline
        )

        def slowloris() -> str:
            result = ctx.Queue()
            hold_s = args.header_timeout_s + 3 if not args.unguarded else 8
            p = ctx.Process(target=_slowloris, args=(port, args.slowloris, hold_s, result))
            p.start()
            opened, refused, at_once, later, last_s = result.get(timeout=600)
            p.join()
            last = f"{last_s:.1f} s" if last_s is not None else "-"
            held = opened - at_once - later
            return (
                f"({opened} connected, {refused} failed to connect; the server closed {at_once} "
                f"at once (caps) and {later} later (timeout, last at {last}); {held} still "
                f"open after {hold_s:.0f} s)"
            )

        rows["slowloris"] = measure(
            sc, port, f"{args.slowloris:,} half-sent HTTP requests", slowloris, baseline
        )
        worst_rss = max(r["hwm"] for r in rows.values())
        worst_p99 = max(r["p99"] for r in rows.values())
        print(
            f"\nworst peak RSS {worst_rss:.1f} MB (target < 150), worst /healthz p99 "
            f"{worst_p99:.2f} ms (target < 50), baseline p99 {baseline['p99']:.2f} ms",
            flush=True,
        )
        httpx.get(f"{sc.base}/healthz", timeout=5).raise_for_status()
    return 0


if __name__ == "__main__":
    sys.exit(main())
