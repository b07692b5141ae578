"""The `perseus` command line. Each subcommand lives in `perseus_operator.commands.<name>` with
`add_parser(subparsers)` and `run(args) -> int`; their modules import heavy dependencies inside
`run`, so `perseus plan` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["CliError", "main"]

COMMANDS: tuple[str, ...] = ("plan", "sim-train")


class CliError(Exception):
    """A user error: printed as one line, exit code `code` (2 for bad input)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perseus",
        description="Perseus: cut the energy of pipeline-parallel training without slowing it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"perseus_operator.commands.{name.replace('-', '_')}")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except CliError as exc:
        print(f"perseus {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except ValueError as exc:  # validation errors (ProfileError and friends) are user errors
        print(f"perseus {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"perseus {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
