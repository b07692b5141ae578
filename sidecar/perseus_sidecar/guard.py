"""The front door, before routing and body parsing: a write (any method but GET/HEAD/OPTIONS)
without a bearer token the sidecar knows (the operator's or an announced job's) gets 401 whatever
its path and body, and request bodies are capped (413). Per-endpoint checks follow in routers."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from perseus_sidecar.node import Node

__all__ = ["GuardMiddleware"]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class GuardMiddleware:
    def __init__(self, app: ASGIApp, node: Node, max_body_bytes: int) -> None:
        self.app = app
        self.node = node
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if not self.node.tokens.is_known(_bearer(headers.get(b"authorization"))):
            await _reply(
                send, 401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"}
            )
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await _reply(send, 413, f"request body over {self.max_body_bytes} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _reply(send, 413, f"request body over {self.max_body_bytes} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _bearer(value: bytes | None) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


async def _reply(
    send: Send, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
