"""One readable line from a pydantic validation error, for CLI errors, HTTP 422 messages and
policy conditions. pydantic prefixes what a validator raised with its own wording ("Value error,
..."), which tells a user nothing: it is dropped."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

__all__ = ["clean_message", "error_line", "one_line"]

_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def clean_message(msg: str) -> str:
    """`msg` without pydantic's prefix for errors raised in validators."""
    for prefix in _PYDANTIC_PREFIXES:
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def error_line(error: Mapping[str, Any], root: str = "") -> str:
    """`where: what` for one error of `ValidationError.errors()`; `root` names the whole input
    (a model-level error has an empty location)."""
    loc: Iterable[Any] = error.get("loc") or ()
    where = ".".join(str(p) for p in (root, *loc) if str(p))
    what = clean_message(str(error.get("msg") or "invalid"))
    return f"{where}: {what}" if where else what


def one_line(exc: ValidationError, root: str = "") -> str:
    """The first error as one line, and how many more there are."""
    errors = exc.errors()
    if not errors:
        return str(exc).splitlines()[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return error_line(errors[0], root) + more
