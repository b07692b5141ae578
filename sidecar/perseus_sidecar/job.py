"""What the node keeps of one announced job: its token's hash, its pods, its ranks on this node,
its schedule and its profiling session."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from perseus_sidecar.api import PodAnnouncement, ScheduleEntry
from perseus_sidecar.profiling import ProfilingSession
from perseus_sidecar.ranks import Rank

__all__ = ["Job", "sha256_hex"]


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass
class Job:
    namespace: str
    name: str
    token_sha256: str
    pods: dict[tuple[str, str], PodAnnouncement]
    microbatches: int
    """Per-rank buffers are bounded by this pipeline shape (announced, else the node's limit)."""
    ranks: dict[str, Rank] = field(default_factory=dict)
    schedule: dict[tuple[int, int], ScheduleEntry] = field(default_factory=dict)
    profiling: ProfilingSession | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def token_ok(self, token: str) -> bool:
        """`token` is the one the job was announced with (constant-time)."""
        return hmac.compare_digest(sha256_hex(token), self.token_sha256)
