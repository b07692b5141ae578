"""FastAPI dependencies: the node, bearer tokens and the operator check, as `Annotated` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from perseus_sidecar.node import Node

__all__ = [
    "BearerToken",
    "ClientIp",
    "JobName",
    "Namespace",
    "NodeDep",
    "get_node",
    "require_operator",
]

_bearer = HTTPBearer(auto_error=False, description="Operator token, or a job token for ranks")


def get_node(request: Request) -> Node:
    node: Node = request.app.state.node
    return node


NodeDep = Annotated[Node, Depends(get_node)]


def bearer_token(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str | None:
    return credentials.credentials if credentials is not None else None


BearerToken = Annotated[str | None, Depends(bearer_token)]


def require_operator(node: NodeDep, token: BearerToken) -> None:
    if not node.tokens.is_operator(token):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "this endpoint needs the operator's bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client is not None else None


ClientIp = Annotated[str | None, Depends(client_ip)]
Namespace = Annotated[
    str, Path(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
]
JobName = Annotated[
    str, Path(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
]
