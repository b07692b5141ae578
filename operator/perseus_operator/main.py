"""`perseus-operator`: run the kopf operator (standalone: one replica, no peering objects).

Settings come from `PERSEUS_OPERATOR_*` environment variables (see `settings.py`); the flags here
override the few a local run changes. They are read once, into one `Settings`, which the
handlers reach through kopf's memo.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

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


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line sets; environment variables supply the rest."""
    flags = {
        "token_file": args.token_file,
        "liveness_url": args.liveness,
        "tick_s": args.tick_s,
        "pod_namespace": args.profile_namespace,
        "namespaces": ",".join(args.namespace) if args.namespace else None,
    }
    return {k: v for k, v in flags.items() if v is not None}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import kopf
    from pydantic import ValidationError

    from perseus_operator.handlers import OperatorMemo, build_registry
    from perseus_operator.settings import Settings
    from perseus_sidecar.validation import one_line

    try:
        settings = Settings(**flag_overrides(args))
        settings.operator_token()
        registry = build_registry(settings)
    except ValidationError as exc:
        print(f"perseus-operator: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"perseus-operator: error: {exc}", file=sys.stderr)
        return 2
    level = logging.DEBUG if args.verbose else getattr(logging, settings.log_level.upper(), 20)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    namespaces = settings.namespace_list()
    try:
        asyncio.run(
            kopf.operator(
                registry=registry,
                memo=OperatorMemo(settings),
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
