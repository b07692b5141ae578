"""Where the hooks find their sidecar and who they say they are: arguments of `register`, or the
environment a Kubernetes pod is given (the downward API's host IP and pod identity, the mounted
job token)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

__all__ = [
    "DEFAULT_JOB_TOKEN_FILE",
    "DEFAULT_PORT",
    "HooksConfig",
    "RefusedError",
    "config_from_environment",
]

log = logging.getLogger("perseus.hooks")

DEFAULT_JOB_TOKEN_FILE = "/var/run/perseus/job-token/token"
DEFAULT_PORT = 8080


class HooksConfig:
    """Everything the background sender needs; built by :func:`register` from arguments and the
    environment. The job token is re-read from its file at every registration attempt, because
    the Secret is mounted optionally and may appear only after the pod started."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        namespace: str,
        pod: str,
        rank: int,
        pipeline_rank: int,
        data_rank: int,
        tensor_rank: int,
        gpu_uuid: str,
        job_token: str | None = None,
        job_token_file: str = DEFAULT_JOB_TOKEN_FILE,
        source_ip: str | None = None,
        event_port: int | None = None,
        connect_timeout_s: float = 2.0,
        min_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        buffer_events: int = 8192,
    ) -> None:
        for label, value in (
            ("rank", rank),
            ("pipeline_rank", pipeline_rank),
            ("data_rank", data_rank),
            ("tensor_rank", tensor_rank),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{label} must be an integer >= 0, got {value!r}")
        if not 0 < port < 65536:
            raise ValueError(f"sidecar port must be 1-65535, got {port}")
        if event_port is not None and not 0 < event_port < 65536:
            raise ValueError(f"sidecar event port must be 1-65535, got {event_port}")
        if buffer_events < 1:
            raise ValueError(f"buffer_events must be >= 1, got {buffer_events}")
        if not 0 < min_backoff_s <= max_backoff_s:
            raise ValueError("backoff must satisfy 0 < min_backoff_s <= max_backoff_s")
        self.host = host
        self.port = port
        self.namespace = namespace
        self.pod = pod
        self.rank = rank
        self.pipeline_rank = pipeline_rank
        self.data_rank = data_rank
        self.tensor_rank = tensor_rank
        self.gpu_uuid = gpu_uuid
        self.job_token = job_token
        self.job_token_file = job_token_file
        self.source_ip = source_ip
        self.event_port = event_port
        self.connect_timeout_s = connect_timeout_s
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.buffer_events = buffer_events

    def token(self) -> str:
        if self.job_token is not None:
            return self.job_token
        try:
            return Path(self.job_token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise RefusedError(f"job token file {self.job_token_file} unreadable: {exc}") from None

    def source_address(self) -> tuple[str, int] | None:
        return None if self.source_ip is None else (self.source_ip, 0)


class RefusedError(Exception):
    """The sidecar (or the environment) refused this attempt; retry later. `forget_rank` when
    the rank must register again (e.g. the sidecar restarted and no longer knows it)."""

    def __init__(self, message: str, *, forget_rank: bool = False) -> None:
        super().__init__(message)
        self.forget_rank = forget_rank


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def config_from_environment(
    *,
    rank: int,
    pipeline_rank: int,
    data_rank: int,
    tensor_rank: int,
    gpu_uuid: str | None,
    host: str | None,
    port: int | None,
    namespace: str | None,
    pod: str | None,
    job_token: str | None,
    job_token_file: str | None,
    source_ip: str | None,
    event_port: int | None,
    connect_timeout_s: float,
    min_backoff_s: float,
    max_backoff_s: float,
    buffer_events: int,
) -> HooksConfig | None:
    """The arguments of `register`, missing ones taken from the pod's environment; None (and one
    warning saying why) without a sidecar host or GPU UUID: the hooks are then a no-op."""
    env = os.environ
    host = host or env.get("PERSEUS_SIDECAR_HOST") or None
    gpu_uuid = gpu_uuid or env.get("PERSEUS_GPU_UUID") or None
    if host is None or gpu_uuid is None:
        missing = "PERSEUS_SIDECAR_HOST" if host is None else "gpu_uuid (or PERSEUS_GPU_UUID)"
        log.warning("perseus hooks disabled: %s not set; training runs without Perseus", missing)
        return None
    return HooksConfig(
        host=host,
        port=port if port is not None else _env_int("PERSEUS_SIDECAR_PORT", DEFAULT_PORT),
        namespace=namespace or env.get("PERSEUS_POD_NAMESPACE", "default"),
        pod=pod or env.get("PERSEUS_POD_NAME") or socket.gethostname(),
        rank=rank,
        pipeline_rank=pipeline_rank,
        data_rank=data_rank,
        tensor_rank=tensor_rank,
        gpu_uuid=gpu_uuid,
        job_token=job_token,
        job_token_file=job_token_file or env.get("PERSEUS_JOB_TOKEN_FILE", DEFAULT_JOB_TOKEN_FILE),
        source_ip=source_ip,
        event_port=event_port
        if event_port is not None
        else (_env_int("PERSEUS_SIDECAR_EVENT_PORT", 0) or None),
        connect_timeout_s=connect_timeout_s,
        min_backoff_s=min_backoff_s,
        max_backoff_s=max_backoff_s,
        buffer_events=buffer_events,
    )
