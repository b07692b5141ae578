"""Sidecar settings: environment variables prefixed `PERSEUS_SIDECAR_` (e.g.
`PERSEUS_SIDECAR_TOKEN_FILE`), overridden by command-line flags in `main.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PERSEUS_SIDECAR_", extra="forbid")

    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    event_port: int = Field(default=8081, ge=0, le=65535)
    """Port of the hot-path TCP line transport (0 picks a free one)."""
    node_name: str = "node"
    token_file: Path | None = None
    """File holding the operator's bearer token (a mounted Secret)."""
    operator_token: str | None = Field(default=None, exclude=True, repr=False)
    """The token itself, for tests; `token_file` wins in production."""
    state_dir: Path = Path("/var/lib/perseus-sidecar")
    """Where the lock-state file lives (a host path, so it outlives the container)."""
    gpu_backend: Literal["nvml", "simulated"] = "nvml"
    profile: Path | None = None
    example: str | None = None
    gpus: int = Field(default=8, ge=0, le=64)
    time_sliced: bool = False
    """The node shares GPUs by time slicing: NVML GPUs are listed but never locked."""
    time_scale: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """Simulated seconds = wall seconds / time_scale (1 for real GPUs)."""
    sim_blocking_power_w: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    sim_perturbation: float = Field(default=0.0, ge=0, lt=1, allow_inf_nan=False)
    sim_seed: int = 0
    sim_energy_update_s: float = Field(default=0.05, gt=0, allow_inf_nan=False)
    rank_timeout_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    """Reset a rank's clock when its events stop for this long (wall seconds)."""
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    energy_poll_s: float = Field(default=0.002, gt=0, allow_inf_nan=False)
    """How often a profiling session samples the energy counters (wall seconds)."""
    timings_history: int = Field(default=2000, ge=10)
    """Completed iterations kept per rank for timing queries."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    pod_resources_socket: Path | None = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
    """The kubelet's pod-resources API: which GPUs each pod was given. Where the file is absent
    (simulation), only the GPUs the operator announced for a pod can be registered."""
    max_microbatches: int = Field(default=4096, ge=1, le=4096)
    """Per-rank bound when the operator announces no pipeline shape (and the shape's ceiling)."""
    metrics_tenant_labels: bool = False
    """Label per-rank metrics with the job's namespace and name (GET /metrics has no auth)."""
    http_header_timeout_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    """Close an HTTP connection whose request headers are not complete this long after it
    opened or went idle."""
    http_keep_alive_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    """Close an idle keep-alive HTTP connection after this long."""
    http_max_connections: int = Field(default=256, ge=4)
    """Open HTTP connections at most; beyond it, new ones are closed at once."""
    http_max_connections_per_ip: int = Field(default=32, ge=1)
    """Open HTTP connections from one address at most."""
    event_idle_timeout_s: float = Field(default=600.0, gt=0, allow_inf_nan=False)
    """Close an authenticated event connection that sent nothing for this long (the hooks
    reconnect on their next event)."""
    event_max_connections: int = Field(default=256, ge=1)
    """Open event (TCP) connections at most, handshaking or authenticated."""
    event_max_connections_per_ip: int = Field(default=64, ge=1)
    """Open event connections from one address at most (a pod's ranks share its address)."""
    event_max_connections_per_rank: int = Field(default=4, ge=1)
    """Authenticated event connections of one rank at most; a new one closes the oldest."""

    @field_validator("pod_resources_socket", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _simulated_needs_profile(self) -> Settings:
        if self.gpu_backend == "simulated" and (self.profile is None) == (self.example is None):
            raise ValueError("the simulated backend needs exactly one of profile or example")
        return self
