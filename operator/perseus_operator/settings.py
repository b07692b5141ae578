"""Operator settings: environment variables prefixed `PERSEUS_OPERATOR_` (the Helm chart's
operator ConfigMap sets them), overridden by `perseus-operator` flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PERSEUS_OPERATOR_", extra="ignore")

    token_file: Path | None = None
    """The operator's bearer token for the sidecars' control endpoints (a mounted Secret)."""
    token: str | None = Field(default=None, repr=False)
    """The token itself, for local runs and tests; `token_file` wins."""
    sidecar_port: int = Field(default=8080, ge=1, le=65535)
    """The sidecars' HTTP (host) port: the operator's token goes there, so it is never read from
    a pod."""
    sidecar_selector: str = "app.kubernetes.io/component=sidecar"
    """Labels (k=v,k=v) of the sidecar DaemonSet's pods; indexed by node."""
    sidecar_daemonset: str = Field(default="perseus-sidecar", min_length=1)
    """The sidecar DaemonSet of `pod_namespace`: only pods it owns are taken as sidecars."""
    sidecar_timeout_s: float = Field(default=2.0, gt=0)
    namespaces: str = ""
    """Comma-separated namespaces to watch; empty: the whole cluster."""
    pod_namespace: str = "default"
    """The operator's own namespace: the sidecar DaemonSet runs there and profile ConfigMaps are
    stored there."""
    liveness_url: str = "http://0.0.0.0:8081/healthz"
    log_level: str = "info"
    tick_s: float = Field(default=0.5, gt=0)
    """How often each policy is reconciled (level-based; a spec change wakes it at once)."""
    baseline_iterations: int = Field(default=3, ge=1)
    """All-max-clock iterations measured before the first schedule (the measured baseline)."""
    measure_iterations: int = Field(default=5, ge=1)
    """Iterations under a schedule before the measured saving is reported."""
    max_window_s: float = Field(default=60.0, gt=0)
    """Longest timing window asked from the sidecars."""
    max_plan_instructions: int = Field(default=16384, ge=2)
    """Largest pipeline planned, in instructions per pipeline (2 x stages x microbatches; the
    default is 32 x 256, planned in about 20-30 s under 400 MB). Larger policies fail at once
    with reason TooLarge."""
    planner_memory_mib: int = Field(default=1024, ge=128)
    """Address-space limit of the planner's child process, MiB (above its resident size)."""
    planner_timeout_s: float = Field(default=300.0, gt=0)
    """The planner's child process is killed past this and the policy fails (PlanningFailed)."""
    simulated_gpu_assignment: bool = False
    """Simulated clusters only: announce each pod's GPUs from the simulated kubelet's pod status
    condition (`state.SIMULATED_GPUS_CONDITION`). Real nodes need none: there the sidecar asks
    the kubelet's pod-resources API which pod holds which GPU."""
    cleanup_attempts: int = Field(default=5, ge=1)
    """Finalizer: tries per sidecar to remove schedules before giving up (its own rank timeout
    resets the clocks of a dead sidecar's GPUs on restart)."""

    def operator_token(self) -> str:
        if self.token_file is not None:
            return self.token_file.read_text(encoding="utf-8").strip()
        if self.token:
            return self.token
        raise ValueError(
            "no operator token: pass --token-file FILE or set PERSEUS_OPERATOR_TOKEN_FILE"
            " (or PERSEUS_OPERATOR_TOKEN)"
        )

    def namespace_list(self) -> list[str]:
        return [n.strip() for n in self.namespaces.split(",") if n.strip()]

    def sidecar_labels(self) -> dict[str, str]:
        pairs = [p.split("=", 1) for p in self.sidecar_selector.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"sidecar selector must be k=v[,k=v], got {self.sidecar_selector!r}")
        return {k.strip(): v.strip() for k, v in pairs}
