"""What the node refuses, by kind: the app maps each to its HTTP status, the TCP transport to a
closed connection; the message is one line for the client."""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConflictError",
    "ForbiddenError",
    "InvalidError",
    "NodeError",
    "NotFoundError",
    "UnavailableError",
]


class NodeError(Exception):
    """A request the node refuses; the message is one line for the client."""


class AuthError(NodeError):
    """Wrong or missing credentials for this resource (HTTP 401/403)."""


class ForbiddenError(AuthError):
    """Right token, wrong place (a request not from the announced pod's IP): HTTP 403."""


class NotFoundError(NodeError):
    pass


class ConflictError(NodeError):
    pass


class InvalidError(NodeError):
    """Semantically invalid input that only the node can judge (HTTP 422)."""


class UnavailableError(NodeError):
    """A source the node depends on (the kubelet's pod-resources API) failed (HTTP 503)."""
