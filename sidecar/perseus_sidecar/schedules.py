"""A schedule entry as the node takes it: checked against the GPUs that will play it, then read
into a rank's clock tables (one clock per forward and per backward, indexed as the rank's events
are)."""

from __future__ import annotations

from collections.abc import Iterable

from perseus_hooks.pipeline import parse_instruction
from perseus_sidecar.api import ScheduleEntry
from perseus_sidecar.errors import InvalidError
from perseus_sidecar.gpu.base import GpuInfo
from perseus_sidecar.ranks import Rank

__all__ = ["check_clocks", "clock_tables", "holds"]


def holds(rank: Rank, entry: ScheduleEntry) -> bool:
    """The rank plays the entry (same data-parallel and pipeline rank)."""
    return (rank.data_rank, rank.pipeline_rank) == (entry.data_rank, entry.pipeline_rank)


def check_clocks(entry: ScheduleEntry, gpus: Iterable[GpuInfo]) -> None:
    """Every clock of the entry is one that each of `gpus` supports."""
    for gpu in gpus:
        unsupported = sorted(set(entry.frequencies_mhz) - set(gpu.supported_sm_clocks_mhz))
        if unsupported:
            raise InvalidError(
                f"entry (data_rank {entry.data_rank}, pipeline_rank "
                f"{entry.pipeline_rank}): {unsupported} MHz not supported by GPU "
                f"{gpu.uuid} (supported: {list(gpu.supported_sm_clocks_mhz)})"
            )


def clock_tables(entry: ScheduleEntry) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The clocks of the entry's forwards and backwards, at ``microbatch * chunks + chunk``."""
    chunks = entry.chunks
    forward = [0] * (entry.microbatches * chunks)
    backward = [0] * (entry.microbatches * chunks)
    for text, mhz in zip(entry.order, entry.frequencies_mhz, strict=True):
        is_forward, m, chunk = parse_instruction(text)
        (forward if is_forward else backward)[m * chunks + (chunk or 0)] = mhz
    return tuple(forward), tuple(backward)
