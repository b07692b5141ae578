"""`perseus-sidecar`: settings from `PERSEUS_SIDECAR_*` environment variables, overridden by flags;
JSON-lines logs; uvicorn serves HTTP and the lifespan runs the event transport on the same loop.
SIGTERM/SIGINT shut down gracefully, resetting every clock this sidecar locked.
`perseus-sidecar doctor` runs the read-only GPU check of `doctor.py` instead of the agent."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["JsonFormatter", "build_parser", "main", "settings_from_args"]

_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="perseus-sidecar",
        description="Perseus node agent. Every flag also reads PERSEUS_SIDECAR_<FLAG> "
        "(e.g. PERSEUS_SIDECAR_TOKEN_FILE); flags win.",
        epilog="'perseus-sidecar doctor [--json]' checks this node's GPUs, read-only.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--host", help="HTTP and event listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="HTTP port (default 8080)")
    p.add_argument("--event-port", type=int, help="TCP event transport port (default 8081)")
    p.add_argument("--token-file", help="file with the operator's bearer token")
    p.add_argument("--state-dir", help="lock-state directory (default /var/lib/perseus-sidecar)")
    p.add_argument("--node-name", help="this node's name (default 'node')")
    p.add_argument("--gpu-backend", choices=["nvml", "simulated"], help="default nvml")
    p.add_argument("--profile", help="stage profile CSV of the simulated GPUs")
    p.add_argument("--example", help="shipped example profile for the simulated GPUs")
    p.add_argument("--gpus", type=int, help="number of simulated GPUs (default 8)")
    p.add_argument("--time-scale", type=float, help="wall seconds per simulated second")
    p.add_argument("--sim-blocking-power-w", type=float, help="simulated idle power")
    p.add_argument("--sim-perturbation", type=float, help="simulated profile perturbation")
    p.add_argument("--sim-seed", type=int, help="seed of the perturbation")
    p.add_argument("--sim-energy-update-s", type=float, help="simulated counter update period")
    p.add_argument(
        "--time-sliced",
        action="store_true",
        help="GPUs of this node are shared by time slicing: never lock them",
    )
    p.add_argument("--rank-timeout-s", type=float, help="reset a silent rank's clock after this")
    p.add_argument("--max-body-bytes", type=int, help="HTTP request body cap")
    p.add_argument("--energy-poll-s", type=float, help="energy sampling period while profiling")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--pod-resources-socket",
        help="kubelet pod-resources socket ('' for none: trust only the operator's announcement)",
    )
    p.add_argument("--max-microbatches", type=int, help="per-rank bound without announced shape")
    p.add_argument(
        "--metrics-tenant-labels",
        action="store_true",
        help="label per-rank metrics with job namespaces and names (/metrics has no auth)",
    )
    p.add_argument("--http-header-timeout-s", type=float, help="a request must arrive within")
    p.add_argument("--http-keep-alive-s", type=float, help="idle keep-alive connection timeout")
    p.add_argument("--http-max-connections", type=int, help="open HTTP connections at most")
    p.add_argument("--http-max-connections-per-ip", type=int, help="per client address")
    p.add_argument("--event-idle-timeout-s", type=float, help="close a silent event connection")
    p.add_argument("--event-max-connections", type=int, help="open event connections at most")
    p.add_argument("--event-max-connections-per-ip", type=int, help="per client address")
    p.add_argument("--event-max-connections-per-rank", type=int, help="per registered rank")
    return p


def settings_from_args(argv: Sequence[str] | None = None) -> Any:
    from perseus_sidecar.settings import Settings

    args = build_parser().parse_args(argv)
    return Settings(**vars(args))


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["doctor"]:  # before the agent's heavy imports: the doctor needs only NVML
        from perseus_sidecar.doctor import main as doctor_main

        return doctor_main(args[1:])
    import uvicorn
    from pydantic import ValidationError

    from perseus_sidecar.app import SetupError, create_app
    from perseus_sidecar.gpu.base import GpuError
    from perseus_sidecar.httpguard import raise_fd_limit, uvicorn_options
    from perseus_sidecar.validation import one_line

    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:
        print(f"perseus-sidecar: error: {one_line(exc)}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    raise_fd_limit()
    try:
        app = create_app(settings)
    except (SetupError, GpuError, ValueError) as exc:
        print(f"perseus-sidecar: error: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        **uvicorn_options(settings, app.state.node.metrics),
    )
    server = uvicorn.Server(config)
    gc.freeze()  # startup objects never need collecting: shorter GC pauses on the hot path
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises SIGINT after its graceful shutdown
        return 130
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
