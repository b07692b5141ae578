"""`perseus-operator`: run the kopf operator (standalone: one replica, no peering objects).

Settings come from `PERSEUS_OPERATOR_*` environment variables (see `settings.py`); the flags here
override the few a local run changes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perseus-operator", description="Run the Perseus EnergyPolicy operator."
    )
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=None,
        help="watch only this namespace (repeatable); default: PERSEUS_OPERATOR_NAMESPACES or all",
    )
    parser.add_argument("--token-file", help="the operator's bearer token for the sidecars")
    parser.add_argument(
        "--liveness", help="liveness endpoint URL, e.g. http://0.0.0.0:8081/healthz"
    )
    parser.add_argument("--tick-s", type=float, help="reconcile period of each policy, seconds")
    parser.add_argument("--profile-namespace", help="namespace of the stored profile ConfigMaps")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        "PERSEUS_OPERATOR_TOKEN_FILE": args.token_file,
        "PERSEUS_OPERATOR_LIVENESS_URL": args.liveness,
        "PERSEUS_OPERATOR_TICK_S": None if args.tick_s is None else str(args.tick_s),
        "PERSEUS_OPERATOR_POD_NAMESPACE": args.profile_namespace,
        "PERSEUS_OPERATOR_NAMESPACES": ",".join(args.namespace) if args.namespace else None,
    }
    for key, value in overrides.items():
        if value is not None:
            os.environ[key] = value
    import kopf

    from perseus_operator import handlers
    from perseus_operator.settings import Settings

    try:
        settings = Settings()
        settings.operator_token()
        settings.sidecar_labels()
    except (ValueError, OSError) as exc:
        print(f"perseus-operator: error: {exc}", file=sys.stderr)
        return 2
    handlers.STATE.settings = settings
    level = logging.DEBUG if args.verbose else getattr(logging, settings.log_level.upper(), 20)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    namespaces = settings.namespace_list()
    try:
        asyncio.run(
            kopf.operator(
                standalone=True,
                clusterwide=not namespaces,
                namespaces=namespaces,
                liveness_endpoint=settings.liveness_url or None,
            )
        )
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
