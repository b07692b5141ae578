"""The `perseus` command line. Each subcommand lives in a module named in `COMMANDS` with
`add_parser(subparsers)` and `run(args) -> int`; their modules import heavy dependencies inside
`run`, so `perseus plan` starts fast. The simulation's subcommands live in the simulation package
(`perseus_sim.commands`), imported by name here: the only way the operator's package reaches it.
A subcommand whose work is all written once `run` returns sets ``quick_exit=True`` as a parser
default: the console script then ends the process without the interpreter's teardown (unloading
numpy and HiGHS and their threads: 15-30 ms of a 0.4 s `perseus plan`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["CliError", "entry", "main"]

COMMANDS: dict[str, str] = {
    "plan": "perseus_operator.commands.plan",
    "sim-train": "perseus_sim.commands.sim_train",
}
"""Subcommand -> the module that defines it."""


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
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; its exit code."""
    return _dispatch(argv)[0]


def entry() -> NoReturn:
    """The console script (and ``python -m perseus_operator.cli``): `main`, then the exit."""
    code, args = _dispatch(None)
    if getattr(args, "quick_exit", False):
        # Everything is written and closed (files by `run`, the streams here): nothing is left
        # for the teardown to do but free memory the OS takes back anyway.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _dispatch(argv: Sequence[str] | None) -> tuple[int, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except CliError as exc:
        print(f"perseus {args.command}: error: {exc}", file=sys.stderr)
        return exc.code, args
    except ValueError as exc:  # validation errors (ProfileError and friends) are user errors
        print(f"perseus {args.command}: error: {exc}", file=sys.stderr)
        return 2, args
    except KeyboardInterrupt:
        print(f"perseus {args.command}: interrupted", file=sys.stderr)
        return 130, args
    return code, args


if __name__ == "__main__":
    # Run as `python -m`, this file is `__main__`, a second copy of the module: the subcommands
    # raise the package's `CliError`, so the package's entry must be the one catching it.
    from perseus_operator.cli import entry as _package_entry

    _package_entry()
