"""The credentials a node accepts: the operator's token, and each announced job's token (known by
its SHA-256 only). Every comparison is constant-time."""

from __future__ import annotations

import hmac

from perseus_sidecar.job import sha256_hex

__all__ = ["Tokens"]


class Tokens:
    def __init__(self, operator_token: str) -> None:
        self._operator = operator_token.encode()
        self._jobs: dict[str, set[tuple[str, str]]] = {}
        """Token hash -> the jobs (namespace, name) announced with it."""

    def set_operator(self, token: str) -> None:
        """A rotated operator token (the mounted Secret changed)."""
        self._operator = token.encode()

    def is_operator(self, token: str | None) -> bool:
        if token is None:
            return False
        return hmac.compare_digest(token.encode("utf-8", "surrogateescape"), self._operator)

    def is_known(self, token: str | None) -> bool:
        """The operator's token or any announced job's: enough to get past the front door."""
        if token is None:
            return False
        if self.is_operator(token):
            return True
        digest = sha256_hex(token)
        return any(hmac.compare_digest(digest, h) for h in self._jobs)

    def add_job(self, token_sha256: str, key: tuple[str, str]) -> None:
        self._jobs.setdefault(token_sha256, set()).add(key)

    def remove_job(self, token_sha256: str, key: tuple[str, str]) -> None:
        keys = self._jobs.get(token_sha256)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._jobs[token_sha256]
