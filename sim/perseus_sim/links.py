"""How a simulated rank meets its pipeline neighbours: activations go downstream, gradients
upstream, each carrying the timeline instant its instruction ended; then every rank meets the
others at the per-iteration all-reduce barrier.

`Links` is what the trainer's rank loop needs within an iteration; `QueueLinks` is the
in-process implementation (ranks as threads of one `SimTrainer`), with `Barrier` as the
all-reduce; `perseus_sim.tcp_links` carries the same over TCP between rank processes
(`perseus sim-train rank`), whose barrier is the coordinator's start/arrive exchange.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable
from typing import Protocol

from perseus_hooks.pipeline import upstream

__all__ = ["Barrier", "Links", "QueueLinks", "StoppedError"]

_CHUNK_S = 0.1
"""Longest uninterrupted wait, so a stop request is noticed promptly."""


class StoppedError(Exception):
    """The run (or, across processes, the current attempt at an iteration) was stopped."""


class Links(Protocol):
    def receive(self, forward: bool, microbatch: int, chunk: int = 0) -> float:
        """The timeline end of the instruction this one depends on in the neighbouring model
        piece (the activation for a forward, the gradient for a backward); -inf when there is
        none (the first piece's forwards, the last piece's backwards). Blocks until it arrives.
        `chunk` is the model chunk of this stage (interleaved 1F1B; 0 otherwise)."""
        ...

    def send(self, forward: bool, microbatch: int, end: float, chunk: int = 0) -> None:
        """This stage's instruction ended at `end`: pass the activation on (forward) or the
        gradient back (backward), where there is a neighbour to receive it."""
        ...


class Barrier:
    """The in-process all-reduce: the last rank to arrive closes the iteration with `close`
    (latest end -> next start)."""

    def __init__(self, parties: int, close: Callable[[float], float]) -> None:
        self._parties = parties
        self._close = close
        self._cond = threading.Condition()
        self._arrived = 0
        self._latest_end = -math.inf
        self._generation = 0
        self._next_start = 0.0

    def arrive(self, end: float, stop: threading.Event) -> float:
        with self._cond:
            generation = self._generation
            self._arrived += 1
            self._latest_end = max(self._latest_end, end)
            if self._arrived == self._parties:
                self._next_start = self._close(self._latest_end)
                self._arrived = 0
                self._latest_end = -math.inf
                self._generation += 1
                self._cond.notify_all()
                return self._next_start
            while self._generation == generation:
                if stop.is_set():
                    raise StoppedError
                self._cond.wait(_CHUNK_S)
            return self._next_start


def get_in_order(
    q: queue.SimpleQueue[tuple[int, float]], microbatch: int, stop: threading.Event
) -> float:
    """The next (microbatch, end) from `q`, which must be for `microbatch`: 1F1B sends each
    neighbour its microbatches in order."""
    while True:
        if stop.is_set():
            raise StoppedError
        try:
            got, end = q.get(timeout=_CHUNK_S)
        except queue.Empty:
            continue
        if got != microbatch:
            raise ValueError(f"dependency out of order: expected {microbatch}, got {got}")
        return end


class QueueLinks:
    """Stage `stage` of one pipeline whose ranks are threads: `acts[u]` / `grads[u]` are the
    queues model piece u (= stage * chunks + chunk) receives activations / gradients on. With
    interleaved 1F1B the last stage's chunk c feeds the first stage's chunk c + 1."""

    def __init__(
        self,
        stage: int,
        chunks: int,
        *,
        acts: list[queue.SimpleQueue[tuple[int, float]]],
        grads: list[queue.SimpleQueue[tuple[int, float]]],
        barrier: Barrier,
        stop: threading.Event,
    ) -> None:
        self._stage = stage
        self._chunks = chunks
        self._stages = len(acts) // chunks
        self._acts = acts
        self._grads = grads
        self._barrier = barrier
        self._stop = stop

    def _unit(self, forward: bool, microbatch: int, chunk: int, *, sending: bool) -> int:
        """The queue of the piece this instruction receives from (or, sending, sends to)."""
        neighbour = (not forward) if sending else forward
        stage, piece_chunk = upstream(
            self._stages, self._chunks, self._stage, (neighbour, microbatch, chunk)
        )
        return -1 if stage < 0 else stage * self._chunks + piece_chunk

    def receive(self, forward: bool, microbatch: int, chunk: int = 0) -> float:
        if self._unit(forward, microbatch, chunk, sending=False) < 0:
            return -math.inf
        unit = self._stage * self._chunks + chunk
        return get_in_order((self._acts if forward else self._grads)[unit], microbatch, self._stop)

    def send(self, forward: bool, microbatch: int, end: float, chunk: int = 0) -> None:
        unit = self._unit(forward, microbatch, chunk, sending=True)
        if unit >= 0:
            (self._acts if forward else self._grads)[unit].put((microbatch, end))

    def barrier(self, end: float) -> float:
        """The all-reduce: this rank's work for the iteration ended at `end`; returns the
        next iteration's start on the timeline once every rank arrived."""
        return self._barrier.arrive(end, self._stop)
